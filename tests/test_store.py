"""The store: migrations under concurrency, WAL, batched usage writes, durability."""

from __future__ import annotations

import multiprocessing
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time

import pytest

from projectionist.store import (
    MIGRATIONS,
    SCHEMA_VERSION,
    UsageEvent,
    UsageWriter,
    connect,
    open_db,
    schema_version,
)

TABLES = {"users", "sessions", "user_settings", "cache_entries", "usage_events",
          "rate_limit_events", "usage_hourly", "schema_migrations"}


def event(ts: float, **kw) -> UsageEvent:
    defaults = dict(listener="regular", upstream="tmdb", route="tmdb.details", method="GET",
                    status=200, latency_ms=5.0, bytes_out=100, cache="miss")
    defaults.update(kw)
    return UsageEvent(ts=ts, **defaults)


def test_open_db_creates_schema_with_wal_and_foreign_keys(tmp_path):
    db = open_db(tmp_path / "p.db")
    assert TABLES <= set(db.table_names())
    assert "user_directory" in db.view_names()
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    assert db.execute("PRAGMA busy_timeout").fetchone()[0] >= 5000
    assert schema_version(db.conn) == SCHEMA_VERSION
    with pytest.raises(sqlite3.IntegrityError):  # foreign keys are enforced
        db.execute("INSERT INTO sessions (id_hash, user_id, created_at, expires_at) VALUES ('h', 999, 'x', 'y')")


def _open(path: str, barrier) -> int:
    barrier.wait()  # every process migrates at the same instant
    return schema_version(open_db(path).conn)


def test_racing_processes_migrate_once(tmp_path):
    path = str(tmp_path / "race.db")
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Manager().Barrier(4)
    with ctx.Pool(4) as pool:
        versions = pool.starmap(_open, [(path, barrier)] * 4)
    assert versions == [SCHEMA_VERSION] * 4
    conn = connect(path)
    assert conn.execute("SELECT count(*) FROM schema_migrations").fetchone()[0] == len(MIGRATIONS)


def test_usage_writer_batches_and_rolls_up(tmp_path):
    path = tmp_path / "u.db"
    open_db(path)
    writer = UsageWriter(path, interval=0.05, batch_size=100).start()
    hour = 1_790_000_000.0 - (1_790_000_000.0 % 3600)
    for i in range(250):
        writer.record(event(hour + i, user_id=None, cache="hit" if i % 5 == 0 else "miss",
                            status=502 if i == 3 else 200, latency_ms=float(i)))
    # Rows arrive without close(): the thread flushes on its own within its interval.
    conn = connect(path)
    deadline = time.monotonic() + 5
    while conn.execute("SELECT count(*) FROM usage_events").fetchone()[0] < 250:
        assert time.monotonic() < deadline, "usage rows were not flushed"
        time.sleep(0.02)
    writer.close()
    row = conn.execute("SELECT requests, errors, cache_hits, cache_misses, latency_ms_max, bytes_out "
                       "FROM usage_hourly").fetchall()
    assert row == [(250, 1, 50, 200, 249.0, 25000)]


def test_close_flushes_everything_queued(tmp_path):
    path = tmp_path / "u.db"
    open_db(path)
    writer = UsageWriter(path, interval=60, batch_size=10_000).start()  # would never flush by time
    for i in range(1000):
        writer.record(event(time.time()))
    writer.close()
    assert connect(path).execute("SELECT count(*) FROM usage_events").fetchone()[0] == 1000


def test_record_does_not_wait_for_a_locked_database(tmp_path):
    """A writer stuck behind a lock (a slow disk, a long transaction) never slows the caller."""
    path = tmp_path / "u.db"
    open_db(path)
    blocker = connect(path)
    blocker.execute("BEGIN EXCLUSIVE")
    writer = UsageWriter(path, interval=0.02).start()
    started = time.perf_counter()
    for i in range(2000):
        writer.record(event(time.time()))
    spent = time.perf_counter() - started
    time.sleep(0.2)
    assert spent < 0.5  # generous: the work is a queue append
    blocker.execute("ROLLBACK")  # lock released: the kept batch is written, nothing lost
    writer.close()
    assert connect(path).execute("SELECT count(*) FROM usage_events").fetchone()[0] == 2000


def test_killed_process_keeps_committed_rows(tmp_path):
    path = tmp_path / "k.db"
    open_db(path)
    script = textwrap.dedent(f"""
        import time, sys
        from projectionist.store import UsageWriter, UsageEvent
        w = UsageWriter({str(path)!r}, interval=0.02).start()
        for i in range(300):
            w.record(UsageEvent(ts=time.time(), listener="regular", upstream="plex", route="plex.metadata",
                                method="GET", status=200, latency_ms=1.0))
        while w.written < 300:
            time.sleep(0.01)
        print("committed", flush=True)
        time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "committed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    assert connect(path).execute("SELECT count(*) FROM usage_events").fetchone()[0] == 300
