"""Cache administration through the control plane, against the running proxy."""

from __future__ import annotations

import re
import sqlite3
from contextlib import closing

import pytest

from fake_upstreams.data import PLEX_ACCOUNT_TOKEN, PLEX_ACCOUNT_TOKEN_2

from support import wait_for
from test_control_e2e import ControlClient, admin_client
from test_e2e_credentials import RecordingClient

pytestmark = pytest.mark.e2e
MOVIE = "https://api.themoviedb.org/3/movie/550"


def test_stats_keys_and_flush_reach_the_proxy(stack, clean_fakes):
    player = RecordingClient(stack)
    player.request("GET", MOVIE)
    assert "hit" in player.request("GET", MOVIE).headers["Cache-Status"]
    admin = admin_client(stack)

    def details_stats():
        routes = admin.get("/api/cache/stats?hours=1").json()["routes"]
        row = next((r for r in routes if r["route"] == "tmdb.details"), None)
        return row if row and row["keys"] >= 1 and row["hits"] >= 1 else None

    stats = wait_for(details_stats, what="the cache mirror and usage rows to show the hit")
    assert stats["bucket"] == "api" and stats["bytes"] > 0 and 0 < stats["hit_ratio"] <= 1
    keys = admin.get("/api/cache/keys?route=tmdb.details&limit=500").json()
    assert keys["total"] >= 1 and all(re.fullmatch("[0-9a-f]{64}", k["key_hash"]) for k in keys["keys"])
    assert "/3/movie" not in str(keys)  # hashed keys, never URLs

    flushed = admin.request("POST", "/api/cache/flush", json={"target": "route", "value": "tmdb.details"})
    assert flushed.status_code == 202 and flushed.json()["status"] == "queued"
    wait_for(lambda: "fwd=uri-miss" in player.request("GET", MOVIE).headers["Cache-Status"],
             what="the proxy to apply the flush")


def test_flush_needs_an_admin_and_the_csrf_token(stack):
    admin = admin_client(stack)
    other = ControlClient(stack)
    other_token = PLEX_ACCOUNT_TOKEN_2 if admin.get("/api/auth/session").json()["user"]["username"] == "mrandersson" \
        else PLEX_ACCOUNT_TOKEN
    other.login(other_token)
    assert other.request("POST", "/api/cache/flush", json={"target": "all"}).status_code == 403
    assert admin.request("POST", "/api/cache/flush", json={"target": "all"}, csrf=False).status_code == 403
    bad = admin.request("POST", "/api/cache/flush", json={"target": "prefix", "value": "not-hex"})
    assert bad.status_code == 400 and bad.json()["fields"]


def test_flush_by_url_drops_that_url_for_every_user_and_variant_only(stack, clean_fakes):
    """The URL as the player sends it (token, device identity and parameter order included) names
    every user's and variant's entry of it; other URLs stay cached; no token is stored."""
    alice, bob = RecordingClient(stack), RecordingClient(stack)
    token_a = alice.server(alice.login(PLEX_ACCOUNT_TOKEN))["accessToken"]
    token_b = bob.server(bob.login(PLEX_ACCOUNT_TOKEN_2))["accessToken"]
    path = "/library/sections/1/all?sort=titleSort&X-Plex-Container-Start=0"
    other = f"{stack.plex_url}/library/sections/2/all?X-Plex-Token="
    for player, token in ((alice, token_a), (bob, token_b)):
        for accept in ("application/json", "application/xml"):
            player.request("GET", f"{stack.plex_url}{path}&X-Plex-Token={token}", headers={"Accept": accept})
        player.request("GET", other + token, headers={"Accept": "application/json"})
    admin = admin_client(stack)
    url = (f"{stack.plex_url}/library/sections/1/all?X-Plex-Container-Start=0&X-Plex-Client-Identifier=some-browser"
           f"&sort=titleSort&X-Plex-Token={token_a}")
    flushed = admin.request("POST", "/api/cache/flush", json={"target": "url", "value": url})
    assert flushed.status_code == 202 and token_a not in flushed.text
    request_id = flushed.json()["id"]
    def applied():
        with closing(sqlite3.connect(stack.db_path, timeout=10)) as conn:
            return conn.execute("SELECT value, flushed FROM cache_flush_requests WHERE id = ? AND applied_at IS NOT NULL",
                                (request_id,)).fetchone()
    value, count = wait_for(applied, what="the proxy to apply the flush by URL")
    assert count == 4 and token_a not in value and "some-browser" not in value
    for player, token in ((alice, token_a), (bob, token_b)):
        again = player.request("GET", f"{stack.plex_url}{path}&X-Plex-Token={token}", headers={"Accept": "application/json"})
        assert "detail=flushed" in again.headers["Cache-Status"]
        assert "hit" in player.request("GET", other + token, headers={"Accept": "application/json"}).headers["Cache-Status"]
    bad = admin.request("POST", "/api/cache/flush", json={"target": "url", "value": "/library/sections"})
    assert bad.status_code == 400
