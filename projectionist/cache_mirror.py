"""Mirrors the caches into SQLite (`cache_entries`, `cache_evictions`, and for images
`cache_savings_hourly`) for the dashboard and the control plane, and carries the control plane's
flush requests to the proxy.

The proxy never writes SQLite on a request: it queues operations, and a thread applies them in
batches (every ~100 ms). Rows hold a key hash, the route and the partition: no URL, no token.
"""

from __future__ import annotations

import logging
import queue
import sqlite3
import threading
from collections.abc import Callable
from contextlib import closing
from datetime import UTC, datetime
from pathlib import Path

from .cache_store import Entry
from .metrics import IMAGE_BYTES_SAVED
from .store import connect, utcnow_iso

log = logging.getLogger(__name__)


# Other caches of this process (the image cache), per database: called with (target, value) from
# the thread that applies a flush request; each returns how many entries it dropped.
_flush_handlers: dict[str, list[Callable[[str, str | None], int]]] = {}


def add_flush_handler(db_path: Path, handler: Callable[[str, str | None], int]) -> None:
    _flush_handlers.setdefault(str(db_path), []).append(handler)


def remove_flush_handler(db_path: Path, handler: Callable[[str, str | None], int]) -> None:
    handlers = _flush_handlers.get(str(db_path), [])
    if handler in handlers:
        handlers.remove(handler)


class CacheMirror:
    _STOP = object()

    def __init__(self, db_path: Path, interval: float = 0.1) -> None:
        self.db_path = db_path
        self.interval = interval
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._hits: dict[str, tuple[int, float]] = {}
        self._saved: dict[tuple[str, str, str], list[int]] = {}  # (hour, bucket, route) -> counters
        self._hits_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="cache-mirror", daemon=True)

    def start(self) -> CacheMirror:
        self._thread.start()
        return self

    def close(self) -> None:
        if self._thread.is_alive():
            self._queue.put(self._STOP)
            self._thread.join(10)

    # --- queued from the event loop (cheap) -----------------------------------------------------

    def stored(self, key: str, bucket: str, entry: Entry) -> None:
        expires = entry.stored_at + entry.ttl
        self._queue.put(("stored", (key, bucket, entry.route, "user" if entry.partition != "shared" else "shared",
                                    entry.partition, entry.size, entry.stored_at, expires)))

    def hit(self, key: str, ts: float) -> None:
        # Hits are the hot path: counted in memory, written once per key per interval.
        with self._hits_lock:
            count, _ = self._hits.get(key, (0, ts))
            self._hits[key] = (count + 1, ts)

    def saved(self, bucket: str, route: str, source_bytes: int, sent_bytes: int, ts: float) -> None:
        """An answer whose body was re-encoded or resized from a `source_bytes` original (images)."""
        IMAGE_BYTES_SAVED.labels(bucket).inc(max(0, source_bytes - sent_bytes))
        hour = datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:00")
        with self._hits_lock:
            counters = self._saved.setdefault((hour, bucket, route), [0, 0, 0, 0])
            counters[0] += 1
            counters[1] += source_bytes
            counters[2] += sent_bytes
            counters[3] += max(0, source_bytes - sent_bytes)

    def deleted(self, keys: list[str], evicted: bool = False) -> None:
        if keys:
            self._queue.put(("evicted" if evicted else "deleted", tuple(keys)))

    # --- blocking reads (call from a thread) ----------------------------------------------------

    def index_rows(self, bucket: str) -> list[tuple[str, str, str]]:
        with closing(connect(self.db_path)) as conn:
            return conn.execute("SELECT key_hash, route, partition FROM cache_entries WHERE bucket = ?",
                                (bucket,)).fetchall()

    def pending_flushes(self) -> list[tuple[int, str, str | None]]:
        with closing(connect(self.db_path)) as conn:
            return conn.execute("SELECT id, target, value FROM cache_flush_requests WHERE applied_at IS NULL "
                                "ORDER BY id").fetchall()

    def flush_applied(self, request_id: int, count: int) -> None:
        """Mark a request applied, after the other caches of this process applied it too (their
        counts are added), so that "applied" means applied everywhere."""
        with closing(connect(self.db_path)) as conn:
            if _flush_handlers.get(str(self.db_path)):
                target, value = conn.execute("SELECT target, value FROM cache_flush_requests WHERE id = ?",
                                             (request_id,)).fetchone()
                count += self.flush_other_caches(target, value)
            conn.execute("UPDATE cache_flush_requests SET applied_at = ?, flushed = ? WHERE id = ?",
                         (utcnow_iso(), count, request_id))

    def flush_other_caches(self, target: str, value: str | None) -> int:
        """The flush applied by this process's other caches (call from a thread); how many they dropped."""
        return sum(handler(target, value) for handler in list(_flush_handlers.get(str(self.db_path), [])))

    # --- the writer thread ----------------------------------------------------------------------

    def _run(self) -> None:
        conn = connect(self.db_path)
        stopping = False
        while not stopping:
            ops = []
            try:
                ops.append(self._queue.get(timeout=self.interval))
                while len(ops) < 2000:
                    ops.append(self._queue.get_nowait())
            except queue.Empty:
                pass
            if self._STOP in ops:
                stopping = True
                ops = [op for op in ops if op is not self._STOP]
            with self._hits_lock:
                hits, self._hits = self._hits, {}
                saved, self._saved = self._saved, {}
            ops.extend(("hits", (count, ts, key)) for key, (count, ts) in hits.items())
            ops.extend(("saved", (*key, *counters)) for key, counters in saved.items())
            if ops:
                try:
                    self._apply(conn, ops)
                except sqlite3.Error as exc:  # the mirror is advisory: log and go on
                    log.warning("cache mirror: %d operations not written (%s)", len(ops), exc)
        conn.close()

    @staticmethod
    def _apply(conn: sqlite3.Connection, ops: list) -> None:
        conn.execute("BEGIN IMMEDIATE")
        try:
            for kind, args in ops:
                if kind == "stored":
                    conn.execute(
                        "INSERT INTO cache_entries (key_hash, bucket, route, scope, partition, size, created_at,"
                        " expires_at, hits) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 0) ON CONFLICT (key_hash) DO UPDATE SET"
                        " size = excluded.size, created_at = excluded.created_at, expires_at = excluded.expires_at",
                        args)
                elif kind == "hits":
                    conn.execute("UPDATE cache_entries SET hits = hits + ?, last_hit_at = ? WHERE key_hash = ?", args)
                elif kind == "saved":
                    conn.execute(
                        "INSERT INTO cache_savings_hourly (hour, bucket, route, responses, source_bytes, bytes_sent,"
                        " bytes_saved) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (hour, bucket, route) DO UPDATE SET"
                        " responses = responses + excluded.responses,"
                        " source_bytes = source_bytes + excluded.source_bytes,"
                        " bytes_sent = bytes_sent + excluded.bytes_sent,"
                        " bytes_saved = bytes_saved + excluded.bytes_saved",
                        args)
                else:
                    if kind == "evicted":
                        conn.executemany(
                            "INSERT INTO cache_evictions (bucket, route, evictions) SELECT bucket, route, 1 "
                            "FROM cache_entries WHERE key_hash = ? ON CONFLICT (bucket, route) "
                            "DO UPDATE SET evictions = evictions + 1", [(k,) for k in args])
                    conn.executemany("DELETE FROM cache_entries WHERE key_hash = ?", [(k,) for k in args])
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

