"""The settings page's Jobs section in headless Chromium: an admin sees every job with its schedule,
starts one with "Run now" and sees it end; a user who is not an admin never sees the section."""

from __future__ import annotations

import dataclasses

import aiohttp
import pytest
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
