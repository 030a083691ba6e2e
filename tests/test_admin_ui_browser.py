"""The admin pages in headless Chromium, through the real stack (proxy, control plane, fakes).

A friend's player plays through the proxy; the admin sees it on the overview's live activity, with
the health of each upstream and the day's numbers, then disables the friend on the users page and
the friend's next player request gets Plex's 401. A browser with no session gets a page linking to
the sign-in, a user who is not an admin a 403 page. A screenshot of each page goes to
test-artifacts/admin-ui/.
"""

from __future__ import annotations

import asyncio
import base64
import json
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from pathlib import Path
from types import SimpleNamespace

import aiohttp
import pytest
import requests
from support import REPO, make_stack, wait_for, write_test_rules
from test_control_browser import AppPlexTv, DevTools, start_chromium
from test_e2e_credentials import RecordingClient
from test_jobs import Admin
from test_jobs_browser import _signed_in_page

from fake_upstreams.data import PLEX_ACCOUNT_TOKEN, PLEX_ACCOUNT_TOKEN_2, PLEX_ACCOUNT_TOKEN_STRANGER

pytestmark = [pytest.mark.e2e, pytest.mark.browser]

ARTIFACTS = REPO / "test-artifacts" / "admin-ui"


@pytest.fixture
def own_stack(fakes, tmp_path):
    """A stack of its own: this test disables a user and decides who signs in first (the admin)."""
    stack = make_stack(tmp_path / "home", fakes).start()
    try:
        yield stack
    finally:
        assert stack.stop() == 0, stack.logs()


@pytest.fixture
def limited_stack(fakes, tmp_path):
    """A stack whose default TMDB key has a tight budget: a burst of requests queues, then is refused."""
    stack = make_stack(tmp_path / "home", fakes)

    def tight(rules: dict) -> None:
        rules["limits"]["tmdb-default"].update({"rate": "2/s", "burst": 1, "max_wait": 2})
    write_test_rules(stack.rules_path, stack.plex_port, tight)
    stack.start()
    try:
        yield stack
    finally:
        assert stack.stop() == 0, stack.logs()


async def screenshot(page: DevTools, name: str) -> Path:
    shot = await page.send("Page.captureScreenshot", format="png", captureBeyondViewport=True)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    path.write_bytes(base64.b64decode(shot["data"]))
    return path


UNNAMED_CONTROLS = """[...document.querySelectorAll('a[href], button, input, select, textarea')]
  .filter(e => !e.closest('[hidden]'))
  .filter(e => !(e.labels && e.labels.length) && !e.getAttribute('aria-label') && !e.textContent.trim())
  .map(e => e.id || e.outerHTML.slice(0, 80))"""


async def check_keyboard_basics(page: DevTools) -> None:
    """Every visible control has a name (label, aria-label or text); Tab reaches the skip link first,
    and keyboard focus is drawn."""
    assert await page.evaluate(UNNAMED_CONTROLS) == []
    await page.evaluate("document.activeElement && document.activeElement.blur()")
    for kind in ("keyDown", "keyUp"):
        await page.send("Input.dispatchKeyEvent", type=kind, key="Tab", code="Tab", windowsVirtualKeyCode=9)
    focused = await page.evaluate("(() => { const e = document.activeElement; const s = getComputedStyle(e);"
                                  " return [e.tagName, e.textContent.trim(), s.outlineStyle, s.outlineWidth]; })()")
    assert focused[0] in ("A", "BUTTON") and focused[2:] == ["solid", "3px"], focused
    assert await page.evaluate("document.querySelector('a[href], button, input, select').className") == "skip"
    await page.send("Input.dispatchKeyEvent", type="keyDown", key="Escape", code="Escape")


async def open_tab(page: DevTools, url: str) -> None:
    await page.send("Page.navigate", url=url)
    await page.wait_for("document.body && document.body.dataset.ready === 'true'", what=f"the page {url}")


def rows(table: str) -> str:
    """JS: the text of each row of a table body, cells joined by |."""
    return (f"[...document.querySelectorAll('#{table} tr')]"
            ".map(r => [...r.cells].map(c => c.textContent.trim()).join('|'))")


class FriendsPlayer:
    """The friend's player: signed in through the proxy (plex.tv's PIN flow), playing from the listener."""

    def __init__(self, stack) -> None:
        self.client = RecordingClient(stack)
        server = self.client.server(self.client.login(PLEX_ACCOUNT_TOKEN_2))
        self.base, self.token = server["connections"][0]["uri"], server["accessToken"]
        self.headers = {"X-Plex-Token": self.token, "X-Plex-Product": "Admin UI Player", "X-Plex-Device-Name": "Chromium"}

    def get(self, path: str, **kw) -> requests.Response:
        return self.client.request("GET", self.base + path, headers={**self.headers, **kw.pop("headers", {})}, **kw)

    def play(self, rating_key: str = "1001", reports: int = 4) -> None:
        item = self.get(f"/library/metadata/{rating_key}").json()["MediaContainer"]["Metadata"][0]
        part = item["Media"][0]["Part"][0]["key"]
        assert self.get(part, headers={"Range": "bytes=0-1023"}).status_code == 206  # direct play
        for i in range(reports):
            r = self.get("/:/timeline", params={"ratingKey": rating_key, "key": f"/library/metadata/{rating_key}",
                                                "state": "playing", "time": str(60000 + i * 1000),
                                                "duration": str(item["duration"])})
            assert r.status_code == 200, r.text


async def test_admin_pages_overview_and_users(own_stack, tmp_path):
    stack = own_stack
    async with AppPlexTv(stack.fakes, PLEX_ACCOUNT_TOKEN) as app_plex_tv:
        browser, ws_url = await start_chromium(tmp_path / "profile", app_plex_tv.port, tmp_path / "chromium.log")
        try:
            async with aiohttp.ClientSession() as session, session.ws_connect(ws_url, max_msg_size=0) as ws:
                page = DevTools(ws)
                await page.send("Emulation.setDeviceMetricsOverride", width=1280, height=900, deviceScaleFactor=1,
                                mobile=False)
                # Signed out: a page that links to the sign-in, not the admin shell.
                await page.send("Page.navigate", url=stack.control_url + "/admin/users")
                await page.wait_for("!!document.getElementById('sign-in-link')", what="the sign-in link")
                assert await page.evaluate("document.getElementById('sign-in-link').getAttribute('href')") == "/"

                await _signed_in_page(page, stack.control_url)  # the first user: the admin
                await page.wait_for("document.getElementById('tmdb-status').textContent !== ''", what="settings")
                assert await page.evaluate("document.getElementById('admin-link').hidden") is False
                await screenshot(page, "settings")
                friend = Admin(SimpleNamespace(url=stack.control_url), stack.fakes, PLEX_ACCOUNT_TOKEN_2)
                refused = friend.get("/admin")
                assert refused.status_code == 403 and "Admins only" in refused.text
                assert "text/html" in refused.headers["Content-Type"]
                assert friend.get("/api/admin/activity").status_code == 403
                stranger = requests.Session()  # an account the server is not shared with: refused, and counted
                stranger.trust_env = False
                pin = stranger.post(stack.control_url + "/api/auth/plex", timeout=10).json()["pin_id"]
                stack.fakes.plextv.link_pin(pin, account_token=PLEX_ACCOUNT_TOKEN_STRANGER)
                assert stranger.get(f"{stack.control_url}/api/auth/plex/{pin}", timeout=10).status_code == 403
                player = await asyncio.to_thread(FriendsPlayer, stack)
                await asyncio.to_thread(player.play)

                # Overview: the friend's play, live; the health of each upstream; the day's numbers.
                await open_tab(page, stack.control_url + "/admin")
                assert await page.evaluate("document.querySelector('nav a[aria-current=page]').textContent") == "Overview"
                playing = await page.wait_for(
                    f"{rows('activity-table')}.find(r => r.startsWith('trinity_k|The Matrix (1999)|'))",
                    what="the friend's play on the overview")
                user, title, state, progress, delivery, client = playing.split("|")
                assert state == "playing" and delivery == "direct" and client == "Admin UI Player / Chromium"
                assert progress.startswith("1:03 / 2:16:00"), progress  # the last report: 63 s of 8160 s
                await page.wait_for("document.querySelector('#health-plex-plex td.health-status').textContent === 'ok'",
                                    what="the Plex server's check")
                health = dict(r.split("|", 1) for r in await page.evaluate(rows("health-table")))
                assert health["TMDB"].startswith("ok") and health["Database (SQLite)"].startswith("ok"), health
                assert health["Explicit proxy"].startswith(f"ok|127.0.0.1:{stack.proxy_port} accepts"), health
                assert health["Dashboard"].startswith("ok") and health["Plex listener (plex)"].startswith("ok"), health
                await page.wait_for("document.getElementById('today-requests').dataset.loaded")
                assert int(await page.text("today-requests")) > 0
                # Live: another report moves the progress without a reload.
                await asyncio.to_thread(player.get, "/:/timeline", params={
                    "ratingKey": "1001", "key": "/library/metadata/1001", "state": "paused", "time": "600000",
                    "duration": "8160000"})
                await page.wait_for(f"{rows('activity-table')}.some(r => r.includes('|paused|10:00 / 2:16:00'))",
                                    timeout=15, what="the live activity to refresh")
                await check_keyboard_basics(page)
                await screenshot(page, "overview")

                # Users: the friend's sessions and devices; disable them, and their player gets Plex's 401.
                await open_tab(page, stack.control_url + "/admin/users")
                await page.wait_for("document.getElementById('users-table').dataset.loaded", what="users")
                names = await page.evaluate(
                    "Object.fromEntries([...document.querySelectorAll('#users-table tr')]"
                    ".map(r => [r.querySelector('.user-name').textContent, r.id.split('-')[1]]))")
                assert set(names) == {"mrandersson", "trinity_k"}
                friend_id = names["trinity_k"]
                assert await page.evaluate(f"document.getElementById('toggle-{names['mrandersson']}').disabled")
                await page.wait_for("document.getElementById('refusals-table').dataset.loaded", what="refusals")
                assert (await page.evaluate(rows("refusals-table")))[0].startswith("not shared: the Plex server is "
                                                                                   "not shared with the account|1|")
                await page.click(f"sessions-{friend_id}")
                await page.wait_for("document.getElementById('sessions-table').dataset.loaded", what="sessions")
                assert "1 live session(s)" in await page.text("sessions-summary")
                assert await page.evaluate("document.activeElement.id") == "sessions-title"
                await check_keyboard_basics(page)
                await screenshot(page, "users")
                assert player.get("/library/sections").status_code == 200
                await page.click(f"toggle-{friend_id}")
                await page.wait_for(f"document.querySelector('#user-{friend_id} .user-status').textContent === 'disabled'",
                                    what="the friend disabled")
                assert "1 session(s)" in await page.text("users-message")
                denied = await asyncio.to_thread(player.get, "/library/sections")
                assert denied.status_code == 401
                assert denied.text == "<html><head><title>Unauthorized</title></head><body><h1>401 Unauthorized</h1></body></html>"
                assert friend.get("/api/auth/session").status_code == 401
                html = await page.evaluate("document.documentElement.outerHTML")
                assert player.token not in html and json.dumps(PLEX_ACCOUNT_TOKEN_2)[1:-1] not in html
        finally:
            browser.terminate()
            browser.wait(10)


TMDB_URL = "https://api.themoviedb.org/3/movie/603"


async def test_admin_pages_cache_limits_and_jobs(limited_stack, tmp_path):
    stack = limited_stack
    async with AppPlexTv(stack.fakes, PLEX_ACCOUNT_TOKEN) as app_plex_tv:
        browser, ws_url = await start_chromium(tmp_path / "profile", app_plex_tv.port, tmp_path / "chromium.log")
        try:
            async with aiohttp.ClientSession() as session, session.ws_connect(ws_url, max_msg_size=0) as ws:
                page = DevTools(ws)
                await page.send("Emulation.setDeviceMetricsOverride", width=1280, height=900, deviceScaleFactor=1,
                                mobile=False)
                await _signed_in_page(page, stack.control_url)
                player = RecordingClient(stack)  # an anonymous TMDB client: the server's key is lent

                # Cache: a URL cached and hit; flushed from the page; the next request for it is a miss.
                first = await asyncio.to_thread(player.request, "GET", TMDB_URL)
                second = await asyncio.to_thread(player.request, "GET", TMDB_URL)
                assert first.status_code == 200 and "fwd=uri-miss" in first.headers["Cache-Status"]
                assert "; hit" in second.headers["Cache-Status"], second.headers["Cache-Status"]
                await open_tab(page, stack.control_url + "/admin/cache")
                await page.wait_for("document.getElementById('cache-table').dataset.loaded", what="cache stats")
                route = await page.evaluate("document.getElementById('cache-api-tmdb.details').cells[2].textContent")
                assert int(route) >= 1  # the hit, per route
                await page.fill("flush-url", TMDB_URL)
                await page.click("flush-url-button")
                flush_id = int(await page.wait_for("document.getElementById('cache-message').dataset.flushId",
                                                   what="the flush queued"))
                assert "queued" in await page.text("cache-message")

                def applied():
                    with closing(sqlite3.connect(stack.db_path, timeout=10)) as conn:
                        return conn.execute("SELECT flushed FROM cache_flush_requests WHERE id = ? AND applied_at "
                                            "IS NOT NULL", (flush_id,)).fetchone()
                assert (await asyncio.to_thread(wait_for, applied, 10, what="the proxy to apply the flush"))[0] >= 1
                third = await asyncio.to_thread(player.request, "GET", TMDB_URL)
                assert "fwd=uri-miss" in third.headers["Cache-Status"] and "detail=flushed" in third.headers["Cache-Status"]
                # A route flushed from its row.
                await page.click("flush-route-tmdb.details")
                await page.wait_for("document.getElementById('cache-message').textContent.includes('route tmdb.details')",
                                    what="the route flush queued")
                route_flush = int(await page.evaluate("document.getElementById('cache-message').dataset.flushId"))
                with closing(sqlite3.connect(stack.db_path, timeout=10)) as conn:
                    assert conn.execute("SELECT target, value FROM cache_flush_requests WHERE id = ?",
                                        (route_flush,)).fetchone() == ("route", "tmdb.details")
                await page.click("cache-refresh")
                await page.wait_for("document.getElementById('cache-table').rows.length > 0")
                await check_keyboard_basics(page)
                await screenshot(page, "cache")

                # Jobs: "Run now" adds a run to the job's recent runs.
                await open_tab(page, stack.control_url + "/admin/jobs")
                await page.wait_for("document.getElementById('jobs-table').dataset.loaded", what="jobs")
                for _ in range(100):  # a run at start-up may still be going: "Run now" waits for it to end
                    if not await page.evaluate("document.getElementById('run-cache-cleanup').disabled"):
                        break
                    await page.click("jobs-refresh")
                    await asyncio.sleep(0.3)
                before = await page.evaluate("[...document.querySelectorAll('#runs-cache-cleanup li')].map(l => l.dataset.runId)")
                await page.click("run-cache-cleanup")
                await page.wait_for(f"document.querySelectorAll('#runs-cache-cleanup li').length > {len(before)} && "
                                    "document.querySelector('#job-cache-cleanup .job-status').textContent.startsWith('ok')",
                                    timeout=60, what="the new run to end")
                after = await page.evaluate("[...document.querySelectorAll('#runs-cache-cleanup li')].map(l => l.dataset.runId)")
                assert len(after) == len(before) + 1 and after[0] not in before
                assert "manual: ok" in await page.evaluate("document.querySelector('#runs-cache-cleanup li').textContent")
                assert "Started cache-cleanup" in await page.text("jobs-message")
                await check_keyboard_basics(page)
                await screenshot(page, "jobs")

                # Limits: a burst over the default TMDB key's budget: some wait (queued), the last are refused.
                def one(i: int) -> int:
                    return player.request("GET", f"{TMDB_URL}?language=x{i}").status_code
                with ThreadPoolExecutor(8) as pool:
                    statuses = await asyncio.to_thread(lambda: list(pool.map(one, range(8))))
                assert 429 in statuses and 200 in statuses, statuses
                await open_tab(page, stack.control_url + "/admin/limits")
                await page.wait_for("document.getElementById('limits-table').dataset.loaded", what="limits")
                for _ in range(50):
                    cells = await page.evaluate("[...document.getElementById('limit-tmdb-default').cells]"
                                                ".map(c => c.textContent.trim())")
                    if int(cells[8]) and int(cells[9]):
                        break
                    await page.click("limits-refresh")
                    await asyncio.sleep(0.2)
                name, rate, burst, per, max_wait, taken_by = cells[:6]
                assert (rate, burst, per, max_wait) == ("2/s", "1", "credential (default key)", "2 s"), cells
                assert "tmdb" in taken_by.split(", ")
                assert int(cells[8]) >= 1 and int(cells[9]) == statuses.count(429), cells  # queued, refused
                assert int(cells[7]) >= 3  # forwarded: the misses that took a slot
                custom = await page.evaluate("document.getElementById('limit-tmdb-custom').cells[7].textContent")
                assert custom == "0"  # a user's own key's budget: none of these (the server's key) took it
                await check_keyboard_basics(page)
                await screenshot(page, "limits")
        finally:
            browser.terminate()
            browser.wait(10)
