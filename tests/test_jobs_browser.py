"""The settings page's Jobs section in headless Chromium: an admin sees every job with its schedule,
starts one with "Run now" and sees it end; a user who is not an admin never sees the section."""

from __future__ import annotations

import dataclasses

import aiohttp
import pytest
import yaml
from support import free_port, write_test_rules
from test_control_browser import AppPlexTv, DevTools, start_chromium
from test_jobs import control_plane

from fake_upstreams.data import PLEX_ACCOUNT_TOKEN, PLEX_ACCOUNT_TOKEN_2

pytestmark = [pytest.mark.e2e, pytest.mark.browser]


async def _signed_in_page(page: DevTools, url: str) -> None:
    await page.send("Page.navigate", url=url + "/")
    await page.wait_for("document.body && document.body.dataset.ready === 'true'", what="the page")
    await page.click("login-button")
    await page.wait_for("document.getElementById('signed-in').hidden === false", what="the signed-in page")


async def test_admin_runs_a_job_from_the_settings_page(tmp_path, fakes):
    (tmp_path / "home").mkdir()
    write_test_rules(tmp_path / "home" / "rules.yaml", free_port())
    control = control_plane(tmp_path / "home", fakes)
    # Plex sends the browser back to the configured origin (PROJECTIONIST_CONTROL_URL): this one's.
    control.options = dataclasses.replace(control.options, public_origin=control.url)
    with control:
        for token, admin in ((PLEX_ACCOUNT_TOKEN, True), (PLEX_ACCOUNT_TOKEN_2, False)):
            async with AppPlexTv(fakes, token) as app_plex_tv:
                profile = tmp_path / f"profile-{admin}"
                browser, ws_url = await start_chromium(profile, app_plex_tv.port, tmp_path / f"chromium-{admin}.log")
                try:
                    async with aiohttp.ClientSession() as session, session.ws_connect(ws_url, max_msg_size=0) as ws:
                        page = DevTools(ws)
                        await _signed_in_page(page, control.url)
                        if not admin:
                            await page.wait_for("document.getElementById('tmdb-status').textContent !== ''")
                            assert await page.evaluate("document.getElementById('jobs').hidden") is True
                            continue
                        await page.wait_for("document.getElementById('jobs-table').dataset.loaded", what="jobs")
                        names = await page.evaluate(
                            "[...document.querySelectorAll('#jobs-table tr')].map(r => r.cells[0].textContent)")
                        assert {"retention", "cache-cleanup", "trakt-refresh", "backup", "library-sync"} <= set(names)
                        assert "cron 15 4 * * *" in await page.text("job-backup")
                        await page.click("run-library-sync")
                        await page.wait_for("document.querySelector('#job-library-sync .job-status')"
                                            ".textContent.startsWith('ok')", timeout=60, what="the run to end")
                        items = await page.evaluate("document.getElementById('job-library-sync').cells[4].textContent")
                        assert int(items) == 13  # the fake library, read with the admin's vaulted token
                        assert "Started library-sync" in await page.text("jobs-message")
                finally:
                    browser.terminate()
                    browser.wait(10)


async def test_watchlist_sync_setting_and_a_bad_rules_edit_on_the_settings_page(tmp_path, fakes):
    """A user opts in to the watchlist sync from the Trakt section (kept across a reload); an
    admin whose rules.yaml edit is invalid sees its line-numbered error above the running jobs."""
    home = tmp_path / "home"
    home.mkdir()
    write_test_rules(home / "rules.yaml", free_port())
    control = control_plane(home, fakes)
    control.options = dataclasses.replace(control.options, public_origin=control.url)
    with control:
        async with AppPlexTv(fakes, PLEX_ACCOUNT_TOKEN) as app_plex_tv:
            browser, ws_url = await start_chromium(tmp_path / "profile", app_plex_tv.port, tmp_path / "chromium.log")
            try:
                async with aiohttp.ClientSession() as session, session.ws_connect(ws_url, max_msg_size=0) as ws:
                    page = DevTools(ws)
                    await _signed_in_page(page, control.url)
                    await page.wait_for("document.getElementById('jobs-table').dataset.loaded", what="jobs")
                    assert await page.evaluate("document.getElementById('jobs-problem').hidden") is True
                    assert await page.evaluate("document.getElementById('watchlist-sync').value") == "off"
                    await page.evaluate("(() => { const s = document.getElementById('watchlist-sync');"
                                        " s.value = 'dry-run'; s.dispatchEvent(new Event('change')); })()")
                    await page.wait_for("document.getElementById('watchlist-message').textContent"
                                        ".startsWith('Saved')", what="the setting saved")
                    assert "once Trakt is connected" in await page.text("watchlist-message")

                    rules = yaml.safe_load((home / "rules.yaml").read_text())
                    rules["jobs"] = {"backup": {"every": "soon"}}
                    text = yaml.safe_dump(rules, sort_keys=False)
                    (home / "rules.yaml").write_text(text)
                    line = next(n for n, t in enumerate(text.splitlines(), 1) if "every: soon" in t)
                    await page.click("jobs-refresh")
                    await page.wait_for("!document.getElementById('jobs-problem').hidden", what="the rules problem")
                    problem = await page.text("jobs-problem")
                    assert f":{line}:" in problem and "jobs.backup.every" in problem, problem
                    assert "cron 15 4 * * *" in await page.text("job-backup")  # the running schedule

                    await _signed_in_page(page, control.url)  # a fresh load shows what was stored
                    await page.wait_for("document.getElementById('tmdb-status').textContent !== ''")
                    assert await page.evaluate("document.getElementById('watchlist-sync').value") == "dry-run"
            finally:
                browser.terminate()
                browser.wait(10)
