"""One sign-in (issue 19): the control plane's Plex session admits its admins to the dashboard,
through the whole stack as `projectionist run` starts it. The session cookie is the control plane's
(127.0.0.1, any port: cookies are scoped by host), sent by a real client: requests' cookie jar here,
Chromium in tests/test_dashboard_session_browser.py."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import requests
from test_jobs import Admin

from fake_upstreams.data import PLEX_ACCOUNT_TOKEN_2

pytestmark = pytest.mark.e2e

HTML = {"Accept": "text/html,application/xhtml+xml"}


def test_an_admins_plex_session_opens_the_dashboard_and_signing_out_closes_it(stack, clean_fakes):
    admin = Admin(SimpleNamespace(url=stack.control_url), clean_fakes)
    dashboard = stack.dashboard_url
    actor = admin.session.get(dashboard + "/-/actor.json", timeout=30)
    assert actor.status_code == 200 and actor.json()["actor"]["id"] == "admin", actor.text
    assert actor.json()["actor"]["username"] == "mrandersson"
    rows = admin.session.get(dashboard + "/projectionist/usage_events.json?_size=1", timeout=30)
    assert rows.status_code == 200 and "rows" in rows.json()
    page = admin.session.get(dashboard + "/projectionist", headers=HTML, timeout=30)
    assert page.status_code == 200 and "usage_events" in page.text
    # Secret tables stay denied to the admin, whichever way they signed in.
    for table in ("sessions", "vault_tokens", "users"):
        assert admin.session.get(f"{dashboard}/projectionist/{table}.json", timeout=30).status_code == 403, table

    assert admin.post("/api/auth/logout").status_code == 200
    after = admin.session.get(dashboard + "/projectionist/usage_events.json", timeout=30)
    assert after.status_code == 401 and after.headers["WWW-Authenticate"].startswith("Basic")
    assert "rows" not in after.text


def test_a_signed_in_user_who_is_not_an_admin_gets_a_403_that_says_so(stack, clean_fakes):
    friend = Admin(SimpleNamespace(url=stack.control_url), clean_fakes, token=PLEX_ACCOUNT_TOKEN_2)
    assert friend.get("/api/auth/session").json()["user"]["is_admin"] is False
    for path in ("/", "/projectionist", "/projectionist/usage_events.json", "/-/actor.json"):
        refused = friend.session.get(stack.dashboard_url + path, headers=HTML, timeout=30)
        assert refused.status_code == 403 and "not an admin" in refused.text, (path, refused.status_code)
        assert "usage_events" not in refused.text and "rows" not in refused.text


def test_without_a_session_a_browser_is_sent_to_the_plex_sign_in_not_a_password_prompt(stack):
    anonymous = requests.Session()
    anonymous.trust_env = False
    page = anonymous.get(stack.dashboard_url + "/projectionist", headers=HTML, timeout=30)
    assert page.status_code == 401 and "WWW-Authenticate" not in page.headers  # no browser password dialog
    assert "Sign in with Plex" in page.text and f'href="{stack.control_url}/"' in page.text
    # A forged, truncated or unknown session id is nobody's.
    for cookie in ("x" * 43, "not-a-session", ""):
        forged = anonymous.get(stack.dashboard_url + "/projectionist/usage_events.json",
                               cookies={"pj_session": cookie}, timeout=30)
        assert forged.status_code == 401 and "rows" not in forged.text
    # The dashboard password still works (scripts, and the fallback).
    password = (stack.home / "dashboard-password").read_text().strip()
    assert anonymous.get(stack.dashboard_url + "/-/actor.json", auth=("admin", password),
                         timeout=30).json()["actor"]["id"] == "admin"
    wrong = anonymous.get(stack.dashboard_url + "/-/actor.json", auth=("admin", "wrong"), timeout=30)
    assert wrong.status_code == 401
