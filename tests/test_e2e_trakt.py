"""Trakt credentials, end to end: the server's app credentials go in, the client holds surrogates.

A recording client sends what the frontend's bundle sends (its own hard-coded client id and secret)
through the real stack to the fake Trakt, which accepts only the server's. Every byte the client
receives, every file the stack writes and every usage row is scanned for the real tokens and the
server's client secret.
"""

from __future__ import annotations

import json
import time

import pytest
from test_e2e_credentials import RecordingClient

from fake_upstreams.data import TRAKT_ACCESS_TOKEN, TRAKT_CLIENT_ID, TRAKT_CLIENT_SECRET, TRAKT_REFRESH_TOKEN
from projectionist.vault import SURROGATE_PREFIX

pytestmark = pytest.mark.e2e

FRONTEND_ID = "frontend-bundle-client-id"
FRONTEND_SECRET = "frontend-bundle-client-secret"
TRAKT = "https://api.trakt.tv"
SECRETS = (TRAKT_ACCESS_TOKEN, TRAKT_REFRESH_TOKEN, TRAKT_CLIENT_SECRET)


class TraktClient(RecordingClient):
    """The frontend's Trakt calls: its own app credentials, and whatever tokens it was given."""

    def trakt(self, method: str, path: str, token: str | None = None, **kw):
        headers = {"trakt-api-version": "2", "trakt-api-key": FRONTEND_ID, **kw.pop("headers", {})}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        return self.request(method, TRAKT + path, headers=headers, **kw)

    def oauth(self, path: str, **fields):
        return self.trakt("POST", path, json={"client_id": FRONTEND_ID, "client_secret": FRONTEND_SECRET, **fields})

    def device_login(self) -> dict:
        code = self.trakt("POST", "/oauth/device/code", json={"client_id": FRONTEND_ID})
        assert code.status_code == 200, code.text
        device_code = code.json()["device_code"]
        assert self.oauth("/oauth/device/token", code=device_code).status_code == 400  # pending
        self.stack.fakes.trakt.approve(device_code)  # the user allows the app at trakt.tv/activate
        tokens = self.oauth("/oauth/device/token", code=device_code)
        assert tokens.status_code == 200, tokens.text
        return tokens.json()


@pytest.fixture
def client(stack):
    return TraktClient(stack)


def real_tokens(fakes) -> set[str]:
    """Every real token the fake Trakt ever issued and still knows, plus the fixed ones."""
    state = fakes.trakt
    return set(SECRETS) | set(state.access_tokens) | set(state.refresh_tokens) | set(state.refresh_tokens.values())


def assert_nothing_secret(blobs, secrets, what: str) -> None:
    for blob in blobs:
        for secret in secrets:
            assert secret.encode() not in blob, f"a real credential reached {what}"


def last(fakes, path: str):
    return [r for r in fakes.requests["trakt"] if r.path == path][-1]


def test_device_login_gives_surrogates_and_users_me_gets_the_real_token(stack, client, clean_fakes):
    tokens = client.device_login()
    access, refresh = tokens["access_token"], tokens["refresh_token"]
    assert access.startswith(SURROGATE_PREFIX) and refresh.startswith(SURROGATE_PREFIX) and access != refresh
    assert tokens["expires_in"] == 7776000 and isinstance(tokens["created_at"], int)

    # The fake saw the server's app credentials, never the frontend's.
    code_call = json.loads(last(clean_fakes, "/oauth/device/code").body)
    assert code_call["client_id"] == TRAKT_CLIENT_ID
    token_call = last(clean_fakes, "/oauth/device/token")
    assert json.loads(token_call.body)["client_secret"] == TRAKT_CLIENT_SECRET
    assert token_call.headers["trakt-api-key"] == TRAKT_CLIENT_ID

    me = client.trakt("GET", "/users/me?extended=full", token=access)
    assert me.status_code == 200 and me.json()["username"] == "mrandersson"
    received = last(clean_fakes, "/users/me")
    assert received.headers["Authorization"] == f"Bearer {TRAKT_ACCESS_TOKEN}"
    assert received.headers["trakt-api-key"] == TRAKT_CLIENT_ID
    history = client.trakt("GET", "/users/me/history/movies", token=access)
    assert history.status_code == 200 and history.json()

    assert_nothing_secret(client.received, [*SECRETS, TRAKT_CLIENT_ID], "the client")
    assert stack.wait_usage("route = 'trakt.me' AND credential = 'vault'")


def test_public_lists_get_the_server_client_id(stack, client, clean_fakes):
    r = client.trakt("GET", "/movies/trending?limit=3")
    assert r.status_code == 200 and len(r.json()) == 3
    assert last(clean_fakes, "/movies/trending").headers["trakt-api-key"] == TRAKT_CLIENT_ID
    assert "Authorization" not in last(clean_fakes, "/movies/trending").headers
    assert stack.wait_usage("route = 'trakt.public-lists' AND credential = 'default'")


def test_refresh_yields_new_surrogates_that_work(stack, client, clean_fakes):
    old = client.device_login()
    r = client.oauth("/oauth/token", refresh_token=old["refresh_token"], grant_type="refresh_token",
                     redirect_uri="urn:ietf:wg:oauth:2.0:oob")
    assert r.status_code == 200, r.text
    new = r.json()
    assert new["access_token"].startswith(SURROGATE_PREFIX) and new["refresh_token"].startswith(SURROGATE_PREFIX)
    assert {new["access_token"], new["refresh_token"]}.isdisjoint({old["access_token"], old["refresh_token"]})
    sent = json.loads(last(clean_fakes, "/oauth/token").body)
    assert sent["refresh_token"] == TRAKT_REFRESH_TOKEN and sent["client_secret"] == TRAKT_CLIENT_SECRET

    assert client.trakt("GET", "/users/me", token=new["access_token"]).status_code == 200
    new_real = last(clean_fakes, "/users/me").headers["Authorization"].removeprefix("Bearer ")
    assert new_real in clean_fakes.trakt.access_tokens and new_real != TRAKT_ACCESS_TOKEN

    # A refresh token is single use: the spent surrogate is refused without asking Trakt.
    calls = len(clean_fakes.requests["trakt"])
    again = client.oauth("/oauth/token", refresh_token=old["refresh_token"], grant_type="refresh_token")
    assert again.status_code == 401 and again.json()["error"] == "invalid_grant"
    assert len(clean_fakes.requests["trakt"]) == calls

    assert_nothing_secret(client.received, [*real_tokens(clean_fakes), TRAKT_CLIENT_ID], "the client")


def test_revoke_revokes_upstream_and_the_surrogate(stack, client, clean_fakes):
    tokens = client.device_login()
    r = client.oauth("/oauth/revoke", token=tokens["access_token"])
    assert r.status_code == 200, r.text
    sent = json.loads(last(clean_fakes, "/oauth/revoke").body)
    assert sent == {"client_id": TRAKT_CLIENT_ID, "client_secret": TRAKT_CLIENT_SECRET, "token": TRAKT_ACCESS_TOKEN}
    assert TRAKT_ACCESS_TOKEN not in clean_fakes.trakt.access_tokens
    clean_fakes.clear()
    assert client.trakt("GET", "/users/me", token=tokens["access_token"]).status_code == 401
    assert clean_fakes.requests["trakt"] == []
    # Logging in again gives a fresh surrogate that works.
    fresh = client.device_login()["access_token"]
    assert fresh != tokens["access_token"]
    assert client.trakt("GET", "/users/me", token=fresh).status_code == 200
    assert_nothing_secret(client.received, [*SECRETS, TRAKT_CLIENT_ID], "the client")


@pytest.mark.parametrize("case", ["unknown", "tampered", "other kind", "refresh as access"])
def test_bad_surrogates_get_401_without_an_upstream_call(stack, client, clean_fakes, vault, case):
    tokens = client.device_login()
    token = {
        "unknown": SURROGATE_PREFIX + "A" * 32,
        "tampered": tokens["access_token"][:-1] + ("A" if tokens["access_token"][-1] != "A" else "B"),
        "other kind": vault.surrogate_for("plex", "some-plex-token", None),
        "refresh as access": tokens["refresh_token"],
    }[case]
    clean_fakes.clear()
    r = client.trakt("GET", "/users/me", token=token, headers={"Origin": "http://player.example"})
    assert r.status_code == 401 and r.json()["error"] == "invalid_grant"
    assert r.headers["Access-Control-Allow-Origin"]
    wrong_refresh = tokens["access_token"] if case == "refresh as access" else token
    refresh = client.oauth("/oauth/token", refresh_token=wrong_refresh, grant_type="refresh_token")
    assert refresh.status_code == 401
    assert clean_fakes.requests["trakt"] == []


def test_an_old_client_with_a_real_token_keeps_working_and_is_vaulted(stack, client, clean_fakes, vault):
    client.device_login()  # makes sure the fake knows the token again (another test may have revoked it)
    r = client.trakt("GET", "/users/me", token=TRAKT_ACCESS_TOKEN)
    assert r.status_code == 200
    assert last(clean_fakes, "/users/me").headers["trakt-api-key"] == TRAKT_CLIENT_ID
    assert vault.find_real("trakt_access", TRAKT_ACCESS_TOKEN) is not None
    assert stack.wait_usage("route = 'trakt.me' AND credential = 'client'")


def test_no_trakt_secret_at_rest_in_logs_or_usage(stack, client, clean_fakes):
    started = time.time()  # the stack is shared by the whole session: judge only this test's rows
    tokens = client.device_login()
    client.oauth("/oauth/token", refresh_token=tokens["refresh_token"], grant_type="refresh_token")
    files = [p for p in stack.home.rglob("*") if p.is_file() and p.name != "secret.key"]
    assert {"projectionist.db", "stack.log"} <= {p.name for p in files}
    assert_nothing_secret([p.read_bytes() for p in files], real_tokens(clean_fakes), "a file under PROJECTIONIST_HOME")

    stack.wait_usage("upstream = 'trakt' AND route = 'trakt.oauth' AND ts >= ?", (started,), count=4)
    rows = stack.usage("upstream = 'trakt' AND ts >= ?", (started,))
    # Every call that reached Trakt says which credential it carried; refused ones carried none.
    uncredited = [row for row in rows if row["credential"] not in ("vault", "client", "default") and row["status"] != 401]
    assert rows and not uncredited, uncredited
    assert any(row["credential"] == "vault" for row in rows) and any(row["credential"] == "default" for row in rows)
    blob = json.dumps(rows, default=str)
    assert SURROGATE_PREFIX not in blob
    assert_nothing_secret([blob.encode()], [*real_tokens(clean_fakes), TRAKT_CLIENT_ID], "a usage row")
