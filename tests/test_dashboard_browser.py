"""The dashboard as an admin sees it: headless Chromium over generated data, driven through the
DevTools protocol. Every page of the dashboard home (canned queries with their charts, the
viewing history) is loaded with the admin's Basic credentials, each chart must be drawn, and the
page must be free of errors: uncaught exceptions, console.error, browser log errors (failed
resources, CSP, ...) and any HTTP answer >= 400. Screenshots go to test-artifacts/dashboard/.

The error collector is itself checked first on a page that does each of those wrong.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

import aiohttp
import pytest
import yaml

from projectionist.dashboard import ADMIN_USER, admin_password
from projectionist.config import Config

from support import load_bench

pytestmark = pytest.mark.browser

REPO = Path(__file__).resolve().parent.parent
ARTIFACTS = REPO / "test-artifacts" / "dashboard"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
METADATA = yaml.safe_load((REPO / "datasette_metadata.yml").read_text())


class Page:
    """One Chromium tab over the DevTools protocol, recording every error the page produces."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.ids = itertools.count(1)
        self.pending: dict[int, asyncio.Future] = {}
        self.events: asyncio.Queue = asyncio.Queue()
        self.errors: list[str] = []
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for message in self.ws:
            data = json.loads(message.data)
            if "id" in data:
                future = self.pending.pop(data["id"], None)
                if future and not future.done():
                    future.set_result(data)
            else:
                self._record(data["method"], data.get("params", {}))
                await self.events.put(data)

    def _record(self, method: str, params: dict) -> None:
        if method == "Runtime.exceptionThrown":
            details = params["exceptionDetails"]
            self.errors.append(f"exception: {details.get('exception', {}).get('description') or details.get('text')}")
        elif method == "Runtime.consoleAPICalled" and params["type"] in ("error", "assert"):
            self.errors.append("console.error: " + " ".join(str(a.get("value", a.get("description")))
                                                            for a in params["args"]))
        elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
            entry = params["entry"]
            self.errors.append(f"log ({entry['source']}): {entry['text']} {entry.get('url', '')}")
        elif method == "Network.responseReceived" and params["response"]["status"] >= 400:
            self.errors.append(f"HTTP {params['response']['status']}: {params['response']['url']}")
        elif method == "Network.loadingFailed" and not params.get("canceled"):
            self.errors.append(f"loading failed: {params.get('errorText')} ({params.get('type')})")

    async def send(self, method: str, **params) -> dict:
        message_id = next(self.ids)
        future = asyncio.get_running_loop().create_future()
        self.pending[message_id] = future
        await self.ws.send_str(json.dumps({"id": message_id, "method": method, "params": params}))
        reply = await asyncio.wait_for(future, 30)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply.get("result", {})

    async def goto(self, url: str, timeout: float = 20) -> None:
        while not self.events.empty():
            self.events.get_nowait()
        await self.send("Page.navigate", url=url)
        deadline = time.monotonic() + timeout
        while True:
            event = await asyncio.wait_for(self.events.get(), max(0.1, deadline - time.monotonic()))
            if event["method"] == "Page.loadEventFired":
                return

    async def evaluate(self, expression: str):
        result = await self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        return result.get("result", {}).get("value")

    async def wait_for(self, expression: str, timeout: float = 15) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if await self.evaluate(expression):
                return True
            await asyncio.sleep(0.1)
        return False

    async def screenshot(self, path: Path) -> None:
        # The viewport (1400x1500: the chart and the first rows); a full page of 1,680 rows is ~7 MB.
        result = await self.send("Page.captureScreenshot", format="png")
        path.write_bytes(base64.b64decode(result["data"]))

    async def close(self) -> None:
        self.reader.cancel()
        await self.ws.close()


class Browser:
    def __init__(self, profile: Path) -> None:
        assert CHROMIUM, "Chromium is missing: apt-get install chromium (.ci/run does)"
        self.proc = subprocess.Popen([
            CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-extensions",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--remote-debugging-port=0", "--remote-debugging-address=127.0.0.1", f"--user-data-dir={profile}",
            "--window-size=1400,1500", "about:blank",
        ], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.endpoint = None
        deadline = time.monotonic() + 30
        for line in self.proc.stderr:
            if m := re.search(r"DevTools listening on (ws://\S+)", line):
                self.endpoint = m.group(1)
                break
            if time.monotonic() > deadline:
                break
        assert self.endpoint, "Chromium did not open its DevTools endpoint"
        self.http = "http://" + self.endpoint.split("/")[2]

    async def page(self, session: aiohttp.ClientSession, authorization: str | None = None) -> Page:
        async with session.put(f"{self.http}/json/new?about:blank") as r:
            target = await r.json(content_type=None)
        ws = await session.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=64 * 2**20)
        page = Page(ws)
        for domain in ("Page", "Runtime", "Log", "Network"):
            await page.send(f"{domain}.enable")
        await page.send("Emulation.setDeviceMetricsOverride", width=1400, height=1500, deviceScaleFactor=1,
                        mobile=False)
        if authorization:
            await page.send("Network.setExtraHTTPHeaders", headers={"Authorization": authorization})
        return page

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


def dashboard_links() -> list[tuple[str, str]]:
    """(name, relative URL) of every link on the dashboard home, in order."""
    links = re.findall(r'<a href="([^"]+)">([^<]+)</a>', METADATA["description_html"])
    # The dashboard home is a page of charts, not rows: tests/test_dashboard_home_browser.py.
    return [(text, href.replace("&amp;", "&")) for href, text in links if not href.startswith("-/dashboards")]


@pytest.fixture(scope="module")
def dashboard(tmp_path_factory):
    bench = load_bench("dashboard")
    home = tmp_path_factory.mktemp("dashboard-browser")
    bench.generate(home / "projectionist.db", 40_000, days=14, plays=80)
    with bench.running_dashboard(home) as (base, session):
        config = Config(home=home, rules_path=REPO / "rules.yaml", datasette_metadata=REPO / "datasette_metadata.yml")
        yield base, f"{ADMIN_USER}:{admin_password(config)}"


def test_the_error_collector_sees_errors(dashboard, tmp_path):
    """A page that throws and logs an error, a 404 and a failed load: each is reported."""
    base, credentials = dashboard
    page_html = ("<script>console.error('deliberate console error');"
                 "setTimeout(() => { throw new Error('deliberate exception'); }, 0);</script>")
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]

    async def run() -> list[str]:
        browser = Browser(tmp_path / "profile")
        try:
            async with aiohttp.ClientSession() as session:
                page = await browser.page(session, "Basic " + base64.b64encode(credentials.encode()).decode())
                await page.goto("data:text/html," + page_html)
                await asyncio.sleep(0.5)
                await page.goto(base + "/projectionist/no_such_table")
                await page.send("Page.navigate", url=f"http://127.0.0.1:{dead_port}/")
                await asyncio.sleep(1)
                errors = list(page.errors)
                await page.close()
                return errors
        finally:
            browser.close()

    errors = "\n".join(asyncio.run(run()))
    assert "deliberate console error" in errors
    assert "deliberate exception" in errors
    assert "HTTP 404: " + base + "/projectionist/no_such_table" in errors
    assert "ERR_CONNECTION_REFUSED" in errors


def test_dashboard_pages_render_their_charts_without_errors(dashboard, tmp_path):
    base, credentials = dashboard
    authorization = "Basic " + base64.b64encode(credentials.encode()).decode()
    links = dashboard_links()
    assert len(links) >= 19, links
    ARTIFACTS.mkdir(parents=True, exist_ok=True)

    async def run() -> dict[str, list[str]]:
        problems: dict[str, list[str]] = {}
        browser = Browser(tmp_path / "profile")
        try:
            async with aiohttp.ClientSession() as session:
                page = await browser.page(session, authorization)
                pages = [("home", "/"), *((text, "/" + href) for text, href in links)]
                for index, (title, url) in enumerate(pages):
                    page.errors.clear()
                    await page.goto(base + url)
                    found = []
                    if "#g." in url:
                        # datasette-vega draws into .vega-embed once it has fetched the rows.
                        if not await page.wait_for("!!document.querySelector('.vega-embed canvas, .vega-embed svg')"):
                            found.append("no chart was drawn")
                    else:
                        await page.wait_for("document.readyState === 'complete'")
                    rows = await page.evaluate("document.querySelectorAll('table.rows-and-columns tbody tr').length")
                    if url != "/" and not rows:
                        found.append("no rows on the page")
                    await asyncio.sleep(0.2)  # late console messages
                    slug = re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")
                    await page.screenshot(ARTIFACTS / f"{index:02d}-{slug}.png")
                    found += page.errors
                    if found:
                        problems[f"{title} ({url})"] = found
                await page.close()
        finally:
            browser.close()
        return problems

    problems = asyncio.run(run())
    assert not problems, json.dumps(problems, indent=2)
    assert len(list(ARTIFACTS.glob("*.png"))) >= len(links) + 1


def test_without_credentials_the_browser_gets_a_login_prompt_only(dashboard, tmp_path):
    base, _ = dashboard

    async def run() -> tuple[str, int]:
        browser = Browser(tmp_path / "profile")
        try:
            async with aiohttp.ClientSession() as session:
                page = await browser.page(session)
                statuses = []
                await page.send("Page.navigate", url=base + "/projectionist/usage_per_user")
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline and not statuses:
                    event = await asyncio.wait_for(page.events.get(), 10)
                    if event["method"] == "Network.responseReceived":
                        statuses.append(event["params"]["response"]["status"])
                await asyncio.sleep(0.5)
                text = await page.evaluate("document.body ? document.body.innerText : ''")
                await page.close()
                return text or "", statuses[0]
        finally:
            browser.close()

    text, status = asyncio.run(run())
    assert status == 401
    assert "alice" not in text and "requests" not in text.lower()
