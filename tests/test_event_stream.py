"""Usage, play and rate-limit events through Redis to the one SQLite writer (projectionist/event_stream.py).

The codec round-trips every kind; end to end, a real proxy process with `proxy.redis_url` set
records to SQLite itself while no consumer runs, hands its batches to the stream once the control
plane's consumer (the same class, run here) keeps its heartbeat, and goes back to SQLite with one
warning when Redis is killed mid-run, losing no row; once Redis is back the stream is used again."""

from __future__ import annotations

import shutil
import sqlite3
import time
from contextlib import closing

import pytest
import redis
import requests

from _stack import ProxyProcess, RedisServer, UpstreamProcess
from projectionist import event_stream
from projectionist.analytics import MetadataBody, PlaybackReport
from projectionist.limits import RateLimitEvent
from projectionist.store import UsageEvent, database_id
from support import wait_for


def test_every_kind_of_event_survives_the_wire():
    events = [
        UsageEvent(ts=1.5, listener="regular", upstream="tmdb", route="tmdb.details", method="GET", status=200,
                   latency_ms=3.25, bytes_out=120, cache="hit", user_id=4, credential="default", cache_reason=None),
        RateLimitEvent(ts=2.0, user_id=None, client="ab12", upstream="tmdb", rule="default", waited_ms=12.0,
                       outcome="queued"),
        PlaybackReport(ts=3.0, kind="timeline", rating_key="42", user_id=4, client="c1", player="Plex Web",
                       state="playing", position_ms=1000, duration_ms=9000, applied=True),
        MetadataBody(ts=4.0, raw=b"\x1f\x8b\x00binary<MediaContainer/>", content_type="text/xml",
                     content_encoding="gzip", applied=True),
    ]
    decoded = event_stream.decode_batch(event_stream.encode_batch(events))
    assert [type(e) for e in decoded] == [type(e) for e in events]
    assert decoded[0] == events[0] and decoded[1] == events[1]
    assert decoded[2].applied is False and decoded[2].position_ms == 1000 and decoded[2].client == "c1"
    assert decoded[3].raw == events[3].raw and decoded[3].applied is False


def test_an_unknown_kind_or_field_is_dropped_not_fatal():
    data = b'[["usage",{"ts":1,"listener":"regular","upstream":"tmdb","route":"r","method":"GET","status":200,' \
           b'"latency_ms":1}],["future-kind",{}],["usage",{"ts":1,"no_such_field":3}]]'
    decoded = event_stream.decode_batch(data)
    assert len(decoded) == 1 and decoded[0].route == "r"


def _rows(db) -> int:
    with closing(sqlite3.connect(db, timeout=30)) as conn:
        return conn.execute("SELECT count(*) FROM usage_events WHERE route = 'tmdb.details'").fetchone()[0]


def _get(proxy: ProxyProcess, n: int, movie: int = 603) -> None:
    for i in range(n):
        r = requests.get(f"http://api.themoviedb.org/3/movie/{movie + i}", params={"api_key": "x"},
                         proxies={"http": proxy.proxy_url}, timeout=10)
        assert r.status_code == 200, r.text


@pytest.mark.e2e
def test_events_go_through_the_stream_while_a_consumer_runs_and_to_sqlite_when_redis_dies(tmp_path):
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (.ci/run installs it)")
    first = RedisServer().__enter__()
    port = first.port

    def edit(rules: dict) -> None:
        rules["proxy"]["redis_url"] = first.url

    with UpstreamProcess() as upstream, ProxyProcess({"tmdb": upstream.url}, edit) as proxy:
        # No control plane yet: the proxy commits its rows itself, as without Redis.
        _get(proxy, 3)
        wait_for(lambda: _rows(proxy.db_path) == 3, timeout=10)
        stream = event_stream.stream_name(database_id(proxy.db_path))
        consumer = event_stream.EventConsumer(proxy.db_path, first.url, name="test").start()
        try:
            # The proxy sees the heartbeat within CHECK_EVERY; from then on its rows come through Redis.
            time.sleep(event_stream.CHECK_EVERY + 0.5)
            _get(proxy, 5, movie=700)
            wait_for(lambda: _rows(proxy.db_path) == 8, timeout=10)
            assert consumer.written >= 5, consumer.written
            assert redis.Redis.from_url(first.url).xlen(stream) == 0  # acknowledged and deleted

            # Redis killed mid-run: every request still answered and recorded, by the proxy itself.
            first.__exit__()
            written = consumer.written
            _get(proxy, 4, movie=800)
            wait_for(lambda: _rows(proxy.db_path) == 12, timeout=15)
            assert consumer.written == written
            log = proxy.log_path.read_text()
            assert log.count("Redis is not answering") == 1, log[-3000:]

            # Back: after RETRY_AFTER and a heartbeat, the stream again.
            second = RedisServer()
            second.port = port
            second.__enter__()
            try:
                time.sleep(event_stream.RETRY_AFTER + event_stream.CHECK_EVERY + 1.5)
                _get(proxy, 2, movie=900)
                wait_for(lambda: _rows(proxy.db_path) == 14, timeout=15)
                assert consumer.written >= written + 2
            finally:
                consumer.close()
                second.__exit__()
        finally:
            consumer.close()
        assert proxy.stop() == 0
        assert _rows(proxy.db_path) == 14
        assert not proxy.logged_errors()
