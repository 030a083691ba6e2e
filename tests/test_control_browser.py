"""The settings page in headless Chromium, driven like a person would: log in with Plex (through
app.plex.tv, played here by a local page, and the fake plex.tv), set a TMDB key (a wrong one
first), see your usage change when your player uses it, import localStorage, log out.

Chromium is driven over the DevTools protocol (a websocket, from aiohttp). app.plex.tv is the only
hard-coded host the page sends the browser to: `--host-resolver-rules` maps it to a local HTTPS
server, so nothing reaches the real Plex.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import ssl
import subprocess
import time
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import pytest
import trustme
from aiohttp import web
import support
from test_e2e_credentials import RecordingClient

from fake_upstreams.data import PLEX_ACCOUNT_TOKEN, PLEX_SERVER_TOKEN, TMDB_V4_TOKEN

pytestmark = [pytest.mark.e2e, pytest.mark.browser]


APP_PLEX_TV_PAGE = """<!doctype html><meta charset="utf-8"><title>app.plex.tv</title>
<p>Approving…</p>
<script>
// What the user does on app.plex.tv: sign in, approve the PIN; then Plex sends them to forwardUrl.
const params = new URLSearchParams(location.hash.replace(/^#!?\\??/, ""));
fetch("/approve", {method: "POST", body: JSON.stringify(Object.fromEntries(params))})
  .then(r => r.json()).then(answer => { location.assign(answer.forwardUrl); });
</script>"""


class AppPlexTv:
    """app.plex.tv over HTTPS on a local port: approves the PIN at the fake plex.tv."""

    def __init__(self, fakes, account_token: str) -> None:
        self.fakes = fakes
        self.account_token = account_token
        self.approved: list[dict] = []
        self.runner: web.AppRunner | None = None
        self.port = 0

    async def __aenter__(self) -> AppPlexTv:
        ca = trustme.CA()
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert("app.plex.tv").configure_cert(context)
        app = web.Application()
        app.router.add_get("/auth/", self.page)
        app.router.add_post("/approve", self.approve)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0, ssl_context=context)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc) -> None:
        await self.runner.cleanup()

    async def page(self, request: web.Request) -> web.Response:
        return web.Response(text=APP_PLEX_TV_PAGE, content_type="text/html")

    async def approve(self, request: web.Request) -> web.Response:
        params = json.loads(await request.read())
        forward = params["forwardUrl"]
        pin_id = int(urlsplit(forward).path.rsplit("/", 1)[-1])
        self.fakes.plextv.link_pin(pin_id, account_token=self.account_token)
        self.approved.append(params)
        return web.json_response({"forwardUrl": forward})


class DevTools:
    """The few DevTools protocol calls the test needs, on one page target."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.ids = itertools.count(1)

    async def send(self, method: str, **params) -> dict:
        message_id = next(self.ids)
        await self.ws.send_json({"id": message_id, "method": method, "params": params})
        while True:
            message = await self.ws.receive_json(timeout=30)
            if message.get("id") == message_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]

    async def evaluate(self, expression: str):
        result = await self.send("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails'].get('text')}")
        return result["result"].get("value")

    async def wait_for(self, expression: str, timeout: float = 20.0, what: str | None = None):
        """Evaluate until truthy; navigations in between (a destroyed context) are retried."""
        deadline = time.monotonic() + timeout
        last_error = None
        while time.monotonic() < deadline:
            try:
                value = await self.evaluate(expression)
                if value:
                    return value
            except RuntimeError as exc:
                last_error = exc
            await asyncio.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what or expression} (last error: {last_error})")

    async def text(self, element_id: str) -> str:
        return await self.evaluate(f"document.getElementById({json.dumps(element_id)}).textContent")

    async def click(self, element_id: str) -> None:
        await self.evaluate(f"document.getElementById({json.dumps(element_id)}).click()")

    async def fill(self, element_id: str, value: str) -> None:
        await self.evaluate(f"document.getElementById({json.dumps(element_id)}).value = {json.dumps(value)}")


async def start_chromium(profile: Path, app_plex_tv_port: int, log: Path) -> tuple[subprocess.Popen, str]:
    return await support.start_chromium(
        profile, log, f"--host-resolver-rules=MAP app.plex.tv:443 127.0.0.1:{app_plex_tv_port}",
        "--ignore-certificate-errors")  # the local app.plex.tv's certificate (this test's browser only)


async def test_settings_page_login_tmdb_key_usage_import_logout(stack, tmp_path, clean_fakes):
    async with AppPlexTv(stack.fakes, PLEX_ACCOUNT_TOKEN) as app_plex_tv:
        browser, ws_url = await start_chromium(tmp_path / "profile", app_plex_tv.port, tmp_path / "chromium.log")
        try:
            async with aiohttp.ClientSession() as session, session.ws_connect(ws_url, max_msg_size=0) as ws:
                page = DevTools(ws)
                await page.send("Page.navigate", url=stack.control_url + "/")
                await page.wait_for("document.body && document.body.dataset.ready === 'true'", what="the page")
                assert await page.evaluate("document.getElementById('signed-out').hidden") is False

                # Log in with Plex: app.plex.tv approves, sends the browser back, the page is signed in.
                await page.click("login-button")
                await page.wait_for("document.getElementById('username') && "
                                    "document.getElementById('username').textContent === 'mrandersson'",
                                    what="the signed-in page")
                assert app_plex_tv.approved and app_plex_tv.approved[0]["clientID"].startswith("projectionist-")
                assert await page.evaluate("location.pathname + location.search") == "/"
                assert await page.text("session-expires")
                await page.wait_for("document.getElementById('tmdb-status').textContent !== ''")

                # A wrong key is refused and not stored; the right one is stored.
                await page.fill("tmdb-key-input", "0123456789abcdef0123456789abcdef")
                await page.click("tmdb-save")
                await page.wait_for("document.getElementById('tmdb-message').textContent.includes('rejected')",
                                    what="the rejection")
                assert await page.text("tmdb-status") == "the server's key"
                await page.fill("tmdb-key-input", TMDB_V4_TOKEN)
                await page.click("tmdb-save")
                await page.wait_for("document.getElementById('tmdb-status').textContent === 'your own key'",
                                    what="the key to be stored")
                bearer = await page.text("tmdb-bearer")
                assert bearer.startswith("pj_")

                # The player uses the bearer; the page's usage shows the calls made with the user's key.
                await page.click("usage-refresh")
                await page.wait_for("document.getElementById('usage-table').dataset.loaded")
                before = int(await page.text("usage-custom"))
                player = RecordingClient(stack)
                r = await asyncio.to_thread(player.request, "GET", "https://api.themoviedb.org/3/movie/693134",
                                            headers={"Authorization": f"Bearer {bearer}"})
                assert r.status_code == 200
                assert clean_fakes.requests["tmdb"][-1].headers["Authorization"] == f"Bearer {TMDB_V4_TOKEN}"
                deadline = time.monotonic() + 15
                while int(await page.text("usage-custom")) <= before:
                    assert time.monotonic() < deadline, "the page's usage never showed the custom-key call"
                    await page.click("usage-refresh")
                    await asyncio.sleep(0.3)
                assert "tmdb.details" in await page.text("usage-table")

                # Import the player's localStorage: the answer holds surrogates only.
                exported = {"plexBaseUrl": stack.plex_url, "plexToken": PLEX_SERVER_TOKEN, "tmdbBearer": "placeholder"}
                await page.fill("import-input", json.dumps(exported))
                await page.click("import-button")
                output = await page.wait_for("document.getElementById('import-output').value", what="the import")
                imported = json.loads(output)
                assert imported["plexToken"].startswith("pj_") and imported["tmdbBearer"] == bearer
                html = await page.evaluate("document.documentElement.outerHTML")
                assert PLEX_SERVER_TOKEN not in html and TMDB_V4_TOKEN not in html

                await page.click("tmdb-remove")
                await page.wait_for("document.getElementById('tmdb-status').textContent === \"the server's key\"")
                await page.click("logout-button")
                await page.wait_for("document.getElementById('signed-out').hidden === false", what="signed out")
                sections = await asyncio.to_thread(
                    player.request, "GET", f"{stack.plex_url}/library/sections?X-Plex-Token={imported['plexToken']}")
                assert sections.status_code == 401  # logging out revoked the player's surrogates
        finally:
            browser.terminate()
            browser.wait(10)
