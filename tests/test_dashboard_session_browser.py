"""One sign-in in Chromium (issue 19): a person signs in with Plex on the control plane's page and
opens the dashboard in the same browser: Datasette, no password prompt; signing out on the control
plane's page and reloading the dashboard shows the sign-in link instead. A user who is not an admin
sees the 403 page. The browser is driven over DevTools as in tests/test_control_browser.py."""

from __future__ import annotations

import base64
import contextlib
from pathlib import Path

import aiohttp
import pytest
from test_control_browser import AppPlexTv, DevTools, start_chromium

from fake_upstreams.data import PLEX_ACCOUNT_TOKEN, PLEX_ACCOUNT_TOKEN_2

pytestmark = [pytest.mark.e2e, pytest.mark.browser]

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts" / "dashboard"


@contextlib.asynccontextmanager
async def browser_page(stack, tmp_path, account_token: str):
    """A fresh Chromium whose app.plex.tv approves sign-ins as `account_token`'s user."""
    async with AppPlexTv(stack.fakes, account_token) as app_plex_tv:
        browser, ws_url = await start_chromium(tmp_path / "profile", app_plex_tv.port, tmp_path / "chromium.log")
        try:
            async with aiohttp.ClientSession() as session, session.ws_connect(ws_url, max_msg_size=0) as ws:
                yield DevTools(ws)
        finally:
            browser.terminate()
            browser.wait(10)


async def _sign_in(page: DevTools, stack, username: str) -> None:
    await page.send("Page.navigate", url=stack.control_url + "/")
    await page.wait_for("document.body && document.body.dataset.ready === 'true'", what="the settings page")
    await page.click("login-button")
    await page.wait_for(f"document.getElementById('username') && "
                        f"document.getElementById('username').textContent === {username!r}", what="signed in")


async def _open(page: DevTools, url: str, expression: str, what: str) -> str:
    await page.send("Page.navigate", url=url)
    try:
        await page.wait_for(expression, what=what)
    except AssertionError as exc:
        shown = await page.evaluate("location.href + ' ' + document.documentElement.outerHTML")
        raise AssertionError(f"{exc}; the page says: {shown[:600]!r}") from None
    return await page.evaluate("document.body.innerText")


async def _screenshot(page: DevTools, path) -> None:
    shot = await page.send("Page.captureScreenshot", format="png")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(base64.b64decode(shot["data"]))


async def test_an_admin_signed_in_with_plex_opens_the_dashboard_and_signing_out_closes_it(stack, tmp_path, clean_fakes):
    async with browser_page(stack, tmp_path, PLEX_ACCOUNT_TOKEN) as page:
        signed_out = await _open(page, stack.dashboard_url + "/projectionist",
                                 "!!document.querySelector('h1')", "the dashboard's sign-in page")
        assert "Sign in with Plex" in signed_out and "usage_events" not in signed_out

        await _sign_in(page, stack, "mrandersson")
        text = await _open(page, stack.dashboard_url + "/projectionist",
                           "!!document.querySelector('a[href$=\"/usage_events\"]')", "the database page")
        assert "Sign in with Plex" not in text
        assert await page.evaluate("fetch('/-/actor.json').then(r => r.json()).then(j => j.actor.id)") == "admin"
        await _screenshot(page, ARTIFACTS / "one-sign-in.png")
        # Secret tables stay denied in the browser too.
        assert await page.evaluate("fetch('/projectionist/sessions.json').then(r => r.status)") == 403

        await page.send("Page.navigate", url=stack.control_url + "/")
        await page.wait_for("document.getElementById('logout-button') && "
                            "!document.getElementById('logout-button').closest('[hidden]')", what="the page")
        await page.click("logout-button")
        await page.wait_for("document.getElementById('signed-out').hidden === false", what="signed out")
        after = await _open(page, stack.dashboard_url + "/projectionist", "!!document.querySelector('h1')",
                            "the dashboard after signing out")
        assert "Sign in with Plex" in after and "usage_events" not in after


async def test_a_user_who_is_not_an_admin_sees_the_403_page(stack, tmp_path, clean_fakes):
    async with browser_page(stack, tmp_path, PLEX_ACCOUNT_TOKEN_2) as page:
        await _sign_in(page, stack, "trinity_k")
        text = await _open(page, stack.dashboard_url + "/", "!!document.querySelector('h1')", "the 403 page")
        assert "Admins only" in text and "trinity_k" in text and "usage_events" not in text
