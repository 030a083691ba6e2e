"""The dashboard home (/-/dashboards/home, datasette-dashboards) as the admin sees it, in headless
Chromium, after real traffic through the stack: every declared chart is drawn with data on the
first load (Vega's SVG marks are counted, not just the HTML around them), the big-number tiles show
numbers, the page is free of errors, and choosing another date range in the filter form redraws
them from other rows. Screenshots go to test-artifacts/dashboard-home/."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import sqlite3
import time
from pathlib import Path

import aiohttp
import pytest
import requests
import yaml

from support import wait_for
from test_dashboard_browser import Browser

pytestmark = [pytest.mark.browser, pytest.mark.e2e]

REPO = Path(__file__).resolve().parent.parent
ARTIFACTS = REPO / "test-artifacts" / "dashboard-home"
HOME = yaml.safe_load((REPO / "datasette_metadata.yml").read_text())["plugins"]["datasette-dashboards"]["home"]
CHARTS = {slug: chart for slug, chart in HOME["charts"].items() if chart["library"] == "vega-lite"}
TILES = {slug: chart for slug, chart in HOME["charts"].items() if chart["library"] == "metric"}

# Data marks only (Vega's SVG puts axes, legends and titles in other role-* groups).
MARKS_JS = """(() => {
  const out = {};
  for (const card of document.querySelectorAll('.dashboard-card-chart')) {
    const slug = card.id.replace(/^chart-/, '');
    const svg = card.querySelector('svg');
    out[slug] = {svg: !!svg, marks: svg ? svg.querySelectorAll('g.role-mark > path, g.role-mark > rect').length : 0,
                 text: card.innerText.trim()};
  }
  return out;
})()"""


def play_traffic(stack) -> None:
    """What a player does: metadata (twice: a miss, then a hit), a play reported by timeline
    updates, and a request for an item the server does not have (a 404)."""
    from fake_upstreams.data import PLEX_SERVER_TOKEN

    session = requests.Session()
    session.trust_env = False
    token = {"X-Plex-Token": PLEX_SERVER_TOKEN, "X-Plex-Client-Identifier": "e2e-dashboard-home",
             "X-Plex-Product": "Dashboard Home Player"}
    json_accept = {"Accept": "application/json"}
    for key in ("1001", "1001", "1002"):
        assert session.get(f"{stack.plex_url}/library/metadata/{key}", params=token, headers=json_accept,
                           timeout=10).status_code == 200
    assert session.get(f"{stack.plex_url}/library/metadata/999999", params=token, headers=json_accept,
                       timeout=10).status_code == 404
    for i, state in enumerate(["playing"] * 4 + ["stopped"]):
        r = session.get(f"{stack.plex_url}/:/timeline", params={**token, "ratingKey": "1001", "state": state,
                                                               "time": str(i * 1000), "duration": "8160000"},
                        timeout=10)
        assert r.status_code == 200, r.text
    conn = sqlite3.connect(f"file:{stack.db_path}?mode=ro", uri=True, timeout=10)
    try:
        wait_for(lambda: conn.execute("SELECT 1 FROM play_history WHERE player = 'Dashboard Home Player' "
                                      "AND state = 'stopped'").fetchone(), timeout=10, what="the play recorded")
    finally:
        conn.close()


def test_dashboard_home_draws_every_chart_and_follows_the_date_filter(stack, tmp_path):
    play_traffic(stack)
    password = (stack.home / "dashboard-password").read_text().strip()
    authorization = "Basic " + base64.b64encode(f"admin:{password}".encode()).decode()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    today = time.strftime("%Y-%m-%d", time.gmtime())

    async def all_drawn(page, expect_data: bool) -> dict:
        def done(state: dict) -> bool:
            if set(state) != set(HOME["charts"]):
                return False
            tiles = all(re.search(r"\d", state[s]["text"] or "") for s in TILES)
            charts = all(state[s]["svg"] and (state[s]["marks"] > 0) == expect_data for s in CHARTS)
            return tiles and charts
        deadline = time.monotonic() + 20
        while True:
            state = await page.evaluate(MARKS_JS) or {}
            if done(state) or time.monotonic() > deadline:
                return state
            await asyncio.sleep(0.2)

    async def run() -> tuple:
        browser = Browser(tmp_path / "profile")
        try:
            async with aiohttp.ClientSession() as session:
                page = await browser.page(session, authorization)
                # Tall enough for the whole home in one screenshot.
                await page.send("Emulation.setDeviceMetricsOverride", width=1400, height=2600, deviceScaleFactor=1,
                                mobile=False)
                # Reached from the dashboard's index page, as a person would.
                await page.goto(stack.dashboard_url + "/")
                href = await page.evaluate(
                    "(document.querySelector('a[href$=\"-/dashboards/home\"]') || {}).href || ''")
                assert href, "the index page has no link to the dashboard home"
                page.errors.clear()
                await page.goto(href)
                first = await all_drawn(page, expect_data=True)
                await asyncio.sleep(0.3)  # late console messages
                await page.screenshot(ARTIFACTS / "home.png")
                first_errors = list(page.errors)
                # Another range, chosen in the filter form: a day long before any traffic.
                page.errors.clear()
                await page.evaluate("document.querySelector('#since').value = '2020-01-01';"
                                    "document.querySelector('#until').value = '2020-01-02';"
                                    "document.querySelector('.dashboard-filters input[type=submit]').click(); true")
                deadline = time.monotonic() + 10
                while "since=2020-01-01" not in (await page.evaluate("location.search") or ""):
                    assert time.monotonic() < deadline, "the filter form did not navigate"
                    await asyncio.sleep(0.1)
                await page.wait_for("document.readyState === 'complete'")
                second = await all_drawn(page, expect_data=False)
                await page.screenshot(ARTIFACTS / "home-2020-01-01.png")
                # And back to today only: the charts have rows again.
                await page.goto(f"{href}?since={today}&until=&upstream=&user=")
                third = await all_drawn(page, expect_data=True)
                await page.screenshot(ARTIFACTS / "home-today.png")
                errors = first_errors + list(page.errors)
                await page.close()
                return first, second, third, errors
        finally:
            browser.close()

    first, second, third, errors = asyncio.run(run())
    report = json.dumps({"first": first, "second": second, "third": third}, indent=1)
    assert not errors, "\n".join(errors)
    assert set(first) == set(HOME["charts"]), report
    for slug in CHARTS:
        assert first[slug]["svg"] and first[slug]["marks"] > 0, f"{slug} drew no marks on first load\n{report}"
        assert second[slug]["svg"] and second[slug]["marks"] == 0, f"{slug} ignored the date filter\n{report}"
        assert third[slug]["marks"] > 0, f"{slug} drew no marks for today\n{report}"
    for slug in TILES:
        assert re.search(r"\d", first[slug]["text"]), f"tile {slug} shows no number\n{report}"
    # The tiles follow the range too: plays today, then none on 2020-01-01.
    assert int(first["plays-today"]["text"]) >= 1 and second["plays-today"]["text"] == "0", report
    assert second["errors"]["text"] == "0" and second["hit-ratio"]["text"] == "- %", report
    assert len(list(ARTIFACTS.glob("*.png"))) >= 3


LIVE_ROWS_JS = """[...document.querySelectorAll('#chart-playing-now tbody tr')]
  .map(r => [...r.cells].map(c => c.textContent.trim()).join('|'))"""


def test_playing_now_follows_the_players_timeline_without_a_reload(stack, tmp_path):
    """A player's timeline reports through the proxy: the dashboard home's "Playing now" card shows
    the play (title, state, progress, client), redraws it in place when the player pauses, and drops
    it when the player stops, the page never reloaded; no error on the page."""
    from fake_upstreams.data import PLEX_SERVER_TOKEN

    session = requests.Session()
    session.trust_env = False
    params = {"X-Plex-Token": PLEX_SERVER_TOKEN, "X-Plex-Client-Identifier": "e2e-live-card",
              "X-Plex-Product": "Live Card Player", "X-Plex-Device-Name": "Chromium", "ratingKey": "1002",
              "key": "/library/metadata/1002", "duration": "8160000"}

    def report(state: str, at_ms: int) -> None:
        r = session.get(f"{stack.plex_url}/:/timeline", params={**params, "state": state, "time": str(at_ms)},
                        timeout=10)
        assert r.status_code == 200, r.text

    password = (stack.home / "dashboard-password").read_text().strip()
    authorization = "Basic " + base64.b64encode(f"admin:{password}".encode()).decode()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    ours = "r.includes('Live Card Player / Chromium')"

    async def run() -> list[str]:
        browser = Browser(tmp_path / "profile")
        try:
            async with aiohttp.ClientSession() as http:
                page = await browser.page(http, authorization)
                await asyncio.to_thread(report, "playing", 61000)
                await page.goto(stack.dashboard_url + "/-/dashboards/home")
                assert await page.wait_for(f"{LIVE_ROWS_JS}.some(r => {ours})", timeout=15), \
                    await page.evaluate("document.getElementById('chart-playing-now').innerText")
                row = next(r for r in await page.evaluate(LIVE_ROWS_JS) if "Live Card Player" in r)
                user, title, state, progress, delivery, client, last = row.split("|")
                assert (state, progress, client) == ("playing", "1:01 / 2:16:00", "Live Card Player / Chromium"), row
                assert title and title != "unknown" and last.endswith("s ago"), row
                await page.evaluate("window.notReloaded = true")
                await asyncio.to_thread(report, "paused", 600000)
                assert await page.wait_for(f"{LIVE_ROWS_JS}.some(r => {ours} && r.includes('|paused|10:00 / 2:16:00|'))",
                                           timeout=15), await page.evaluate(LIVE_ROWS_JS)
                await page.screenshot(ARTIFACTS / "playing-now.png")
                await asyncio.to_thread(report, "stopped", 601000)
                assert await page.wait_for(f"!{LIVE_ROWS_JS}.some(r => {ours})", timeout=15), \
                    await page.evaluate(LIVE_ROWS_JS)
                assert await page.evaluate("window.notReloaded") is True
                errors = list(page.errors)
                await page.close()
                return errors
        finally:
            browser.close()

    errors = asyncio.run(run())
    assert not errors, "\n".join(errors)
