"""The admin pages' JSON views on a database of their own: what is playing now (direct play or
transcode, from the user's Plex routes since the play began; stopped and silent plays left out), and
each rate limit's forwarded requests (of its credential kind only) and events."""

from __future__ import annotations

import time

import pytest
from support import REPO

from control.admin_ui import activity, limit_use
from projectionist.live_activity import ACTIVE_WITHIN, DASHBOARD_QUERIES, QUERY_NAME
from projectionist.rules import load_rules
from projectionist.store import connect, migrate


@pytest.fixture
def conn(tmp_path):
    conn = connect(tmp_path / "projectionist.db")
    migrate(conn)
    for user_id, name in ((1, "neo"), (2, "trinity"), (3, "morpheus")):
        conn.execute("INSERT INTO users (id, username, created_at) VALUES (?, ?, '2024-01-01')", (user_id, name))
    conn.execute("INSERT INTO media_items (rating_key, type, title, year, updated_at) VALUES ('1001', 'movie', "
                 "'The Matrix', 1999, 0)")
    yield conn
    conn.close()


def _play(conn, user_id: int, started: float, last_seen: float, stopped: float | None = None,
          state: str = "playing") -> int:
    return conn.execute(
        "INSERT INTO plays (user_id, rating_key, player, started_at, last_seen_at, stopped_at, state, position_ms, "
        "duration_ms) VALUES (?, '1001', 'Plex Web / Firefox', ?, ?, ?, ?, 30000, 120000)",
        (user_id, started, last_seen, stopped, state)).lastrowid


def _use(conn, ts: float, user_id: int | None, upstream: str, route: str, cache: str = "none",
         credential: str | None = None, status: int = 200) -> None:
    conn.execute("INSERT INTO usage_events (ts, listener, upstream, route, method, status, cache, user_id, credential) "
                 "VALUES (?, 'reverse', ?, ?, 'GET', ?, ?, ?, ?)", (ts, upstream, route, status, cache, user_id, credential))


def test_activity_shows_open_recent_plays_with_how_they_are_delivered(conn):
    now = time.time()
    direct = _play(conn, 1, now - 300, now - 1)
    transcoded = _play(conn, 2, now - 200, now - 2, state="paused")
    _play(conn, 3, now - 900, now - 800, stopped=now - 800)  # over
    _play(conn, 3, now - 900, now - ACTIVE_WITHIN - 5)  # silent for too long
    _use(conn, now - 290, 1, "plex", "plex.part")
    _use(conn, now - 190, 2, "plex", "plex.part")
    _use(conn, now - 180, 2, "plex", "plex.transcode.segment")  # switched to the transcoder
    _use(conn, now - 3600, 1, "plex", "plex.transcode.segment")  # long before this play
    plays = {p.play_id: p for p in activity(conn, now).plays}
    assert set(plays) == {direct, transcoded}
    assert (plays[direct].username, plays[direct].title, plays[direct].delivery) == ("neo", "The Matrix (1999)", "direct")
    assert (plays[transcoded].state, plays[transcoded].delivery, plays[transcoded].progress_pct) == ("paused", "transcode", 25)
    assert plays[direct].client == "Plex Web / Firefox"
    # The dashboard's canned query is the same query, on the database's clock.
    dashboard = conn.execute(DASHBOARD_QUERIES[QUERY_NAME]["sql"]).fetchall()
    assert {row[0]: row[9] for row in dashboard} == {direct: "direct", transcoded: "transcode"}


def test_limit_use_counts_forwarded_requests_of_its_credential_kind_and_its_events(conn):
    now = time.time()
    model = load_rules(REPO / "rules.yaml").model
    for i in range(3):
        _use(conn, now - 10 - i, None, "tmdb", "tmdb.details", credential="default")
    _use(conn, now - 10, None, "tmdb", "tmdb.details", cache="hit", credential="default")  # took no slot
    _use(conn, now - 600, 1, "tmdb", "tmdb.details", credential="custom")
    conn.executemany("INSERT INTO rate_limit_events (ts, upstream, rule, waited_ms, outcome) VALUES (?, 'tmdb', ?, ?, ?)",
                     [(now - 5, "tmdb-default", 800.0, "queued"), (now - 4, "tmdb-default", 0, "refused"),
                      (now - 3, "throttle:plex.timeline", 0, "throttled")])
    limits, other = limit_use(conn, model, 1, now)
    by_name = {limit.name: limit for limit in limits}
    default, custom = by_name["tmdb-default"], by_name["tmdb-custom"]
    assert (default.rate_per_second, default.burst, default.per, default.upstreams) == (2, 20, "credential", ["tmdb"])
    assert (default.forwarded_last_minute, default.forwarded, default.queued, default.refused) == (3, 3, 1, 1)
    assert default.waited_ms_max == 800.0 and default.last_event_at is not None
    assert (custom.forwarded_last_minute, custom.forwarded, custom.queued) == (0, 1, 0)
    assert by_name["client"].forwarded == 4  # any credential
    assert [(o.rule, o.outcome, o.events) for o in other] == [("throttle:plex.timeline", "throttled", 1)]
