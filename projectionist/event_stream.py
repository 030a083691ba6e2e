"""Usage, play and rate-limit events from every proxy process to one SQLite writer, through Redis.

With `proxy.redis_url` set, a proxy's writers (UsageWriter, PlaybackWriter, RateLimitWriter) keep
their batching thread but hand each batch to a Redis stream instead of committing it
(`Streamed*Writer` below); the control plane's `EventConsumer` reads the stream and commits the
batches with the same writers' code, then acknowledges them. So one process holds the open plays
of every player (timeline reports of one play reach several workers), and the one SQLite file is
written by one writer however many proxy processes and machines there are.

- **Only while a consumer runs**: the consumer keeps a heartbeat key alive (`…:consumer`, expiring
  after HEARTBEAT_TTL s); a proxy streams only while it sees one (looked at every CHECK_EVERY s)
  and otherwise commits to SQLite itself, as without Redis: a proxy run without a control plane
  still records everything. Batches streamed just before a consumer died wait for the next one.
- **One stream per database** (`projectionist:events:<database id>`): users are numbered per
  database, so a control plane consumes only the events of proxies that share its database.
- **Delivery**: a batch is acknowledged (and deleted) only after its rows are committed; a control
  plane that died holds its batches as pending and takes them up again when it restarts (its
  consumer name is the host's), and `XAUTOCLAIM` hands another consumer's batches, idle for
  CLAIM_IDLE_MS, to a live one.
- **Redis down**: the proxy's writer commits the batch to SQLite itself (one warning, then again
  via Redis once it answers, tried every RETRY_AFTER seconds): nothing is lost, only the plays of
  that moment are followed by each process on its own.
- **Format**: JSON, never pickle (what Redis holds is data, not code); bodies are base64.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import json
import logging
import socket
import sqlite3
import threading
import time
from collections.abc import Iterable

from .analytics import MetadataBody, PlaybackReport, PlaybackWriter
from .limits import RateLimitEvent, RateLimitWriter
from .store import UsageEvent, UsageWriter, connect, database_id

log = logging.getLogger(__name__)

PREFIX = "projectionist:events:"
GROUP = "sqlite-writer"
MAXLEN = 100_000  # batches kept at most when no consumer reads (a control plane down for long)
RETRY_AFTER = 5.0  # s: after a failure, the proxy's writers leave Redis alone this long
CLAIM_IDLE_MS = 60_000  # a batch another consumer took this long ago without acknowledging it
READ_COUNT = 20  # batches per read
READ_BLOCK_MS = 500
HEARTBEAT_TTL = 15  # s: a consumer not seen this long is gone
CHECK_EVERY = 5.0  # s: how often a proxy's writer looks for the consumer's heartbeat
DRAIN_READS_MAX = 50  # reads of what is left when a consumer stops

# The kinds of event a batch holds, by name on the wire.
KINDS: dict[str, type] = {"usage": UsageEvent, "rate_limit": RateLimitEvent, "playback": PlaybackReport,
                          "metadata": MetadataBody}
_NAMES = {kind: name for name, kind in KINDS.items()}
_NOT_SENT = {"applied"}  # the writer's own bookkeeping


def stream_name(database: str) -> str:
    return f"{PREFIX}{database}"


def heartbeat_name(stream: str) -> str:
    return f"{stream}:consumer"


def encode_batch(events: Iterable) -> bytes:
    """A batch of events (any mix of KINDS) as JSON: [[kind, {field: value}], ...]."""
    out = []
    for event in events:
        fields = {f.name: getattr(event, f.name) for f in dataclasses.fields(event) if f.name not in _NOT_SENT}
        if isinstance(event, MetadataBody):
            fields["raw"] = base64.b64encode(event.raw).decode()
        out.append([_NAMES[type(event)], fields])
    return json.dumps(out, separators=(",", ":")).encode()


def decode_batch(data: bytes) -> list:
    """What encode_batch wrote; an entry of an unknown kind or with unknown fields is dropped (a
    newer proxy's event), so one odd entry never blocks the stream."""
    events = []
    for name, fields in json.loads(data):
        kind = KINDS.get(name)
        if kind is None:
            continue
        if kind is MetadataBody:
            fields["raw"] = base64.b64decode(fields.get("raw", ""))
        try:
            events.append(kind(**fields))
        except TypeError:
            log.warning("event stream: a %s event with unknown fields was dropped", name)
    return events


def _sync_client(url: str, timeout: float):
    import redis  # imported only when configured

    return redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)


class _Publisher:
    """One Redis connection per writer thread, failing soft: a failed XADD is the caller's cue to
    write the batch to SQLite itself; Redis is tried again RETRY_AFTER seconds later."""

    def __init__(self, url: str, stream: str, owner: str) -> None:
        self.url = url
        self.stream = stream
        self.owner = owner
        self.published = 0
        self._client = None
        self._down_since: float | None = None
        self._retry_at = 0.0
        self._consumer_seen = False
        self._checked_at = -CHECK_EVERY

    def publish(self, events: list) -> bool:
        now = time.monotonic()
        if now < self._retry_at:
            return False
        try:
            if self._client is None:
                self._client = _sync_client(self.url, timeout=1.0)
            if now - self._checked_at >= CHECK_EVERY:
                seen = bool(self._client.exists(heartbeat_name(self.stream)))
                if seen != self._consumer_seen:
                    log.info("%s: %s", self.owner, "a control plane consumes the event stream: events go to it"
                             if seen else "no control plane consumes the event stream: writing to SQLite directly")
                self._consumer_seen, self._checked_at = seen, now
            if not self._consumer_seen:
                return False
            self._client.xadd(self.stream, {b"batch": encode_batch(events)}, maxlen=MAXLEN, approximate=True)
        except Exception as exc:  # redis errors, OSError: the batch is written locally
            self._client = None
            self._retry_at = now + RETRY_AFTER
            if self._down_since is None:
                self._down_since = now
                log.warning("%s: Redis is not answering (%s); writing to SQLite directly until it does",
                            self.owner, type(exc).__name__)
            return False
        if self._down_since is not None:
            log.info("%s: Redis answers again after %.0f s; events go to the stream", self.owner,
                     now - self._down_since)
            self._down_since = None
        self.published += len(events)
        return True


class _Streamed:
    """Mixin for a UsageWriter subclass: each batch goes to the stream; SQLite is the fallback."""

    def __init__(self, db_path, *args, redis_url: str, **kwargs) -> None:
        super().__init__(db_path, *args, **kwargs)
        self._publisher = _Publisher(redis_url, stream_name(database_id(db_path)), type(self).__name__)

    def _write(self, conn: sqlite3.Connection, events: list) -> bool:
        if self._publisher.publish(events):
            return True
        return super()._write(conn, events)


class StreamedUsageWriter(_Streamed, UsageWriter):
    pass


class StreamedRateLimitWriter(_Streamed, RateLimitWriter):
    pass


class StreamedPlaybackWriter(_Streamed, PlaybackWriter):
    """Reports go to the stream as they came; only while Redis is down are plays followed here."""

    def _write(self, conn: sqlite3.Connection, items: list) -> bool:
        fresh = [item for item in items if not item.applied]  # a retried batch may hold applied ones
        if fresh and self._publisher.publish(fresh):
            for item in fresh:
                item.applied = True
            if self.dirty or self.marks or self.media:  # followed here while Redis was down
                PlaybackWriter._write(self, conn, [])
            return True
        return PlaybackWriter._write(self, conn, items)


def usage_writer(db_path, redis_url: str | None) -> UsageWriter:
    return StreamedUsageWriter(db_path, redis_url=redis_url) if redis_url else UsageWriter(db_path)


def rate_limit_writer(db_path, redis_url: str | None) -> RateLimitWriter:
    return StreamedRateLimitWriter(db_path, redis_url=redis_url) if redis_url else RateLimitWriter(db_path)


def playback_writer(db_path, redis_url: str | None) -> PlaybackWriter:
    return StreamedPlaybackWriter(db_path, redis_url=redis_url) if redis_url else PlaybackWriter(db_path)


class EventConsumer:
    """The control plane's half: reads the database's stream in a thread and commits each batch
    with the writer of its kind (the same code the proxy would run), acknowledging it after.

    A batch the database refuses (locked, full disk) stays unacknowledged and is read again; Redis
    down: the thread waits and reconnects (the proxies meanwhile write to SQLite themselves)."""

    def __init__(self, db_path, redis_url: str, name: str | None = None) -> None:
        self.db_path = db_path
        self.url = redis_url
        self.stream = stream_name(database_id(db_path))
        self.name = name or socket.gethostname()
        self.written = 0  # events committed
        self._usage = UsageWriter(db_path)
        self._limits = RateLimitWriter(db_path)
        self._plays = PlaybackWriter(db_path)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="event-consumer", daemon=True)

    def start(self) -> EventConsumer:
        self._thread.start()
        return self

    def close(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        conn = connect(self.db_path)
        client = None
        warned = False
        try:
            while not self._stop.is_set():
                try:
                    if client is None:
                        client = _sync_client(self.url, timeout=READ_BLOCK_MS / 1000 + 2)
                        self._join_group(client)
                    client.set(heartbeat_name(self.stream), self.name, ex=HEARTBEAT_TTL)
                    self._consume(client, conn)
                    if warned:
                        log.info("event consumer: Redis answers again")
                        warned = False
                except Exception as exc:
                    if isinstance(exc, sqlite3.Error):
                        log.warning("event consumer: %s; the batch is read again", exc)
                    elif not warned:
                        log.warning("event consumer: Redis is not answering (%s); retrying", type(exc).__name__)
                        warned = True
                    client = None
                    self._stop.wait(1.0)
            if client is not None:
                with contextlib.suppress(Exception):
                    client.delete(heartbeat_name(self.stream))  # the proxies write to SQLite again
                    for _ in range(DRAIN_READS_MAX):  # what they streamed meanwhile
                        if not self._consume(client, conn, block=None):
                            break
            self._plays._write(conn, [])  # plays closed by the sweep reach the database
        finally:
            conn.close()

    def _join_group(self, client) -> None:
        import redis

        try:
            client.xgroup_create(self.stream, GROUP, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def _consume(self, client, conn: sqlite3.Connection, block: int | None = READ_BLOCK_MS) -> int:
        """Commits and acknowledges up to READ_COUNT batches; how many there were."""
        # Our own unacknowledged batches first (a restart after a crash), then others' stale ones,
        # then new ones.
        pending = client.xreadgroup(GROUP, self.name, {self.stream: "0"}, count=READ_COUNT)
        entries = pending[0][1] if pending else []
        if not entries:
            claimed = client.xautoclaim(self.stream, GROUP, self.name, CLAIM_IDLE_MS, "0-0", count=READ_COUNT)
            entries = claimed[1] if claimed else []
        if not entries:
            fresh = client.xreadgroup(GROUP, self.name, {self.stream: ">"}, count=READ_COUNT, block=block)
            entries = fresh[0][1] if fresh else []
        if not entries:
            if self._plays.open or self._plays.dirty:
                self._plays._write(conn, [])  # the sweep closes plays that went quiet
            return 0
        for entry_id, fields in entries:
            if fields:  # a deleted entry still pending reads as empty
                self._commit(conn, decode_batch(fields[b"batch"]))
            client.xack(self.stream, GROUP, entry_id)
            client.xdel(self.stream, entry_id)
        return len(entries)

    def _commit(self, conn: sqlite3.Connection, events: list) -> None:
        """Each kind with its writer; raises sqlite3.Error so the batch is read again (its
        playback reports are then applied again: a timeline report at a moment already seen
        changes nothing)."""
        by_writer: dict[int, tuple[UsageWriter, list]] = {}
        for event in events:
            writer = (self._usage if isinstance(event, UsageEvent) else self._limits
                      if isinstance(event, RateLimitEvent) else self._plays)
            by_writer.setdefault(id(writer), (writer, []))[1].append(event)
        for writer, batch in by_writer.values():
            if not writer._write(conn, batch):
                raise sqlite3.OperationalError(f"{type(writer).__name__} could not commit {len(batch)} events")
        self.written += len(events)
