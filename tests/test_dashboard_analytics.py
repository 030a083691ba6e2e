"""The data behind the dashboard: hourly rollups with latency histograms, credential and rate-limit
rollups, viewing history from playback traffic, and the canned queries of datasette_metadata.yml
run against it (straight through sqlite3, so each check is quick and exact)."""

from __future__ import annotations

import json
import re
import sqlite3
import statistics
import time
from pathlib import Path

import pytest
import requests
import yaml
from mitmproxy.test import taddons, tflow, tutils

from projectionist.analytics import (
    MetadataBody,
    PlaybackReport,
    PlaybackWriter,
    client_hash,
    histogram_sums_sql,
    parse_metadata,
    percentile_sql,
)
from projectionist.rules import load_rules
from projectionist.store import LATENCY_BOUNDS_MS, SCHEMA_VERSION, UsageEvent, UsageWriter, connect, open_db
from proxy_addons import flowinfo
from proxy_addons.viewing_history import ViewingHistory

from support import load_bench

REPO = Path(__file__).resolve().parent.parent
METADATA = yaml.safe_load((REPO / "datasette_metadata.yml").read_text())
QUERIES = METADATA["databases"]["projectionist"]["queries"]
HOUR = 1_700_002_800.0  # 2023-11-14T23:00:00Z, the start of an hour


def event(ts: float, **kw) -> UsageEvent:
    values = dict(listener="regular", upstream="tmdb", route="tmdb.details", method="GET", status=200,
                  latency_ms=5.0, bytes_out=100, cache="miss")
    values.update(kw)
    return UsageEvent(ts=ts, **values)


def run_query(conn: sqlite3.Connection, name: str, **params) -> list[dict]:
    sql = QUERIES[name]["sql"]
    values = {p: "" for p in re.findall(r"(?<!:):(\w+)", sql)}
    values.update(params)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute(sql, values)]
    finally:
        conn.row_factory = None


@pytest.fixture
def db(tmp_path):
    path = tmp_path / "projectionist.db"
    open_db(path).conn.close()
    conn = connect(path)
    for user_id in (5, 9):
        conn.execute("INSERT INTO users (id, username, created_at) VALUES (?, ?, '2024-01-01')", (user_id, f"u{user_id}"))
    yield path, conn
    conn.close()


# --- rollups -----------------------------------------------------------------------------------------

def test_migration_4_adds_the_analytics_schema(db):
    path, conn = db
    assert SCHEMA_VERSION >= 4
    assert 4 in {r[0] for r in conn.execute("SELECT version FROM schema_migrations")}
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type IN ('table', 'view')")}
    assert {"credential_hourly", "rate_limit_hourly", "plays", "media_items", "play_history", "user_activity"} <= tables
    columns = {r[1] for r in conn.execute("PRAGMA table_info(usage_hourly)")}
    assert {f"lat_le_{b}" for b in LATENCY_BOUNDS_MS} | {"latency_count", "cache_bytes", "rate_limited"} <= columns


def test_hourly_rollup_counts_and_latency_histogram(db):
    path, conn = db
    latencies = [0.5, 1.5, 3, 7, 7, 20, 40, 80, 200, 400, 900, 2000, 4000, 8000, 15000] * 20
    events = [event(HOUR + i, latency_ms=lat, status=[200, 404, 429, 503][i % 4],
                    cache=["hit", "miss", "stale", "none"][i % 4], bytes_out=1000, bytes_in=10,
                    credential="default" if i % 2 else "custom", user_id=None)
              for i, lat in enumerate(latencies)]
    events.append(event(HOUR + 3599, latency_ms=None, status=None, error="connection failed", bytes_out=0,
                        cache="none"))
    writer = UsageWriter(path)
    assert writer._write(conn, events[:100]) and writer._write(conn, events[100:])  # two batches, one row
    row = dict(zip([d[0] for d in conn.execute("SELECT * FROM usage_hourly").description],
                   conn.execute("SELECT * FROM usage_hourly").fetchone(), strict=True))
    n = len(latencies)
    assert row["hour"] == "2023-11-14T23:00" and row["requests"] == n + 1
    assert row["errors"] == n // 4 + 1 and row["client_errors"] == n // 2 and row["rate_limited"] == n // 4
    assert (row["cache_hits"], row["cache_misses"], row["cache_stale"]) == (n // 4, n // 4, n // 4)
    assert row["cache_bytes"] == 1000 * n // 2 and row["bytes_in"] == 10 * n
    assert row["latency_count"] == n and row["latency_ms_max"] == 15000
    for bound in LATENCY_BOUNDS_MS:
        assert row[f"lat_le_{bound}"] == sum(lat <= bound for lat in latencies), bound
    credentials = dict(conn.execute("SELECT credential, requests FROM credential_hourly").fetchall())
    assert credentials == {"default": n // 2, "custom": n // 2}


@pytest.mark.parametrize("p", [0.5, 0.95])
def test_percentiles_from_the_histogram_fall_in_the_right_bucket(db, p):
    """Interpolated percentiles over any group of rollup rows land in the bucket of the true one."""
    path, conn = db
    import random

    rng = random.Random(7)
    latencies = [rng.lognormvariate(3.5, 1.2) for _ in range(3000)]
    events = [event(HOUR + (i % 5) * 3600 + i % 3600, latency_ms=round(lat, 2),
                    route=["tmdb.details", "tmdb.search", "tmdb.trending"][i % 3], user_id=None)
              for i, lat in enumerate(latencies)]
    assert UsageWriter._write(conn, events)
    true = statistics.quantiles(latencies, n=100, method="inclusive")[int(p * 100) - 1]
    estimate = conn.execute(f"SELECT {percentile_sql(p)} FROM (SELECT {histogram_sums_sql()} FROM usage_hourly)"
                            ).fetchone()[0]
    bounds = (0, *LATENCY_BOUNDS_MS, max(latencies))
    bucket = next(i for i, b in enumerate(bounds) if true <= b)
    assert bounds[bucket - 1] <= estimate <= bounds[bucket], (true, estimate)


def test_canned_queries_embed_the_percentile_expression():
    squash = lambda text: re.sub(r"\s+", " ", text).strip()  # noqa: E731
    expected = {squash(percentile_sql(0.5)), squash(percentile_sql(0.95))}
    histogram = squash(histogram_sums_sql())
    for name, query in QUERIES.items():
        sql = squash(query["sql"])
        found = set(re.findall(r"CASE WHEN coalesce\(n, 0\) = 0 THEN NULL .*? END(?=, 1\))", sql))
        assert found <= expected, (name, found - expected)
        if found:
            assert histogram in sql, name


def test_rate_limit_events_roll_up_by_trigger(db):
    path, conn = db
    for i, outcome in enumerate(["queued", "queued", "refused"]):
        conn.execute("INSERT INTO rate_limit_events (ts, user_id, upstream, rule, waited_ms, outcome) "
                     "VALUES (?, NULL, 'tmdb', 'tmdb-per-ip', ?, ?)", (HOUR + i, 100.0 * (i + 1), outcome))
    rows = conn.execute("SELECT outcome, events, waited_ms_sum, waited_ms_max FROM rate_limit_hourly ORDER BY 1").fetchall()
    assert rows == [("queued", 2, 300.0, 200.0), ("refused", 1, 300.0, 300.0)]


def test_every_canned_query_runs_and_agrees_with_the_raw_rows(tmp_path):
    """Over generated data: each query answers with rows; the rollup-based ones agree with
    aggregates computed from usage_events itself."""
    path = tmp_path / "projectionist.db"
    load_bench("dashboard").generate(path, 6000, days=3, plays=30)
    conn = connect(path)
    for name in QUERIES:
        assert run_query(conn, name), f"{name}: no rows"
        assert run_query(conn, name, user="nobody-such", since="2000-01-01", until="2000-01-02") in ([], [
            {k: None for k in run_query(conn, name)[0]}]) or name in ("cache_overview", "overview", "dashboard_tiles")
    # The home's tiles say what the overview says (zeros, not blanks, on an empty range).
    tiles, overview = run_query(conn, "dashboard_tiles")[0], run_query(conn, "overview")[0]
    assert (tiles["active_users"], tiles["errors"], tiles["cache_hit_pct"], tiles["mb_from_cache"]) == (
        overview["active_users"], overview["errors"], overview["cache_hit_pct"], overview["mb_from_cache"])
    assert run_query(conn, "dashboard_tiles", since="2000-01-01", until="2000-01-02") == [
        {"plays_today": 0, "active_users": 0, "cache_hit_pct": "-", "mb_from_cache": 0.0, "errors": 0}]
    raw = dict(((h, u), n) for h, u, n in conn.execute(
        "SELECT strftime('%Y-%m-%dT%H:00', ts, 'unixepoch'), upstream, count(*) FROM usage_events GROUP BY 1, 2"))
    per_hour = {(r["hour"], r["upstream"]): r["requests"] for r in run_query(conn, "requests_per_hour")}
    assert per_hour == raw
    alice = run_query(conn, "requests_per_hour", user="alice", upstream="tmdb")
    assert sum(r["requests"] for r in alice) == conn.execute(
        "SELECT count(*) FROM usage_events WHERE user_id = 1 AND upstream = 'tmdb'").fetchone()[0]
    by_id = run_query(conn, "requests_per_hour", user="1", upstream="tmdb")
    assert by_id == alice
    volume = {r["route"]: r["requests"] for r in run_query(conn, "top_routes_by_volume")}
    assert volume == dict(conn.execute("SELECT route, count(*) FROM usage_events GROUP BY route"))
    errors = sum(r["errors"] for r in run_query(conn, "errors_per_hour"))
    assert errors == conn.execute("SELECT count(*) FROM usage_events WHERE status >= 500 OR status IS NULL "
                                  "OR error IS NOT NULL").fetchone()[0]
    keys = {r["credential"]: 0 for r in run_query(conn, "tmdb_key_usage")}
    assert set(keys) == {"default", "custom"}
    reasons = {(r["route"], r["reason"]): r["requests"] for r in run_query(conn, "cache_misses_by_reason")}
    assert reasons == {(route, reason): n for route, reason, n in conn.execute(
        "SELECT route, cache_reason, count(*) FROM usage_events WHERE cache_reason IS NOT NULL GROUP BY 1, 2")}
    assert ("tmdb.details", "uri-miss:new-partition") in reasons
    plays = run_query(conn, "plays_by_day")
    assert sum(r["plays"] for r in plays) == conn.execute(
        "SELECT count(*) FROM plays WHERE source = 'timeline'").fetchone()[0]
    conn.close()


def test_image_bytes_saved_adds_what_reencoding_saved(db):
    path, conn = db
    now = time.time()
    hour = time.strftime("%Y-%m-%dT%H:00", time.gmtime(now))
    image = dict(upstream="tmdb-images", route="tmdb.image", bytes_out=300_000, user_id=5)
    assert UsageWriter(path)._write(conn, [event(now, cache="miss", **image), event(now, cache="hit", **image)])
    # two answers whose originals weighed 2 MiB were sent as 600,000 bytes
    conn.execute("INSERT INTO cache_savings_hourly (hour, bucket, route, responses, source_bytes, bytes_sent, "
                 "bytes_saved) VALUES (?, 'images', 'tmdb.image', 2, 2097152, 600000, 1497152)", (hour,))
    conn.commit()
    [row] = run_query(conn, "image_bytes_saved")
    assert (row["route"], row["from_cache"], row["fetched"]) == ("tmdb.image", 1, 1)
    assert row["mb_saved"] == round(300_000 / 1048576, 2) and row["hit_pct"] == 50.0
    assert row["mb_saved_by_reencoding"] == round(1497152 / 1048576, 2)
    assert row["reencoding_saved_pct"] == round(100 * 1497152 / 2097152, 1)
    [mine] = run_query(conn, "image_bytes_saved", user="u5")  # savings are not kept per user
    assert mine["from_cache"] == 1 and mine["mb_saved_by_reencoding"] is None


# --- viewing history -----------------------------------------------------------------------------------

def report(ts, state="playing", position=0, rating_key="1001", user=5, client="device-1", **kw):
    return PlaybackReport(ts=ts, kind="timeline", rating_key=rating_key, user_id=user, client=client,
                          player="Plex Web / Chrome", state=state, position_ms=position, duration_ms=100_000, **kw)


def plays(conn) -> list[dict]:
    cursor = conn.execute("SELECT * FROM plays ORDER BY id")
    names = [d[0] for d in cursor.description]
    return [dict(zip(names, row, strict=True)) for row in cursor]


def test_timeline_reports_become_play_sessions(db):
    path, conn = db
    now = [HOUR]
    writer = PlaybackWriter(path, clock=lambda: now[0])
    # 60 s playing at 4 reports a second, 30 s paused, 30 s playing, stopped at 95 %.
    items = [report(HOUR + i / 4, position=i * 250) for i in range(240)]
    items += [report(HOUR + 60 + i / 4, "paused", 60_000) for i in range(120)]
    items += [report(HOUR + 90 + i / 4, position=60_000 + i * 250) for i in range(120)]
    items.append(report(HOUR + 120, "stopped", 95_000))
    assert writer._write(conn, items[:300]) and writer._write(conn, items[300:])  # across batches
    (play,) = plays(conn)
    assert play["user_id"] == 5 and play["rating_key"] == "1001" and play["state"] == "stopped"
    assert abs(play["watched_ms"] - 90_000) <= 500 and abs(play["paused_ms"] - 30_000) <= 500
    assert play["started_at"] == HOUR and play["stopped_at"] == HOUR + 120
    assert play["watched"] == 1 and play["position_ms"] == 95_000 and play["duration_ms"] == 100_000
    assert play["client_hash"] == client_hash("device-1") and "device-1" not in json.dumps(play)
    assert play["player"] == "Plex Web / Chrome"


def test_reports_that_arrive_out_of_order_are_one_play_in_its_latest_state(db):
    """With workers, each batches its reports: one worker's batch can reach the writer after the
    other's. A late report neither rewinds the play nor, after its stop, opens another one."""
    path, conn = db
    writer = PlaybackWriter(path, clock=lambda: HOUR + 100)
    a = [report(HOUR), report(HOUR + 10, position=10_000), report(HOUR + 30, "paused", 30_000)]
    b = [report(HOUR + 20, position=20_000), report(HOUR + 40, "paused", 30_000), report(HOUR + 50, "stopped", 40_000)]
    late = [report(HOUR + 25, position=25_000), report(HOUR + 35, "paused", 30_000)]
    assert writer._write(conn, [a[0], a[1], a[2], b[0]])  # b[0] is older than a[2]
    (play,) = plays(conn)
    assert play["state"] == "paused" and play["position_ms"] == 30_000
    assert writer._write(conn, [b[1], b[2]]) and writer._write(conn, late)
    (play,) = plays(conn)
    assert (play["state"], play["position_ms"], play["stopped_at"]) == ("stopped", 40_000, HOUR + 50)
    # The same item played again afterwards is a play of its own.
    assert writer._write(conn, [report(HOUR + 60, position=0)])
    assert [p["stopped_at"] for p in plays(conn)] == [HOUR + 50, None]


def test_sessions_split_on_another_item_a_gap_or_a_restart(db):
    path, conn = db
    now = [HOUR]
    writer = PlaybackWriter(path, clock=lambda: now[0])
    writer._write(conn, [report(HOUR), report(HOUR + 10, position=10_000)])
    # Another item on the same device closes the first play.
    writer._write(conn, [report(HOUR + 20, rating_key="1002")])
    # Another device of the same user plays in parallel.
    writer._write(conn, [report(HOUR + 25, rating_key="1003", client="device-2")])
    first, second, third = plays(conn)
    assert first["stopped_at"] == HOUR + 10 and abs(first["watched_ms"] - 10_000) < 1
    assert second["stopped_at"] is None and third["stopped_at"] is None
    # A restarted proxy picks the open plays up again ...
    now[0] = HOUR + 60
    restarted = PlaybackWriter(path, clock=lambda: now[0])
    restarted._write(conn, [report(HOUR + 50, rating_key="1002", position=30_000)])
    assert len(plays(conn)) == 3 and abs(plays(conn)[1]["watched_ms"] - 30_000) < 1
    # ... and after more than 30 minutes of silence the next report starts a new play.
    now[0] = HOUR + 50 + 3600
    restarted._write(conn, [report(HOUR + 50 + 3600, rating_key="1002", position=31_000)])
    rows = plays(conn)
    assert len(rows) == 4 and rows[1]["stopped_at"] == HOUR + 50 and rows[2]["stopped_at"] == HOUR + 25
    # A report after a long gap does not count the gap as watched time.
    assert rows[3]["watched_ms"] == 0


def test_scrobble_marks_the_latest_play_or_records_a_mark(db):
    path, conn = db
    writer = PlaybackWriter(path, clock=lambda: HOUR + 100)
    writer._write(conn, [report(HOUR), report(HOUR + 10, "stopped", 20_000),
                         PlaybackReport(ts=HOUR + 11, kind="scrobble", rating_key="1001", user_id=5),
                         PlaybackReport(ts=HOUR + 12, kind="scrobble", rating_key="2001", user_id=5)])
    rows = plays(conn)
    assert [(r["rating_key"], r["source"], r["watched"]) for r in rows] == [
        ("1001", "timeline", 1), ("2001", "scrobble", 1)]
    writer._write(conn, [PlaybackReport(ts=HOUR + 13, kind="unscrobble", rating_key="1001", user_id=5)])
    assert plays(conn)[0]["watched"] == 0


def test_titles_come_from_metadata_answers_in_json_and_xml(db):
    path, conn = db
    episode = {"ratingKey": "2101", "type": "episode", "title": "Pilot", "grandparentTitle": "Dark",
               "parentIndex": 1, "index": 1, "duration": 3_000_000}
    xml = b'<MediaContainer size="1"><Video ratingKey="1001" type="movie" title="The Matrix" year="1999"/></MediaContainer>'
    import gzip

    bodies = [MetadataBody(HOUR, json.dumps({"MediaContainer": {"Metadata": [episode]}}).encode()),
              MetadataBody(HOUR, gzip.compress(xml), "text/xml", "gzip"),
              MetadataBody(HOUR, b"<not xml"), MetadataBody(HOUR, b'{"MediaContainer": 5}')]
    assert parse_metadata(bodies[2]) == [] and parse_metadata(bodies[3]) == []
    writer = PlaybackWriter(path, clock=lambda: HOUR)
    writer._write(conn, [*bodies, report(HOUR, rating_key="2101"), report(HOUR + 1, rating_key="1001", client="d2")])
    titles = [r[0] for r in conn.execute("SELECT title FROM play_history ORDER BY id")]
    assert titles == ["Dark - S1E1 - Pilot", "The Matrix (1999)"]


# --- the addon -----------------------------------------------------------------------------------------

RULES = load_rules(REPO / "rules.yaml")


def _flow(path: str, *, status=200, body=b"", headers=None, user_id=9):
    request = tutils.treq(host="127.0.0.1", port=32401, path=path.encode())
    for name, value in (headers or {}).items():
        request.headers[name] = value
    request.timestamp_start = time.time()
    flow = tflow.tflow(req=request, resp=tutils.tresp(status_code=status, content=body))
    match = RULES.match("plex", "GET", path.split("?", 1)[0], {})
    flowinfo.attach(flow, flowinfo.FlowInfo(match=match, listener="reverse", user_id=user_id))
    return flow


class _Recorder:
    def __init__(self):
        self.items = []

    def record(self, item):
        self.items.append(item)


def test_addon_queues_timeline_scrobble_and_metadata_and_nothing_else():
    addon = ViewingHistory()
    addon.writer = _Recorder()
    with taddons.context(addon):
        addon.response(_flow("/:/timeline?ratingKey=1001&key=%2Flibrary%2Fmetadata%2F1001&state=paused&time=5000"
                             "&duration=8160000&X-Plex-Token=secret-token&X-Plex-Client-Identifier=abc",
                             headers={"X-Plex-Product": "Plex Web", "X-Plex-Device-Name": "Chrome"}))
        addon.response(_flow("/:/scrobble?key=1002&identifier=com.plexapp.plugins.library"))
        addon.response(_flow("/library/metadata/1001", body=b'{"MediaContainer": {}}'))
        addon.response(_flow("/:/timeline?ratingKey=1001&state=playing", status=401))  # refused: not a play
        addon.response(_flow("/library/sections"))  # not a metadata route we read
        flow = _flow("/:/timeline?ratingKey=1003&state=playing")
        flowinfo.attach(flow, None)  # not ours
        addon.response(flow)
    timeline, scrobble, metadata = addon.writer.items
    assert (timeline.kind, timeline.rating_key, timeline.state, timeline.position_ms, timeline.duration_ms,
            timeline.user_id, timeline.client, timeline.player) == (
        "timeline", "1001", "paused", 5000, 8160000, 9, "abc", "Plex Web / Chrome")
    assert (scrobble.kind, scrobble.rating_key) == ("scrobble", "1002")
    assert isinstance(metadata, MetadataBody) and metadata.raw == b'{"MediaContainer": {}}'
    assert "secret-token" not in repr(addon.writer.items)


def test_addon_hook_does_not_wait_for_a_locked_database(db):
    path, conn = db
    blocker = connect(path)
    blocker.execute("BEGIN EXCLUSIVE")
    addon = ViewingHistory()
    addon.writer = PlaybackWriter(path, interval=0.01).start()
    try:
        with taddons.context(addon):
            start = time.perf_counter()
            for i in range(400):
                addon.response(_flow(f"/:/timeline?ratingKey=1001&state=playing&time={i * 250}&duration=100000"))
            assert time.perf_counter() - start < 1.0
        blocker.execute("ROLLBACK")
    finally:
        blocker.close()
        addon.done()
    assert conn.execute("SELECT count(*) FROM plays").fetchone()[0] == 1


# --- through the real stack ------------------------------------------------------------------------------

@pytest.mark.e2e
def test_playback_through_the_proxy_shows_in_the_viewing_history(stack):
    from fake_upstreams.data import PLEX_SERVER_TOKEN

    session = requests.Session()
    session.trust_env = False
    base = stack.plex_url
    token = {"X-Plex-Token": PLEX_SERVER_TOKEN, "X-Plex-Client-Identifier": "e2e-viewing-history",
             "X-Plex-Product": "E2E Player"}
    assert session.get(f"{base}/library/metadata/1001", params=token, headers={"Accept": "application/json"},
                       timeout=10).status_code == 200
    for i, state in enumerate(["playing"] * 6 + ["stopped"]):
        r = session.get(f"{base}/:/timeline", params={**token, "ratingKey": "1001", "state": state,
                                                     "time": str(i * 1000), "duration": "8160000"}, timeout=10)
        assert r.status_code == 200, r.text
        time.sleep(0.05)
    conn = sqlite3.connect(f"file:{stack.db_path}?mode=ro", uri=True, timeout=10)
    try:
        deadline = time.monotonic() + 10
        while True:
            row = conn.execute("SELECT title, player, state, active, watched_min FROM play_history "
                               "WHERE player = 'E2E Player' ORDER BY id DESC").fetchone()
            if row and row[2] == "stopped":
                break
            assert time.monotonic() < deadline, f"no finished play recorded: {row}"
            time.sleep(0.1)
    finally:
        conn.close()
    assert row[0] == "The Matrix (1999)" and row[3] == 0
    admin = ("admin", (stack.home / "dashboard-password").read_text().strip())
    titles = requests.get(f"{stack.dashboard_url}/projectionist/top_titles.json?_shape=array", auth=admin,
                          timeout=10).json()
    assert any(t["title"] == "The Matrix" for t in titles), titles


DAILY_SUMS = ("requests", "errors", "bytes_out", "cache_hits", "cache_misses", "cache_stale", "client_errors",
              "rate_limited", "bytes_in", "cache_bytes", "latency_count", *(f"lat_le_{b}" for b in LATENCY_BOUNDS_MS))


def _daily_from_hourly(conn) -> list[tuple]:
    return conn.execute(
        f"SELECT substr(hour, 1, 10), upstream, route, user_id, {', '.join(f'sum({c})' for c in DAILY_SUMS)}, "
        "round(sum(latency_ms_sum), 3), max(latency_ms_max) FROM usage_hourly GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4"
    ).fetchall()


def _daily(conn) -> list[tuple]:
    return conn.execute(f"SELECT day, upstream, route, user_id, {', '.join(DAILY_SUMS)}, round(latency_ms_sum, 3), "
                        "latency_ms_max FROM usage_daily ORDER BY 1, 2, 3, 4").fetchall()


def test_usage_daily_is_the_sum_of_usage_hourly_from_the_migration_on(tmp_path):
    """The dashboard home reads usage_daily: its triggers keep it equal to the hourly rows summed
    per day as UsageWriter inserts and upserts them, and the migration fills it from the hourly
    rows an existing store already has."""
    path = tmp_path / "projectionist.db"
    load_bench("dashboard").generate(path, 8000, days=3, plays=5)
    conn = connect(path)
    expected = _daily_from_hourly(conn)
    assert len(expected) > 100 and _daily(conn) == expected
    # More traffic into hours that have rows already (upserts), and into a new one.
    ts = time.time() - 3600
    assert UsageWriter._write(conn, [event(ts, upstream="plex", route="plex.metadata", user_id=None,
                                           latency_ms=99_999.0) for _ in range(5)] + [event(ts + 1)])
    assert _daily(conn) == _daily_from_hourly(conn) != expected
    conn.execute("DELETE FROM usage_hourly WHERE rowid IN (SELECT rowid FROM usage_hourly LIMIT 3)")
    hourly = _daily_from_hourly(conn)
    assert [r[:-1] for r in _daily(conn)] == [r[:-1] for r in hourly]  # (the day's max is never lowered)
    # A store from before the migration: the table is filled from its hourly rows.
    for trigger in ("usage_hourly_daily_insert", "usage_hourly_daily_update", "usage_hourly_daily_delete"):
        conn.execute(f"DROP TRIGGER {trigger}")
    conn.execute("DROP TABLE usage_daily")
    conn.execute("DROP INDEX cache_reason_hourly_covering")
    conn.execute("DELETE FROM schema_migrations WHERE version = 16")
    conn.close()
    conn = open_db(path).conn
    assert [r[:-1] for r in _daily(conn)] == [r[:-1] for r in hourly]
    conn.close()
