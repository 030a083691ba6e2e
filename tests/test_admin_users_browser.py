"""The settings page's Users section in headless Chromium: an admin sees who signed in and disables
a user with one click; that user's session ends at once, and "Enable" lets them back in."""

from __future__ import annotations

import dataclasses

import aiohttp
import pytest
from support import free_port, write_test_rules
from test_control_browser import AppPlexTv, DevTools, start_chromium
from test_jobs import Admin, control_plane
from test_jobs_browser import _signed_in_page

from fake_upstreams.data import PLEX_ACCOUNT_TOKEN, PLEX_ACCOUNT_TOKEN_2

pytestmark = [pytest.mark.e2e, pytest.mark.browser]


async def test_admin_disables_and_enables_a_user_from_the_settings_page(tmp_path, fakes):
    (tmp_path / "home").mkdir()
    write_test_rules(tmp_path / "home" / "rules.yaml", free_port())
    control = control_plane(tmp_path / "home", fakes)
    control.options = dataclasses.replace(control.options, public_origin=control.url)
    with control:
        async with AppPlexTv(fakes, PLEX_ACCOUNT_TOKEN) as app_plex_tv:
            browser, ws_url = await start_chromium(tmp_path / "profile", app_plex_tv.port, tmp_path / "chromium.log")
            try:
                async with aiohttp.ClientSession() as session, session.ws_connect(ws_url, max_msg_size=0) as ws:
                    page = DevTools(ws)
                    await _signed_in_page(page, control.url)  # the owner: the admin
                    friend = Admin(control, fakes, PLEX_ACCOUNT_TOKEN_2)  # a second user, signed in elsewhere
                    assert friend.get("/api/auth/session").status_code == 200
                    # Without a session the list is refused; the admin's page shows it.
                    assert friend.get("/api/admin/users").status_code == 403
                    await page.evaluate("loadUsers()")
                    await page.wait_for("document.getElementById('users-table').dataset.loaded", what="users")
                    rows = await page.evaluate(
                        "[...document.querySelectorAll('#users-table tr')].map(r => [r.id, r.cells[0].textContent])")
                    friend_row = next(row_id for row_id, name in rows if name == "trinity_k")
                    friend_id = friend_row.split("-", 1)[1]
                    await page.click(f"toggle-{friend_id}")
                    await page.wait_for(f"document.querySelector('#user-{friend_id} .user-status')"
                                        ".textContent === 'disabled'", what="the user disabled")
                    assert "1 session(s)" in await page.text("users-message")
                    assert friend.get("/api/auth/session").status_code == 401
                    await page.click(f"toggle-{friend_id}")
                    await page.wait_for(f"document.querySelector('#user-{friend_id} .user-status')"
                                        ".textContent === 'active'", what="the user enabled")
                    assert Admin(control, fakes, PLEX_ACCOUNT_TOKEN_2).get("/api/auth/session").status_code == 200
            finally:
                browser.terminate()
                browser.wait(10)
