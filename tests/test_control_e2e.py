"""The control plane end to end: `projectionist run` with the fakes, driven over HTTP like a
browser would (cookies, Origin, CSRF header), and the proxy checked to honour what it decides.

Each `ControlClient` connects from its own loopback address (127.0.0.N), so the per-IP rate limit
of the sign-in endpoints is per test and one test cannot exhaust another's budget.
"""

from __future__ import annotations

import itertools
import json
import sqlite3
import threading
import uuid
from datetime import UTC, datetime, timedelta

import pytest
import requests
from support import SourceAddressAdapter
from test_e2e_credentials import RecordingClient

from fake_upstreams.data import (
    PLEX_ACCOUNT_TOKEN,
    PLEX_ACCOUNT_TOKEN_2,
    PLEX_SERVER_TOKEN,
    PLEX_SERVER_TOKEN_2,
    PMS_MACHINE_ID,
    TMDB_V3_KEY,
    TMDB_V4_TOKEN,
    TRAKT_ACCESS_TOKEN,
    TRAKT_CLIENT_SECRET,
    TRAKT_REFRESH_TOKEN,
)
from projectionist.vault import SURROGATE_PREFIX

pytestmark = pytest.mark.e2e

REAL_SECRETS = (PLEX_ACCOUNT_TOKEN, PLEX_ACCOUNT_TOKEN_2, PLEX_SERVER_TOKEN, PLEX_SERVER_TOKEN_2, TMDB_V3_KEY,
                TMDB_V4_TOKEN, TRAKT_ACCESS_TOKEN, TRAKT_REFRESH_TOKEN, TRAKT_CLIENT_SECRET)
ADMIN_ROUTES = ("/api/admin/users", "/api/admin/stats/usage", "/api/admin/stats/performance",
                "/api/admin/stats/errors", "/api/admin/activity", "/api/admin/limits",
                "/api/admin/services", "/api/admin/sign-in-refusals")
_addresses = itertools.count(10)
_address_lock = threading.Lock()


def next_loopback() -> str:
    with _address_lock:
        n = next(_addresses)
    return f"127.0.{n // 250}.{n % 250 + 2}"


class ControlClient:
    """A browser's view of the control plane: a cookie jar, its origin, and the CSRF token."""

    def __init__(self, stack, address: str | None = None) -> None:
        self.stack = stack
        self.base = stack.control_url
        self.address = address or next_loopback()
        self.session = requests.Session()
        self.session.trust_env = False
        self.session.mount("http://", SourceAddressAdapter(self.address))
        self.csrf: str | None = None
        self.received: list[bytes] = []

    def request(self, method: str, path: str, *, csrf: bool = True, **kw) -> requests.Response:
        headers = {"Accept": "application/json", **kw.pop("headers", {})}
        if method not in ("GET", "HEAD") and csrf and self.csrf:
            headers.setdefault("X-CSRF-Token", self.csrf)
            headers.setdefault("Origin", self.base)
        r = self.session.request(method, self.base + path, headers=headers, timeout=30, allow_redirects=False, **kw)
        self.received.append(b"".join(f"{k}: {v}\r\n".encode() for k, v in r.headers.items()) + r.content)
        return r

    def get(self, path: str, **kw) -> requests.Response:
        return self.request("GET", path, **kw)

    def start_login(self) -> dict:
        r = self.request("POST", "/api/auth/plex", headers={"Origin": self.base})
        assert r.status_code == 200, r.text
        return r.json()

    def login(self, account_token: str = PLEX_ACCOUNT_TOKEN) -> dict:
        pin = self.start_login()["pin_id"]
        self.stack.fakes.plextv.link_pin(pin, account_token=account_token)  # the user approves on app.plex.tv
        r = self.get(f"/api/auth/plex/{pin}")
        assert r.status_code == 200 and r.json()["status"] == "complete", r.text
        session = self.get("/api/auth/session").json()
        self.csrf = session["csrf_token"]
        return session

    @property
    def session_cookie(self) -> str | None:
        return self.session.cookies.get("pj_session")


@pytest.fixture
def browser(stack):
    return ControlClient(stack)


def db(stack) -> sqlite3.Connection:
    return sqlite3.connect(stack.db_path, timeout=10, isolation_level=None)


def assert_no_secret_in(blobs, what: str) -> None:
    for blob in blobs:
        for secret in REAL_SECRETS:
            assert secret.encode() not in blob, f"a real credential reached {what}"


def set_session_expiry(stack, cookie: str, expires: datetime) -> None:
    import hashlib

    conn = db(stack)
    conn.execute("UPDATE sessions SET expires_at = ? WHERE id_hash = ?",
                 (expires.isoformat(timespec="seconds"), hashlib.sha256(cookie.encode()).hexdigest()))
    conn.close()


# --- sign-in ------------------------------------------------------------------------------------

def test_plex_pin_flow_against_fake_plex_tv(stack, browser, clean_fakes):
    started = browser.start_login()
    pin = started["pin_id"]
    assert started["auth_url"].startswith("https://app.plex.tv/auth/#!?")
    assert f"forwardUrl={requests.utils.quote(stack.control_url, safe='')}%2Fapi%2Fauth%2Fplex%2F{pin}" in started["auth_url"]
    created = [r for r in clean_fakes.requests["plextv"] if r.path == "/api/v2/pins"][-1]
    client_id = created.headers["X-Plex-Client-Identifier"]
    assert client_id.startswith("projectionist-")
    # Not approved yet.
    assert browser.get(f"/api/auth/plex/{pin}").json() == {"status": "pending", "user": None}
    # Another browser that learnt the PIN id cannot finish this sign-in.
    assert ControlClient(stack).get(f"/api/auth/plex/{pin}").status_code == 404

    stack.fakes.plextv.link_pin(pin, account_token=PLEX_ACCOUNT_TOKEN)
    done = browser.get(f"/api/auth/plex/{pin}")
    assert done.status_code == 200 and done.json()["status"] == "complete"
    assert done.json()["user"]["username"] == "mrandersson" and done.json()["user"]["plex_account_id"] == "18573262"
    cookie = done.headers["Set-Cookie"]
    assert "pj_session=" in cookie and "HttpOnly" in cookie and "SameSite=Lax" in cookie
    assert "Secure" not in cookie  # served over plain HTTP here; over HTTPS the cookie is Secure
    # The same client identifier every time (a stable device at plex.tv).
    assert all(r.headers["X-Plex-Client-Identifier"] == client_id for r in clean_fakes.requests["plextv"])
    # A finished sign-in cannot be replayed.
    assert browser.get(f"/api/auth/plex/{pin}").status_code == 404

    session = browser.get("/api/auth/session").json()
    assert session["user"]["username"] == "mrandersson" and len(session["csrf_token"]) == 64
    validate = browser.get("/api/auth/validate")
    assert validate.status_code == 200 and validate.headers["X-Projectionist-User-Id"] == str(session["user"]["id"])
    # The user is the proxy's user: the account token is vaulted for them.
    conn = db(stack)
    row = conn.execute("SELECT count(*) FROM vault_tokens WHERE user_id = ? AND kind = 'plex'",
                       (session["user"]["id"],)).fetchone()
    assert row[0] >= 1
    conn.close()
    assert_no_secret_in(browser.received, "the browser")


def test_browser_navigation_callback_redirects_to_the_settings_page(stack, browser):
    pin = browser.start_login()["pin_id"]
    html = {"Accept": "text/html,application/xhtml+xml"}
    pending = browser.get(f"/api/auth/plex/{pin}", headers=html)
    assert pending.status_code == 303 and pending.headers["Location"] == f"/?login=pending&pin={pin}"
    stack.fakes.plextv.link_pin(pin, account_token=PLEX_ACCOUNT_TOKEN_2)
    done = browser.get(f"/api/auth/plex/{pin}", headers=html)
    assert done.status_code == 303 and done.headers["Location"] == "/?login=ok"
    assert browser.get("/api/auth/session").json()["user"]["username"] == "trinity_k"
    stranger = ControlClient(stack).get(f"/api/auth/plex/{pin}", headers=html)
    assert stranger.status_code == 303 and stranger.headers["Location"] == "/?login=failed"


def test_unauthenticated_and_forged_expired_or_revoked_cookies_get_401(stack, browser):
    assert browser.get("/api/auth/session").status_code == 401
    assert browser.get("/api/auth/validate").status_code == 401
    forged = ControlClient(stack)
    forged.session.cookies.set("pj_session", "A" * 43)
    assert forged.get("/api/settings").status_code == 401
    forged.session.cookies.set("pj_session", "not even the right shape")
    assert forged.get("/api/auth/session").json()["error"] == "unauthenticated"

    browser.login()
    cookie = browser.session_cookie
    set_session_expiry(stack, cookie, datetime.now(UTC) - timedelta(seconds=1))
    assert browser.get("/api/auth/session").status_code == 401  # expired

    browser.login()
    live = browser.session_cookie
    assert browser.request("POST", "/api/auth/logout").status_code == 200
    revoked = ControlClient(stack)
    revoked.session.cookies.set("pj_session", live)
    assert revoked.get("/api/auth/session").status_code == 401


def test_sliding_renewal_extends_the_session_and_its_cookie(stack, browser):
    browser.login()
    cookie = browser.session_cookie
    ttl = 14 * 86400
    soon = datetime.now(UTC) + timedelta(seconds=ttl // 2)
    set_session_expiry(stack, cookie, soon)
    r = browser.get("/api/settings")
    assert r.status_code == 200
    renewed = r.headers.get("Set-Cookie", "")
    assert "pj_session=" in renewed and "Max-Age=" in renewed
    max_age = int(renewed.split("Max-Age=")[1].split(";")[0])
    assert ttl - 120 < max_age <= ttl
    expires = datetime.fromisoformat(browser.get("/api/auth/session").json()["session"]["expires_at"])
    assert expires > soon + timedelta(days=6)
    # Right after a renewal, reads do not renew again (no write per request).
    assert "Set-Cookie" not in browser.get("/api/settings").headers


def test_sessions_survive_a_restart_of_the_control_plane(stack, browser):
    from test_control_schemathesis import ControlThread

    browser.login()
    # A second control plane on the same state directory: what a restarted one would see.
    with ControlThread(stack.home, stack.env) as restarted:
        r = requests.get(restarted.url + "/api/auth/session", cookies={"pj_session": browser.session_cookie},
                         timeout=10)
        assert r.status_code == 200 and r.json()["user"]["username"] == "mrandersson"


# --- CSRF and origin ----------------------------------------------------------------------------

def test_state_changing_calls_need_the_csrf_token_and_the_same_origin(stack, browser):
    browser.login()
    change = {"json": {"preferences": {"theme": "csrf-test"}}}
    missing = browser.request("PUT", "/api/settings", csrf=False, **change)
    assert missing.status_code == 403 and missing.json()["error"] == "csrf_token_invalid"
    wrong = browser.request("PUT", "/api/settings", headers={"X-CSRF-Token": "0" * 64}, **change)
    assert wrong.status_code == 403 and wrong.json()["error"] == "csrf_token_invalid"
    other_session = ControlClient(stack)
    other_session.login()
    stolen = browser.request("PUT", "/api/settings", headers={"X-CSRF-Token": other_session.csrf}, **change)
    assert stolen.status_code == 403
    cross = browser.request("PUT", "/api/settings", headers={"Origin": "https://evil.example"}, **change)
    assert cross.status_code == 403 and cross.json()["error"] == "cross_origin_request"
    fetch_meta = browser.request("PUT", "/api/settings", headers={"Sec-Fetch-Site": "cross-site"}, **change)
    assert fetch_meta.status_code == 403
    assert browser.request("POST", "/api/auth/logout", headers={"X-CSRF-Token": "x"}).status_code == 403
    assert browser.get("/api/settings").json()["preferences"].get("theme") != "csrf-test"  # nothing changed
    ok = browser.request("PUT", "/api/settings", **change)
    assert ok.status_code == 200 and ok.json()["preferences"]["theme"] == "csrf-test"
    # Starting a sign-in from another site is refused too.
    assert browser.request("POST", "/api/auth/plex", headers={"Origin": "https://evil.example"}).status_code == 403


# --- logout and the proxy -----------------------------------------------------------------------

def test_logout_revokes_the_users_proxy_surrogates(stack, browser, clean_fakes):
    player = RecordingClient(stack)
    server_token = player.server(player.login(PLEX_ACCOUNT_TOKEN))["accessToken"]
    library = f"{stack.plex_url}/library/sections?X-Plex-Token={server_token}"
    assert player.request("GET", library).status_code == 200

    browser.login(PLEX_ACCOUNT_TOKEN)  # the same Plex account, through the control plane
    bearer = browser.get("/api/settings").json()["tmdb"]["bearer"]
    out = browser.request("POST", "/api/auth/logout")
    assert out.status_code == 200 and out.json()["surrogates_revoked"] >= 2
    assert "pj_session=\"\"" in out.headers["Set-Cookie"] or "Max-Age=0" in out.headers["Set-Cookie"]
    clean_fakes.clear()
    assert player.request("GET", library).status_code == 401
    assert clean_fakes.requests["plex"] == []
    assert browser.get("/api/auth/session").status_code == 401
    # The TMDB surrogate no longer names the user: the proxy falls back to the server's key.
    r = player.request("GET", "https://api.themoviedb.org/3/movie/604", headers={"Authorization": f"Bearer {bearer}"})
    assert r.status_code == 200
    assert clean_fakes.requests["tmdb"][-1].query.get("api_key") == [TMDB_V3_KEY]


def test_logout_everywhere_ends_every_session_of_the_user(stack):
    laptop, phone = ControlClient(stack), ControlClient(stack)
    laptop.login(PLEX_ACCOUNT_TOKEN_2)
    phone.login(PLEX_ACCOUNT_TOKEN_2)
    out = laptop.request("POST", "/api/auth/logout-everywhere")
    assert out.status_code == 200 and out.json()["sessions_revoked"] >= 2
    assert phone.get("/api/auth/session").status_code == 401


# --- admin --------------------------------------------------------------------------------------

def test_admin_routes_are_for_admins_only(stack):
    first, second = ControlClient(stack), ControlClient(stack)
    users = {first.login(PLEX_ACCOUNT_TOKEN)["user"]["id"]: first,
             second.login(PLEX_ACCOUNT_TOKEN_2)["user"]["id"]: second}
    conn = db(stack)
    admin_id = conn.execute("SELECT min(id) FROM users").fetchone()[0]
    conn.close()
    non_admin = next(c for uid, c in users.items() if uid != admin_id)
    assert non_admin.get("/api/auth/session").json()["user"]["is_admin"] is False
    for path in ADMIN_ROUTES:
        r = non_admin.get(path)
        assert r.status_code == 403 and r.json()["error"] == "forbidden", path
        assert ControlClient(stack).get(path).status_code == 401, path
    if admin_id in users:  # the first user ever is one of ours unless another test signed in before
        admin = users[admin_id]
        listing = admin.get("/api/admin/users").json()["users"]
        assert {u["username"] for u in listing} >= {"mrandersson", "trinity_k"}
        assert all("email" not in u for u in listing)
        for path in ADMIN_ROUTES:
            assert admin.get(path).status_code == 200, path


def admin_client(stack) -> ControlClient:
    """Signed in as whichever of the two fake accounts is the admin (the first user)."""
    for token in (PLEX_ACCOUNT_TOKEN, PLEX_ACCOUNT_TOKEN_2):
        client = ControlClient(stack)
        if client.login(token)["user"]["is_admin"]:
            return client
    pytest.skip("the first user of this database is not one of the fake accounts")


# --- TMDB key, usage and statistics -------------------------------------------------------------

def test_custom_tmdb_key_is_validated_stored_encrypted_and_used_by_the_proxy(stack, browser, clean_fakes, vault):
    me = browser.login(PLEX_ACCOUNT_TOKEN)["user"]["id"]
    browser.request("DELETE", "/api/settings/tmdb-key")
    rejected = browser.request("PUT", "/api/settings/tmdb-key", json={"key": "f" * 32})
    assert rejected.status_code == 400 and rejected.json()["error"] == "invalid_tmdb_key"
    assert rejected.json()["fields"][0]["field"] == "key"
    assert vault.user_credential(me, "tmdb") is None  # not stored
    assert any(r.path == "/3/configuration" for r in clean_fakes.requests["tmdb"])  # TMDB was asked
    bad_shape = browser.request("PUT", "/api/settings/tmdb-key", json={"key": "short"})
    assert bad_shape.status_code == 400 and bad_shape.json()["fields"][0]["field"] == "key"

    stored = browser.request("PUT", "/api/settings/tmdb-key", json={"key": TMDB_V4_TOKEN})
    assert stored.status_code == 200 and stored.json()["tmdb"]["custom_key"] is True
    bearer = stored.json()["tmdb"]["bearer"]
    assert bearer.startswith(SURROGATE_PREFIX)
    assert vault.user_credential(me, "tmdb") == TMDB_V4_TOKEN
    conn = db(stack)
    raw = conn.execute("SELECT secret_enc FROM user_credentials WHERE user_id = ? AND name = 'tmdb'", (me,)).fetchone()
    conn.close()
    assert TMDB_V4_TOKEN.encode() not in raw[0]  # encrypted at rest

    before = browser.get("/api/usage").json()["tmdb"]
    custom_rows = "route = 'tmdb.details' AND credential = 'custom' AND user_id = ?"
    rows_before = len(stack.usage(custom_rows, (me,)))  # earlier tests may have left some
    player = RecordingClient(stack)
    r = player.request("GET", "https://api.themoviedb.org/3/movie/27205", headers={"Authorization": f"Bearer {bearer}"})
    assert r.status_code == 200 and r.json()["title"] == "Inception"
    assert clean_fakes.requests["tmdb"][-1].headers["Authorization"] == f"Bearer {TMDB_V4_TOKEN}"
    stack.wait_usage(custom_rows, (me,), count=rows_before + 1)
    after = browser.get("/api/usage").json()
    assert after["tmdb"]["custom"] == before["custom"] + 1
    assert any(row["route"] == "tmdb.details" for row in after["routes"])

    removed = browser.request("DELETE", "/api/settings/tmdb-key")
    assert removed.status_code == 200 and removed.json()["tmdb"]["custom_key"] is False
    player.request("GET", "https://api.themoviedb.org/3/movie/329865", headers={"Authorization": f"Bearer {bearer}"})
    assert clean_fakes.requests["tmdb"][-1].query.get("api_key") == [TMDB_V3_KEY]
    assert_no_secret_in(browser.received, "the browser")


def test_settings_round_trip_with_field_errors(stack, browser):
    browser.login(PLEX_ACCOUNT_TOKEN_2)
    update = {"preferences": {"theme": "dark", "rows": 3}, "watchlist_provider": "trakt",
              "plex_servers": [{"name": "Home", "client_identifier": "abc123", "uri": "https://10-0-0-2.x.plex.direct:32400"}]}
    r = browser.request("PUT", "/api/settings", json=update)
    assert r.status_code == 200, r.text
    got = browser.get("/api/settings").json()
    assert got["preferences"]["theme"] == "dark" and got["watchlist_provider"] == "trakt"
    assert got["plex_servers"][0]["name"] == "Home"
    bad = browser.request("PUT", "/api/settings", json={"plex_servers": [{"name": "x", "uri": "ftp://nope"}],
                                                         "watchlist_provider": "myspace"})
    assert bad.status_code == 400
    assert {f["field"] for f in bad.json()["fields"]} == {"plex_servers.0.uri", "watchlist_provider"}
    secret = browser.request("PUT", "/api/settings", json={"preferences": {"plexToken": "abc"}})
    assert secret.status_code == 400 and "credential" in secret.json()["message"]
    not_json = browser.request("PUT", "/api/settings", data=b"{nope", headers={"Content-Type": "application/json"})
    assert not_json.status_code == 400 and not_json.json()["error"] == "invalid_json"
    assert browser.get("/api/usage?days=0").json()["fields"][0]["field"] == "days"


def test_admin_statistics_reflect_proxy_traffic(stack, clean_fakes):
    admin = admin_client(stack)
    player = RecordingClient(stack)
    for movie in (603, 604, 27205):
        player.request("GET", f"https://api.themoviedb.org/3/movie/{movie}/credits")
    stack.fakes.set_down("tmdb", True)
    try:
        player.request("GET", "https://api.themoviedb.org/3/movie/335984/videos")
    finally:
        stack.fakes.set_down("tmdb", False)
    stack.wait_usage("route = 'tmdb.details' AND (status IS NULL OR status >= 500 OR error IS NOT NULL)")
    perf = admin.get("/api/admin/stats/performance?hours=1").json()
    details = next(r for r in perf["routes"] if r["route"] == "tmdb.details")
    assert details["requests"] >= 4 and details["p50_ms"] <= details["p95_ms"] <= details["max_ms"]
    assert "hit_ratio" in perf["cache"]
    usage = admin.get("/api/admin/stats/usage?days=1").json()
    assert usage["requests"] >= 4 and any(r["route"] == "tmdb.details" for r in usage["routes"])
    assert usage["tmdb"]["default"] >= 3
    errors = admin.get("/api/admin/stats/errors?hours=1&limit=20").json()["errors"]
    assert any(e["route"] == "tmdb.details" for e in errors)
    assert_no_secret_in(admin.received, "an admin")


# --- localStorage import ------------------------------------------------------------------------

def test_import_local_storage_vaults_every_secret_and_answers_surrogates(stack, browser, clean_fakes, vault):
    me = browser.login(PLEX_ACCOUNT_TOKEN)["user"]["id"]
    exported = {
        "plexBaseUrl": stack.plex_url, "plexToken": PLEX_SERVER_TOKEN, "plexAccountToken": PLEX_ACCOUNT_TOKEN,
        "plexClientId": str(uuid.uuid4()),
        "plexServer": {"name": "nebuchadnezzar", "clientIdentifier": PMS_MACHINE_ID, "accessToken": PLEX_SERVER_TOKEN,
                       "connections": [{"uri": stack.plex_url}]},
        "tmdbBearer": TMDB_V4_TOKEN,
        "traktTokens": {"access_token": TRAKT_ACCESS_TOKEN, "refresh_token": TRAKT_REFRESH_TOKEN,
                        "expires_in": 7776000, "created_at": int(datetime.now(UTC).timestamp()), "token_type": "bearer"},
        "theme": "dark", "autoplay": True,
    }
    r = browser.request("POST", "/api/import/local-storage", json=exported)
    assert r.status_code == 200, r.text
    out = r.json()
    assert set(out) == set(exported)
    assert_no_secret_in([r.content], "the import's answer")
    for field in ("plexToken", "plexAccountToken", "tmdbBearer"):
        assert out[field].startswith(SURROGATE_PREFIX), field
    assert out["plexServer"]["accessToken"] == out["plexToken"]
    assert out["traktTokens"]["access_token"].startswith(SURROGATE_PREFIX)
    assert out["traktTokens"]["expires_in"] == 7776000 and out["theme"] == "dark"
    assert vault.user_credential(me, "tmdb") == TMDB_V4_TOKEN
    assert vault.resolve(out["tmdbBearer"]).user_id == me
    assert browser.get("/api/settings").json()["preferences"]["theme"] == "dark"

    player = RecordingClient(stack)
    sections = player.request("GET", f"{out['plexBaseUrl']}/library/sections?X-Plex-Token={out['plexToken']}")
    assert sections.status_code == 200
    assert clean_fakes.requests["plex"][-1].query["X-Plex-Token"] == [PLEX_SERVER_TOKEN]
    me_trakt = player.request("GET", "https://api.trakt.tv/users/me/history",
                              headers={"trakt-api-version": "2", "trakt-api-key": "frontend-bundle",
                                       "Authorization": f"Bearer {out['traktTokens']['access_token']}"})
    assert me_trakt.status_code == 200
    # Importing the answer again changes nothing: surrogates stay as they are.
    again = browser.request("POST", "/api/import/local-storage", json=out).json()
    assert again["plexToken"] == out["plexToken"] and again["tmdbBearer"] == out["tmdbBearer"]
    browser.request("DELETE", "/api/settings/tmdb-key")
    browser.request("DELETE", "/api/trakt")


# --- Trakt --------------------------------------------------------------------------------------

def test_trakt_device_flow_and_refresh_before_expiry(stack, browser, clean_fakes, vault):
    me = browser.login(PLEX_ACCOUNT_TOKEN_2)["user"]["id"]
    browser.request("DELETE", "/api/trakt")
    assert browser.get("/api/trakt").json() == {"connected": False, "expires_at": None, "tokens": None}
    started = browser.request("POST", "/api/trakt/device")
    assert started.status_code == 200, started.text
    code = started.json()["user_code"]
    assert browser.request("POST", "/api/trakt/device/poll").json()["status"] == "pending"
    stack.fakes.trakt.approve(code)
    connected = browser.request("POST", "/api/trakt/device/poll").json()
    assert connected["status"] == "connected"
    access = connected["tokens"]["access_token"]
    assert access.startswith(SURROGATE_PREFIX)
    # The server's app credentials went to Trakt, as JSON.
    token_call = [r for r in clean_fakes.requests["trakt"] if r.path == "/oauth/device/token"][-1]
    assert json.loads(token_call.body)["client_secret"] == TRAKT_CLIENT_SECRET

    player = RecordingClient(stack)
    trakt_headers = {"trakt-api-version": "2", "trakt-api-key": "frontend-bundle", "Authorization": f"Bearer {access}"}
    assert player.request("GET", "https://api.trakt.tv/users/me/watchlist", headers=trakt_headers).status_code == 200

    # Make the tokens due for a refresh (a quarter of their life left): reading the status refreshes.
    link = json.loads(vault.user_credential(me, "trakt"))
    now = datetime.now(UTC)
    link.update(issued_at=(now - timedelta(days=80)).isoformat(timespec="seconds"),
                expires_at=(now + timedelta(days=2)).isoformat(timespec="seconds"))
    vault.set_user_credential(me, "trakt", json.dumps(link))
    status = browser.get("/api/trakt").json()
    assert status["connected"] and status["tokens"]["access_token"] == access  # the same surrogate
    assert datetime.fromisoformat(status["expires_at"]) > now + timedelta(days=80)
    refreshed = json.loads(vault.user_credential(me, "trakt"))["access_token"]
    assert refreshed != TRAKT_ACCESS_TOKEN
    assert any(r.path == "/oauth/token" for r in clean_fakes.requests["trakt"])
    # The player's surrogate now carries the new token.
    assert player.request("GET", "https://api.trakt.tv/users/me/history", headers=trakt_headers).status_code == 200
    assert [r for r in clean_fakes.requests["trakt"] if r.path.startswith("/users/me")][-1].headers[
        "Authorization"] == f"Bearer {refreshed}"
    assert_no_secret_in(browser.received + player.received, "a client")
    assert browser.request("DELETE", "/api/trakt").json() == {"connected": False}
    assert player.request("GET", "https://api.trakt.tv/users/me/history", headers=trakt_headers).status_code == 401


# --- the quality bar ----------------------------------------------------------------------------

def test_openapi_document_and_security_headers(stack, browser):
    doc = browser.get("/api/openapi.json")
    assert doc.status_code == 200
    spec = doc.json()
    assert spec["openapi"].startswith("3.")
    for path in ("/api/auth/plex", "/api/auth/plex/{pin}", "/api/auth/session", "/api/auth/validate",
                 "/api/auth/logout", "/api/auth/logout-everywhere", "/api/settings", "/api/settings/tmdb-key",
                 "/api/import/local-storage", "/api/usage", "/api/trakt", "/api/trakt/device", *ADMIN_ROUTES):
        assert path in spec["paths"], path
    put = spec["paths"]["/api/settings"]["put"]
    assert put["requestBody"]["content"]["application/json"]["schema"]["$ref"].startswith("#/components/schemas/")
    assert "SettingsUpdate" in spec["components"]["schemas"]
    for response in (doc, browser.get("/"), browser.get("/api/settings"), browser.get("/api/nope")):
        headers = response.headers
        assert "frame-ancestors 'none'" in headers["Content-Security-Policy"]
        assert "script-src 'self'" in headers["Content-Security-Policy"]
        assert headers["X-Content-Type-Options"] == "nosniff"
        assert headers["Referrer-Policy"] == "no-referrer"
    assert browser.get("/api/nope").json()["error"] == "not_found"


def test_sign_in_endpoints_are_rate_limited_per_ip(stack):
    hammer, bystander = ControlClient(stack), ControlClient(stack)
    statuses = [hammer.get("/api/auth/plex/123").status_code for _ in range(25)]
    assert statuses[:20] == [404] * 20 and statuses[-1] == 429
    limited = hammer.get("/api/auth/plex/123")
    assert limited.status_code == 429 and int(limited.headers["Retry-After"]) >= 1
    assert limited.json()["error"] == "rate_limited"
    assert bystander.get("/api/auth/plex/123").status_code == 404  # another address is not affected
    assert hammer.get("/api/auth/validate").status_code == 401  # forward auth is never rate limited


def test_no_secret_in_the_control_planes_logs(stack):
    control_lines = [line for line in stack.logs().splitlines() if '"service": "control"' in line]
    assert control_lines
    assert_no_secret_in([line.encode() for line in control_lines], "the control plane's log")
