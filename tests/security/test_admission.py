"""Who may sign in, and what an admin can take away (issue 17), through `projectionist run` with
the fakes: the fake plex.tv knows the server's owner, a user it is shared with, and a stranger
who owns a server of their own. The stranger is refused at sign-in (403 JSON and page, counted);
the shared user is admitted; an admin grants admin, lists and revokes sessions, and disables the
shared user, whose player's next request through the proxy gets Plex's 401 and whose control-plane
session is gone, until enabled and signed in again."""

from __future__ import annotations

import sqlite3

import pytest
import requests

from fake_upstreams.data import (
    PLEX_ACCOUNT_TOKEN,
    PLEX_ACCOUNT_TOKEN_2,
    PLEX_ACCOUNT_TOKEN_STRANGER,
    PMS_FRIENDLY_NAME,
)
from support import make_stack
from test_e2e_credentials import RecordingClient, assert_no_secret_in

pytestmark = pytest.mark.e2e


class Browser:
    def __init__(self, stack) -> None:
        self.stack = stack
        self.base = stack.control_url
        self.session = requests.Session()
        self.session.trust_env = False
        self.csrf: str | None = None

    def request(self, method: str, path: str, **kw) -> requests.Response:
        headers = {"Accept": "application/json", "Origin": self.base, **kw.pop("headers", {})}
        if self.csrf:
            headers.setdefault("X-CSRF-Token", self.csrf)
        return self.session.request(method, self.base + path, headers=headers, timeout=30, allow_redirects=False,
                                    **kw)

    def finish_login(self, account_token: str, accept: str = "application/json") -> requests.Response:
        started = self.request("POST", "/api/auth/plex")
        assert started.status_code == 200, started.text
        pin = started.json()["pin_id"]
        self.stack.fakes.plextv.link_pin(pin, account_token=account_token)
        return self.request("GET", f"/api/auth/plex/{pin}", headers={"Accept": accept})

    def login(self, account_token: str) -> dict:
        done = self.finish_login(account_token)
        assert done.status_code == 200 and done.json()["status"] == "complete", done.text
        session = self.request("GET", "/api/auth/session").json()
        self.csrf = session["csrf_token"]
        return session["user"]


@pytest.fixture
def own_stack(fakes, tmp_path):
    """A stack of its own: these tests disable users and decide who signs in first."""
    stack = make_stack(tmp_path / "home", fakes).start()
    try:
        yield stack
    finally:
        assert stack.stop() == 0, stack.logs()


def refusals(stack) -> dict[str, int]:
    conn = sqlite3.connect(f"file:{stack.db_path}?mode=ro", uri=True, timeout=10)
    try:
        return dict(conn.execute("SELECT reason, sum(refusals) FROM sign_in_refusals GROUP BY reason"))
    finally:
        conn.close()


def test_sign_in_admits_the_servers_people_and_admins_disable_them(own_stack):
    stack = own_stack
    owner = Browser(stack)
    me = owner.login(PLEX_ACCOUNT_TOKEN)
    assert me["is_admin"] is True

    # A Plex account the server is not shared with: refused, as JSON and as a page, and counted.
    stranger = Browser(stack)
    refused = stranger.finish_login(PLEX_ACCOUNT_TOKEN_STRANGER)
    assert refused.status_code == 403, refused.text
    body = refused.json()
    assert body["error"] == "not_admitted"
    assert PMS_FRIENDLY_NAME in body["message"] and "ask its owner for access" in body["message"]
    assert "pj_session" not in stranger.session.cookies
    page = Browser(stack).finish_login(PLEX_ACCOUNT_TOKEN_STRANGER, accept="text/html")
    assert page.status_code == 403 and "text/html" in page.headers["Content-Type"]
    assert PMS_FRIENDLY_NAME in page.text and "ask its owner for access" in page.text
    assert stranger.request("GET", "/api/auth/session").status_code == 401
    assert refusals(stack) == {"not_shared": 2}
    shown = requests.get(stack.dashboard_url + "/projectionist/sign_in_refusals.json?_shape=objects", timeout=30,
                         auth=("admin", (stack.home / "dashboard-password").read_text().strip()))
    assert shown.status_code == 200 and [(r["reason"], r["refusals"]) for r in shown.json()["rows"]] == [
        ("not_shared", 2)]
    assert "cypher" not in shown.text  # counts only: no account
    assert "sign-in refused" in stack.logs() and PLEX_ACCOUNT_TOKEN_STRANGER not in stack.logs()

    # The user the server is shared with: admitted, not an admin.
    friend = Browser(stack)
    friend_user = friend.login(PLEX_ACCOUNT_TOKEN_2)
    assert friend_user["is_admin"] is False
    assert friend.request("GET", "/api/admin/users").status_code == 403
    users = {u["username"]: u for u in owner.request("GET", "/api/admin/users").json()["users"]}
    assert set(users) == {"mrandersson", "trinity_k"}  # the stranger never became a user
    friend_id = users["trinity_k"]["id"]

    # Admins grant admin (and take it back); CSRF is required.
    path = f"/api/admin/users/{friend_id}/admin"
    no_csrf = requests.put(stack.control_url + path, json={"admin": True}, cookies=owner.session.cookies,
                           headers={"Origin": stack.control_url}, timeout=30)
    assert no_csrf.status_code == 403 and no_csrf.json()["error"] == "csrf_token_invalid"
    granted = owner.request("PUT", path, json={"admin": True})
    assert granted.status_code == 200 and granted.json()["user"]["is_admin"] is True
    assert friend.request("GET", "/api/admin/users").status_code == 200
    assert owner.request("PUT", path, json={"admin": False}).json()["user"]["is_admin"] is False
    assert friend.request("GET", "/api/admin/users").status_code == 403

    # The friend's player, through the proxy, with surrogates only.
    player = RecordingClient(stack)
    account = player.login(PLEX_ACCOUNT_TOKEN_2)
    server = player.server(account)
    base, token = server["connections"][0]["uri"], server["accessToken"]
    assert player.request("GET", f"{base}/library/sections?X-Plex-Token={token}").status_code == 200

    # Sessions: listed, one revoked by id.
    second = Browser(stack)
    second.login(PLEX_ACCOUNT_TOKEN_2)
    sessions = owner.request("GET", f"/api/admin/users/{friend_id}/sessions").json()
    live = [s for s in sessions["sessions"] if s["active"]]
    assert len(live) == 2 and sessions["surrogates"] >= 2
    assert owner.request("DELETE", f"/api/admin/sessions/{live[0]['id']}").status_code == 204
    assert owner.request("DELETE", f"/api/admin/sessions/{live[0]['id']}").status_code == 404
    assert second.request("GET", "/api/auth/session").status_code == 401  # the newest one was second's
    assert friend.request("GET", "/api/auth/session").status_code == 200

    # Disable: sessions, surrogates and the cache partition go at once; the player gets Plex's 401.
    assert owner.request("POST", f"/api/admin/users/{users['mrandersson']['id']}/disable").status_code == 400
    disabled = owner.request("POST", f"/api/admin/users/{friend_id}/disable")
    assert disabled.status_code == 200, disabled.text
    change = disabled.json()
    assert change["user"]["disabled"] is True and change["sessions_revoked"] == 1
    assert change["surrogates_revoked"] >= 2 and change["cache_flush_id"]
    denied = player.request("GET", f"{base}/library/sections?X-Plex-Token={token}")
    assert denied.status_code == 401
    again = player.request("GET", "https://plex.tv/api/v2/user", headers={"X-Plex-Token": account})
    assert again.status_code == 401 and again.json()["errors"][0]["code"] == 1001
    assert friend.request("GET", "/api/auth/session").status_code == 401
    # Signing in again through the proxy (plex.tv's own PIN flow) hands out surrogates that do not work.
    fresh = player.login(PLEX_ACCOUNT_TOKEN_2)
    refused_again = player.request("GET", "https://plex.tv/api/v2/user", headers={"X-Plex-Token": fresh})
    assert refused_again.status_code == 401
    # The partition flush is applied by the proxy like any other.
    conn = sqlite3.connect(stack.db_path, timeout=10)
    try:
        from support import wait_for
        wait_for(lambda: conn.execute("SELECT applied_at FROM cache_flush_requests WHERE id = ?",
                                      (change["cache_flush_id"],)).fetchone()[0], 10, what="the partition flush")
    finally:
        conn.close()

    # A disabled user cannot sign in again; enabled, they can.
    blocked = Browser(stack).finish_login(PLEX_ACCOUNT_TOKEN_2)
    assert blocked.status_code == 403 and "disabled" in blocked.json()["message"]
    assert refusals(stack)["disabled"] == 1
    enabled = owner.request("POST", f"/api/admin/users/{friend_id}/enable")
    assert enabled.status_code == 200 and enabled.json()["user"]["disabled"] is False
    assert Browser(stack).login(PLEX_ACCOUNT_TOKEN_2)["username"] == "trinity_k"
    assert_no_secret_in(player.received, "the player")


def test_the_members_job_revokes_users_the_owner_stopped_sharing_with(own_stack):
    stack = own_stack
    owner, friend = Browser(stack), Browser(stack)
    owner.login(PLEX_ACCOUNT_TOKEN)
    friend.login(PLEX_ACCOUNT_TOKEN_2)
    from fake_upstreams.data import ACCOUNTS
    from support import wait_for

    def run_members_job() -> dict:
        started = owner.request("POST", "/api/jobs/plex-members/run")
        assert started.status_code == 202, started.text
        run_id = started.json()["id"]
        conn = sqlite3.connect(f"file:{stack.db_path}?mode=ro", uri=True, timeout=10)
        try:
            row = wait_for(lambda: conn.execute("SELECT status, items FROM job_runs WHERE id = ? AND status != "
                                                "'running'", (run_id,)).fetchone(), 20, what="the plex-members run")
        finally:
            conn.close()
        return {"status": row[0], "items": row[1]}

    assert run_members_job() == {"status": "ok", "items": 0}  # still shared: nothing revoked
    assert friend.request("GET", "/api/auth/session").status_code == 200
    stack.fakes.plextv.unshared.add(ACCOUNTS[1].id)  # the owner stops sharing the server at plex.tv
    try:
        assert run_members_job() == {"status": "ok", "items": 1}
        assert friend.request("GET", "/api/auth/session").status_code == 401
        assert owner.request("GET", "/api/auth/session").status_code == 200
    finally:
        stack.fakes.plextv.unshared.discard(ACCOUNTS[1].id)


def test_the_allow_list_narrows_who_may_sign_in(fakes, tmp_path, monkeypatch):
    monkeypatch.setenv("PROJECTIONIST_ALLOWED_USERS", "someone-else@example.com")
    stack = make_stack(tmp_path / "home", fakes).start()
    try:
        assert Browser(stack).login(PLEX_ACCOUNT_TOKEN)["is_admin"] is True  # the owner always may
        refused = Browser(stack).finish_login(PLEX_ACCOUNT_TOKEN_2)  # shared, but not on the list
        assert refused.status_code == 403 and "ask its owner for access" in refused.json()["message"]
        assert refusals(stack) == {"not_allowed": 1}
    finally:
        assert stack.stop() == 0, stack.logs()


def test_the_first_owner_is_the_admin_even_when_a_shared_user_came_first(own_stack):
    stack = own_stack
    friend = Browser(stack)
    assert friend.login(PLEX_ACCOUNT_TOKEN_2)["is_admin"] is True  # alone, before the owner: the first user
    owner = Browser(stack)
    assert owner.login(PLEX_ACCOUNT_TOKEN)["is_admin"] is True
    assert friend.request("GET", "/api/auth/session").json()["user"]["is_admin"] is False
    assert friend.request("GET", "/api/admin/users").status_code == 403
    users = {u["username"]: u for u in owner.request("GET", "/api/admin/users").json()["users"]}
    assert users["mrandersson"]["is_admin"] and not users["trinity_k"]["is_admin"]
    # Granting admin keeps the granting admin an admin.
    granted = owner.request("PUT", f"/api/admin/users/{users['trinity_k']['id']}/admin", json={"admin": True})
    assert granted.status_code == 200 and granted.json()["user"]["is_admin"] is True
    assert owner.request("GET", "/api/auth/session").json()["user"]["is_admin"] is True
