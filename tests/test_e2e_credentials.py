"""Server-side credentials, end to end: the client only ever holds surrogates.

A recording client goes through the PIN login, resources, library and playback start with the
real stack and the fakes; every byte it receives (status line, headers, body) is scanned for the
real tokens, and so are the SQLite files and the logs.
"""

from __future__ import annotations

import sqlite3
import uuid

import pytest
import requests

from fake_upstreams.data import (
    PLEX_ACCOUNT_TOKEN,
    PLEX_ACCOUNT_TOKEN_2,
    PLEX_SERVER_TOKEN,
    PLEX_SERVER_TOKEN_2,
    TMDB_V3_KEY,
    TMDB_V4_TOKEN,
)
from projectionist.vault import SURROGATE_PREFIX, SecretBox, Vault

pytestmark = pytest.mark.e2e

REAL_SECRETS = (PLEX_ACCOUNT_TOKEN, PLEX_ACCOUNT_TOKEN_2, PLEX_SERVER_TOKEN, PLEX_SERVER_TOKEN_2,
                TMDB_V3_KEY, TMDB_V4_TOKEN)


class RecordingClient:
    """A player's view of the world: plex.tv and TMDB through the proxy, Plex via the reverse URL."""

    def __init__(self, stack) -> None:
        self.stack = stack
        self.session = requests.Session()
        self.session.trust_env = False
        self.session.proxies = {"https": stack.proxy_url}
        self.session.verify = str(stack.ca_path)
        self.client_id = str(uuid.uuid4())
        self.received: list[bytes] = []

    def request(self, method: str, url: str, **kw) -> requests.Response:
        headers = {"X-Plex-Client-Identifier": self.client_id, "X-Plex-Product": "Player",
                   "Accept": "application/json", **kw.pop("headers", {})}
        r = self.session.request(method, url, headers=headers, timeout=30, **kw)
        self.received.append(f"HTTP/1.1 {r.status_code} {r.reason}\r\n".encode()
                             + b"".join(f"{k}: {v}\r\n".encode() for k, v in r.headers.items())
                             + b"\r\n" + r.content)
        return r

    def login(self, account_token: str) -> str:
        """The frontend's PIN flow; returns what it stores as plexAccountToken."""
        pin = self.request("POST", "https://plex.tv/api/v2/pins?strong=true").json()
        assert self.request("GET", f"https://plex.tv/api/v2/pins/{pin['id']}").json()["authToken"] is None
        self.stack.fakes.plextv.link_pin(pin["id"], account_token=account_token)
        return self.request("GET", f"https://plex.tv/api/v2/pins/{pin['id']}").json()["authToken"]

    def server(self, account_surrogate: str) -> dict:
        resources = self.request("GET", "https://plex.tv/api/v2/resources?includeHttps=1&includeRelay=1",
                                 headers={"X-Plex-Token": account_surrogate}).json()
        return next(r for r in resources if "server" in r["provides"])


@pytest.fixture
def player(stack):
    return RecordingClient(stack)


def assert_no_secret_in(blobs, what: str) -> None:
    for blob in blobs:
        for secret in REAL_SECRETS:
            assert secret.encode() not in blob, f"a real credential reached {what}"


def test_login_resources_library_playback_with_surrogates_only(stack, player, clean_fakes):
    account = player.login(PLEX_ACCOUNT_TOKEN)
    assert account.startswith(SURROGATE_PREFIX)

    user = player.request("GET", "https://plex.tv/api/v2/user", headers={"X-Plex-Token": account}).json()
    assert user["username"] and user["authToken"] == account  # the same surrogate, not the real token
    assert clean_fakes.requests["plextv"][-1].headers["X-Plex-Token"] == PLEX_ACCOUNT_TOKEN

    server = player.server(account)
    server_token = server["accessToken"]
    assert server_token.startswith(SURROGATE_PREFIX) and server_token != account
    assert {c["uri"] for c in server["connections"]} == {stack.plex_url}  # the player keeps using the proxy

    base = server["connections"][0]["uri"]
    sections = player.request("GET", f"{base}/library/sections?X-Plex-Token={server_token}").json()
    assert "Films" in [d["title"] for d in sections["MediaContainer"]["Directory"]]
    assert clean_fakes.requests["plex"][-1].query["X-Plex-Token"] == [PLEX_SERVER_TOKEN]

    # Playback start: decision and manifest carry the token; segments carry none.
    sid = str(uuid.uuid4())
    qs = f"path=%2Flibrary%2Fmetadata%2F1001&session={sid}&protocol=dash&X-Plex-Token={server_token}"
    assert player.request("GET", f"{base}/video/:/transcode/universal/decision?{qs}").status_code == 200
    mpd = player.request("GET", f"{base}/video/:/transcode/universal/start.mpd?{qs}")
    assert mpd.status_code == 200 and b"SegmentTemplate" in mpd.content
    segment = player.request("GET", f"{base}/video/:/transcode/universal/session/{sid}/0/header")
    assert segment.status_code == 200 and segment.content
    assert clean_fakes.requests["plex"][-1].query["X-Plex-Token"] == [PLEX_SERVER_TOKEN]

    assert_no_secret_in(player.received, "the client")
    rows = stack.wait_usage("route = 'plex.transcode.segment'")
    assert rows[-1]["user_id"] == stack.usage("route = 'plex.sections'")[-1]["user_id"] is not None


def test_plexapi_works_with_a_surrogate(stack, player):
    server_token = player.server(player.login(PLEX_ACCOUNT_TOKEN))["accessToken"]
    titles = stack.run_client(
        "import json; from plexapi.server import PlexServer\n"
        "print(json.dumps([m.title for m in PlexServer().library.section('Films').all()]))",
        PLEXAPI_AUTH_SERVER_BASEURL=stack.plex_url, PLEXAPI_AUTH_SERVER_TOKEN=server_token,
    )
    assert "The Matrix" in titles


def test_xml_resources_for_plexapi_carry_surrogates(stack, player):
    account = player.login(PLEX_ACCOUNT_TOKEN)
    xml = player.request("GET", "https://plex.tv/api/v2/resources?includeHttps=1",
                         headers={"X-Plex-Token": account, "Accept": "application/xml"})
    assert xml.status_code == 200 and b'accessToken="pj_' in xml.content
    assert f'uri="{stack.plex_url}"'.encode() in xml.content
    assert_no_secret_in(player.received, "the client")


@pytest.mark.parametrize("case", ["missing", "unknown", "tampered", "other kind"])
def test_bad_plex_credentials_get_401_without_an_upstream_call(stack, player, clean_fakes, case):
    server_token = player.server(player.login(PLEX_ACCOUNT_TOKEN))["accessToken"]
    token = {
        "missing": None,
        "unknown": SURROGATE_PREFIX + "A" * 32,
        "tampered": server_token[:-1] + ("A" if server_token[-1] != "A" else "B"),
        "other kind": None,
    }[case]
    if case == "other kind":
        vault = Vault(stack.db_path, SecretBox.load(stack.home, create=False))
        token = vault.surrogate_for("trakt_access", "some-trakt-token", None)
        vault.close()
    clean_fakes.clear()
    url = f"{stack.plex_url}/library/sections" + (f"?X-Plex-Token={token}" if token else "")
    r = player.request("GET", url, headers={"Origin": "http://player.example"})
    assert r.status_code == 401
    assert r.headers["Content-Type"] == "text/html" and b"401 Unauthorized" in r.content  # PMS's own format
    assert r.headers["Access-Control-Allow-Origin"] == "http://player.example"
    assert clean_fakes.requests["plex"] == []


def test_surrogates_of_two_users_in_one_request_are_refused(stack, player, clean_fakes):
    token_a = player.server(player.login(PLEX_ACCOUNT_TOKEN))["accessToken"]
    other = RecordingClient(stack)
    token_b = other.server(other.login(PLEX_ACCOUNT_TOKEN_2))["accessToken"]
    assert token_a != token_b
    clean_fakes.clear()
    r = player.request("GET", f"{stack.plex_url}/library/sections?X-Plex-Token={token_a}",
                       headers={"X-Plex-Token": token_b})
    assert r.status_code == 401 and clean_fakes.requests["plex"] == []
    assert_no_secret_in(player.received + other.received, "the clients")


def test_revoked_surrogates_are_refused_in_plex_tv_format(stack, player, clean_fakes, vault):
    account = player.login(PLEX_ACCOUNT_TOKEN)
    server_token = player.server(account)["accessToken"]
    user_id = vault.resolve(account).user_id
    assert vault.revoke_user(user_id) >= 2  # what logout does
    clean_fakes.clear()
    r = player.request("GET", "https://plex.tv/api/v2/user", headers={"X-Plex-Token": account})
    assert r.status_code == 401
    assert r.json() == {"errors": [{"code": 1001, "message": "User could not be authenticated", "status": 401}]}
    assert player.request("GET", f"{stack.plex_url}/library/sections?X-Plex-Token={server_token}").status_code == 401
    assert clean_fakes.requests["plextv"] == [] and clean_fakes.requests["plex"] == []
    # Logging in again gives new surrogates that work.
    fresh = player.server(player.login(PLEX_ACCOUNT_TOKEN))["accessToken"]
    assert fresh != server_token
    assert player.request("GET", f"{stack.plex_url}/library/sections?X-Plex-Token={fresh}").status_code == 200


def test_an_old_client_with_a_real_token_keeps_working_and_gets_surrogates(stack, player, clean_fakes):
    r = player.request("GET", "https://plex.tv/api/v2/resources", headers={"X-Plex-Token": PLEX_ACCOUNT_TOKEN})
    assert r.status_code == 200
    server = next(x for x in r.json() if "server" in x["provides"])
    assert server["accessToken"].startswith(SURROGATE_PREFIX)
    assert player.request("GET", f"{stack.plex_url}/library/sections?X-Plex-Token={server['accessToken']}"
                          ).status_code == 200


def test_tmdb_gets_the_server_key_whatever_the_client_sends(stack, clean_fakes):
    info = stack.run_client(
        "import json, tmdbsimple; print(json.dumps(tmdbsimple.Movies(603).info()))",
        TMDB_API_KEY="placeholder-the-user-typed",
    )
    assert info["title"] == "The Matrix"
    received = clean_fakes.requests["tmdb"][-1]
    assert received.query["api_key"] == [TMDB_V3_KEY] and "Authorization" not in received.headers
    row = stack.wait_usage("route = 'tmdb.details' AND credential = 'default'")[-1]
    assert row["credential"] == "default"


def test_tmdb_uses_a_users_custom_key_for_their_surrogate(stack, player, clean_fakes, vault):
    account = player.login(PLEX_ACCOUNT_TOKEN)
    user_id = vault.resolve(account).user_id
    vault.set_user_credential(user_id, "tmdb", TMDB_V4_TOKEN)
    try:
        r = player.request("GET", "https://api.themoviedb.org/3/movie/603",
                           headers={"Authorization": f"Bearer {account}"})
        assert r.status_code == 200 and r.json()["title"] == "The Matrix"
        received = clean_fakes.requests["tmdb"][-1]
        assert received.headers["Authorization"] == f"Bearer {TMDB_V4_TOKEN}" and "api_key" not in received.query
        row = stack.wait_usage("route = 'tmdb.details' AND credential = 'custom'")[-1]
        assert row["user_id"] == user_id
    finally:
        vault.delete_user_credential(user_id, "tmdb")
    assert_no_secret_in(player.received, "the client")


def test_no_real_credential_at_rest_or_in_logs(stack, player):
    player.server(player.login(PLEX_ACCOUNT_TOKEN))  # make sure the vault holds something
    # Everything the stack wrote: the database and its WAL, the caches, the CA, and stack.log, which
    # holds every service's log lines.
    files = [p for p in stack.home.rglob("*") if p.is_file() and p.name != "secret.key"]
    assert {"projectionist.db", "stack.log"} <= {p.name for p in files}
    assert_no_secret_in([p.read_bytes() for p in files], "a file under PROJECTIONIST_HOME")
    count = sqlite3.connect(stack.db_path).execute("SELECT count(*) FROM vault_tokens").fetchone()[0]
    assert count >= 2
