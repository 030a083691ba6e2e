"""Token health, end to end: a Plex token revoked at (the fake) plex.tv is found by the
`token-health` job (run by an admin through the control plane), its surrogates then answer 401
without reaching the Plex server, the user's settings and /setup say "sign in again", the event is
in the dashboard, and a fresh sign-in through the proxy heals it.
"""

from __future__ import annotations

import secrets
import sqlite3
import time
from types import SimpleNamespace

import pytest
import requests
from test_e2e_credentials import RecordingClient
from test_jobs import Admin

from fake_upstreams.data import PLEX_ACCOUNT_TOKEN_2, PLEX_SERVER_TOKEN_2

pytestmark = pytest.mark.e2e


@pytest.fixture
def revocable(fakes):
    yield fakes.plextv
    fakes.plextv.revoked.clear()


def test_a_revoked_plex_token_is_found_refused_at_the_proxy_and_healed_by_signing_in(stack, clean_fakes, revocable):
    control = SimpleNamespace(url=stack.control_url)
    admin = Admin(control, clean_fakes)  # the owner
    friend = Admin(control, clean_fakes, token=PLEX_ACCOUNT_TOKEN_2)  # a user the server is shared with
    assert friend.get("/api/settings").json()["sign_in_again"] == []
    # /setup hands a signed-in user the value for the player's TMDB field: their own surrogate.
    bearer = friend.get("/api/setup").json()["tmdb_bearer"]
    assert bearer.startswith("pj_") and bearer == friend.get("/api/settings").json()["tmdb"]["bearer"]

    player = RecordingClient(stack)
    account = player.login(PLEX_ACCOUNT_TOKEN_2)
    server_token = player.server(account)["accessToken"]
    sections = f"{stack.plex_url}/library/sections?X-Plex-Token={server_token}"
    assert player.request("GET", sections).status_code == 200
    assert clean_fakes.requests["plex"][-1].query["X-Plex-Token"] == [PLEX_SERVER_TOKEN_2]

    revocable.revoke_account(PLEX_ACCOUNT_TOKEN_2)  # the user signed out of every device at plex.tv
    run = admin.run("token-health", timeout=180)
    assert run["status"] == "ok" and run["items"] >= 2, run

    clean_fakes.clear()
    refused = player.request("GET", sections)
    assert refused.status_code == 401 and b"401 Unauthorized" in refused.content  # Plex's own format
    assert player.request("GET", "https://plex.tv/api/v2/user", headers={"X-Plex-Token": account}).status_code == 401
    assert clean_fakes.requests["plex"] == [] and clean_fakes.requests["plextv"] == []  # neither was reached
    assert friend.get("/api/settings").json()["sign_in_again"] == ["Plex"]
    assert friend.get("/api/setup").json()["sign_in_again"] == ["Plex"]
    assert admin.get("/api/settings").json()["sign_in_again"] == []  # the owner's tokens are fine
    assert requests.get(stack.control_url + "/api/setup", timeout=30).json()["sign_in_again"] is None

    conn = sqlite3.connect(stack.db_path)
    try:
        friend_id = conn.execute("SELECT id FROM users WHERE username = 'trinity_k'").fetchone()[0]
        owner_id = conn.execute("SELECT id FROM users WHERE username = 'mrandersson'").fetchone()[0]
        events = conn.execute("SELECT user_id, kind, event FROM token_health_events ORDER BY id").fetchall()
    finally:
        conn.close()
    assert (friend_id, "plex", "invalid") in events
    # The owner's tokens still work at plex.tv: none is marked. (The stack is shared by the session:
    # other tests' made-up accounts may be marked too, rightly, so only the owner is judged.)
    assert not [e for e in events if e[0] == owner_id and e[2] == "invalid"], events
    shown = requests.get(stack.dashboard_url + "/projectionist/token_health_events.json?_shape=objects", timeout=30,
                         auth=("admin", (stack.home / "dashboard-password").read_text().strip()))
    assert shown.status_code == 200 and any(r["event"] == "invalid" for r in shown.json()["rows"])
    assert PLEX_ACCOUNT_TOKEN_2 not in shown.text and PLEX_SERVER_TOKEN_2 not in shown.text

    # A fresh sign-in (plex.tv accepts the account again) vaults the tokens again: healed.
    again = player.login(PLEX_ACCOUNT_TOKEN_2)
    assert player.server(again)["accessToken"] == server_token
    healed = player.request("GET", sections + "&healed=1")  # a new URL: the Plex server answers it
    assert healed.status_code == 200 and healed.json()["MediaContainer"]["Directory"]
    assert clean_fakes.requests["plex"][-1].query["X-Plex-Token"] == [PLEX_SERVER_TOKEN_2]
    assert friend.get("/api/settings").json()["sign_in_again"] == []
    assert PLEX_ACCOUNT_TOKEN_2 not in stack.logs() and PLEX_SERVER_TOKEN_2 not in stack.logs()


@pytest.fixture
def trakt_tokens(fakes):
    """A Trakt token pair of the fake's own, just issued (never shared with other tests)."""
    access, refresh = secrets.token_hex(32), secrets.token_hex(32)
    fakes.trakt.access_tokens.add(access)
    fakes.trakt.refresh_tokens[refresh] = access
    yield {"access_token": access, "refresh_token": refresh, "expires_in": 7776000, "created_at": int(time.time()),
           "token_type": "bearer", "scope": "public"}
    fakes.trakt.access_tokens.discard(access)
    fakes.trakt.refresh_tokens.pop(refresh, None)


def test_a_revoked_trakt_token_is_found_and_refused_and_new_tokens_heal_it(stack, clean_fakes, trakt_tokens, fakes):
    control = SimpleNamespace(url=stack.control_url)
    admin = Admin(control, clean_fakes)
    friend = Admin(control, clean_fakes, token=PLEX_ACCOUNT_TOKEN_2)
    imported = friend.session.post(stack.control_url + "/api/import/local-storage", json={"traktTokens": trakt_tokens},
                                   headers={"X-CSRF-Token": friend.csrf}, timeout=30)
    assert imported.status_code == 200, imported.text
    surrogate = imported.json()["traktTokens"]["access_token"]
    player = RecordingClient(stack)
    watchlist = "https://api.trakt.tv/users/me/watchlist/movies"
    headers = {"trakt-api-version": "2", "trakt-api-key": "frontend-bundled-trakt-id", "Authorization": f"Bearer {surrogate}"}
    assert player.request("GET", watchlist, headers=headers).status_code == 200

    fakes.trakt.access_tokens.discard(trakt_tokens["access_token"])  # revoked at trakt.tv
    assert admin.run("token-health", timeout=180)["status"] == "ok"
    clean_fakes.clear()
    refused = player.request("GET", watchlist, headers=headers)
    assert refused.status_code == 401 and refused.json()["error"] == "invalid_grant"  # Trakt's format
    assert clean_fakes.requests["trakt"] == []
    assert "Trakt" in friend.get("/api/settings").json()["sign_in_again"]

    # Connecting Trakt again (new tokens) heals it.
    fresh, refresh = secrets.token_hex(32), secrets.token_hex(32)
    fakes.trakt.access_tokens.add(fresh)
    try:
        again = friend.session.post(stack.control_url + "/api/import/local-storage", headers={"X-CSRF-Token": friend.csrf},
                                    json={"traktTokens": {**trakt_tokens, "access_token": fresh, "refresh_token": refresh}},
                                    timeout=30)
        new_surrogate = again.json()["traktTokens"]["access_token"]
        assert "Trakt" not in friend.get("/api/settings").json()["sign_in_again"]
        ok = player.request("GET", watchlist, headers={**headers, "Authorization": f"Bearer {new_surrogate}"})
        assert ok.status_code == 200
    finally:
        fakes.trakt.access_tokens.discard(fresh)
