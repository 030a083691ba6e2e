"""The recommendations job and `GET /api/recommendations` through the real control plane, its
SQLite file and the fake TMDB, plex.tv discover and Trakt: seeded by what the user watched (a movie,
a show's episode) and what is on their watchlists, minus what they have seen and what is already
listed, each with the titles that led to it; other users get their own."""

from __future__ import annotations

import sqlite3
import time

import requests
from support import free_port, write_test_rules
from test_jobs import Admin, control_plane
from test_watchlist_sync import connect_trakt

from fake_upstreams.data import ACCOUNTS, PLEX_ACCOUNT_TOKEN_2

# The fakes' watchlists: the owner's Plex one lists Dune: Part Two, Severance and Arrival; the
# (single) Trakt account's lists Dune: Part Two and Severance.
PLEX_LISTED = {("movie", 693134), ("tv", 95396), ("movie", 329865)}
TRAKT_LISTED = {("movie", 693134), ("tv", 95396)}


def test_recommendations_from_what_the_user_watched(tmp_path, fakes):
    write_test_rules(tmp_path / "rules.yaml", free_port())
    with control_plane(tmp_path, fakes) as control:
        admin = Admin(control, fakes)
        other = Admin(control, fakes, PLEX_ACCOUNT_TOKEN_2)
        assert admin.run("library-sync")["status"] == "ok"
        conn = sqlite3.connect(tmp_path / "projectionist.db", isolation_level=None)
        user_id = conn.execute("SELECT min(id) FROM users").fetchone()[0]
        matrix = conn.execute("SELECT rating_key FROM media_items WHERE title = 'The Matrix'").fetchone()[0]
        episode = conn.execute("SELECT rating_key FROM media_items WHERE type = 'episode' "
                               "AND grandparent_title = 'Breaking Bad' LIMIT 1").fetchone()[0]
        now = time.time()
        for i, key in enumerate((matrix, episode)):
            conn.execute("INSERT INTO plays (user_id, rating_key, started_at, last_seen_at, state) "
                         "VALUES (?, ?, ?, ?, 'stopped')", (user_id, key, now - 100 * i, now - 100 * i))
        assert admin.get("/api/recommendations").json() == {"refreshed_at": None, "items": []}

        fakes.clear()
        run = admin.run("recommendations")
        assert run["status"] == "ok" and run["items"] > 0, run
        asked = {r.path for r in fakes.requests["tmdb"]}
        assert {"/3/movie/603/recommendations", "/3/tv/1396/recommendations"} <= asked
        # the watchlist seeds too
        assert {"/3/movie/693134/recommendations", "/3/tv/95396/recommendations",
                "/3/movie/329865/recommendations"} <= asked
        assert all(r.query.get("api_key") for r in fakes.requests["tmdb"])  # the server's key, never a user's

        body = admin.get("/api/recommendations").json()
        assert body["refreshed_at"] and len(body["items"]) == run["items"]
        keys = {(i["media_type"], i["tmdb_id"]) for i in body["items"]}
        assert ("movie", 603) not in keys and ("tv", 1396) not in keys  # seen: left out
        assert not keys & PLEX_LISTED  # already on the watchlist: left out
        reloaded = next(i for i in body["items"] if i["tmdb_id"] == 604)
        assert reloaded["title"] == "The Matrix Reloaded" and reloaded["because"][0] == "The Matrix"
        assert any("Dune: Part Two" in i["because"] for i in body["items"])  # a watchlist seed
        scores = [i["score"] for i in body["items"]]
        assert scores == sorted(scores, reverse=True)
        assert other.get("/api/recommendations").json()["items"] == []  # nothing watched, nothing listed

        # the other user has not watched anything, but their Trakt watchlist seeds theirs
        other_id = conn.execute("SELECT id FROM users WHERE plex_account_id = ?", (str(ACCOUNTS[1].id),)).fetchone()[0]
        connect_trakt(control, other_id)
        fakes.clear()
        assert admin.run("recommendations")["status"] == "ok"
        assert any(r.path == "/sync/watchlist" for r in fakes.requests["trakt"])
        theirs = other.get("/api/recommendations").json()["items"]
        assert theirs and not {(i["media_type"], i["tmdb_id"]) for i in theirs} & TRAKT_LISTED
        assert {b for i in theirs for b in i["because"]} <= {"Dune: Part Two", "Severance"}
        assert requests.get(control.url + "/api/recommendations", timeout=10).status_code == 401
        conn.close()
