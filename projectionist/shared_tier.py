"""The response cache's shared tier: Redis behind each proxy process's memory and disk layers.

With `proxy.redis_url` (or PROJECTIONIST_REDIS_URL) set, every proxy process pointed at the same
Redis, on this machine or another, shares:

- **entries**: what one process stored is a hit for all. Each entry is one Redis string whose name
  says what flush and invalidation select on (`<prefix>e:<route>|<partition>|<uri key>|<key>`; a
  user's partition carries its database's id, since users are numbered per database),
  with Redis' own expiry at the entry's last usable moment (ttl + the longer stale window); Redis'
  `maxmemory` with an LRU policy bounds the total (docker-compose.yml sets it). Memory-only entries
  (they embed a user's surrogates) stay local. Bodies over `cache.shared_max_body_bytes` stay where
  they were fetched, with only their index record shared (`<prefix>i:`, named alike): the others
  fetch the body from that process (projectionist/peer_bodies.py).
- **one fetch per cold key**: the process that takes the key's lock (`SET NX PX`, renewed while it
  fetches) fetches; the others wait for the outcome it writes (`<prefix>o:<key>`, kept a few
  seconds, whatever the status), and take the lock over when it lapses without one (a leader that
  died or failed).
- **flushes and invalidations**: the process applying one deletes the matching shared entries and
  publishes it; every other process drops its own memory and disk entries likewise.

The format is JSON metadata + the body bytes, never pickle: what Redis holds is data, not code.
Redis failing (down, or not answering a PING either) costs one warning: each process serves from
its own layers and fetches on its own until Redis answers again (retried every RETRY_AFTER seconds).
A single late reply is that command's miss, not an outage.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import struct
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

from .cache_store import Entry
from .peer_bodies import PeerBodies, digest

log = logging.getLogger(__name__)

REDIS_URL_ENV = "PROJECTIONIST_REDIS_URL"
PREFIX = "projectionist:cache:"
FLUSH_CHANNEL = "flush"
RETRY_AFTER = 5.0  # s: after a failure, Redis is left alone this long
LOCK_MS = 3_000  # a leader's lock lapses this long after its process stopped renewing it
OUTCOME_TTL_MS = 5_000  # a leader's outcome waits this long for followers
POLL_INTERVAL = 0.02  # s: how soon a follower first looks for the leader's outcome, doubling ...
POLL_INTERVAL_MAX = 0.1  # ... up to this
RESUBSCRIBE_AFTER = 0.2  # s: after the flush listener's subscription timed out (a busy moment, not an outage)
CONFIRM_TIMEOUT = 2.0  # s: the PING that decides whether a late reply means Redis is down
PUTS_IN_FLIGHT_MAX = 256  # background writes waiting for Redis at most
_HEADER = struct.Struct("!I")


def redis_url(configured: str | None) -> str | None:
    """The environment wins over rules.yaml's proxy.redis_url, as for the rate limits."""
    return os.environ.get(REDIS_URL_ENV) or configured


@dataclass(frozen=True)
class Outcome:
    """A leader's upstream answer, as its followers in other processes receive it."""

    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes
    at: float = 0.0  # when the leader had it (time.time())


def encode_entry(entry: Entry) -> bytes:
    """An Entry (or a subclass: the image cache's) as bytes: its fields but the body and the hit
    count as JSON, then the body."""
    meta = {f.name: getattr(entry, f.name) for f in dataclasses.fields(entry) if f.name not in ("body", "hits")}
    meta["headers_are_bytes"] = any(isinstance(k, bytes) for k, _ in entry.headers)
    meta["headers"] = [[_text(k), _text(v)] for k, v in entry.headers]
    raw = json.dumps(meta, separators=(",", ":")).encode()
    return _HEADER.pack(len(raw)) + raw + entry.body


def decode_entry(data: bytes, kind: type[Entry] = Entry) -> Entry:
    """What encode_entry wrote, as a `kind`; fields it does not have are left out, missing ones
    take their defaults (a raising ValueError/KeyError/TypeError: not an entry)."""
    (length,) = _HEADER.unpack_from(data)
    meta = json.loads(data[_HEADER.size:_HEADER.size + length])
    as_bytes = meta.pop("headers_are_bytes", True)
    meta["headers"] = [(k.encode("latin-1"), v.encode("latin-1")) if as_bytes else (k, v) for k, v in meta["headers"]]
    known = {f.name for f in dataclasses.fields(kind)} - {"body", "hits"}
    return kind(**{k: v for k, v in meta.items() if k in known}, body=data[_HEADER.size + length:])


def _text(value: bytes | str) -> str:
    return value.decode("latin-1") if isinstance(value, bytes) else value


def encode_outcome(status: int, headers: Iterable[tuple[bytes, bytes]], body: bytes, at: float) -> bytes:
    raw = json.dumps({"status": status, "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in headers],
                      "at": at}, separators=(",", ":")).encode()
    return _HEADER.pack(len(raw)) + raw + body


def decode_outcome(data: bytes) -> Outcome:
    (length,) = _HEADER.unpack_from(data)
    meta = json.loads(data[_HEADER.size:_HEADER.size + length])
    return Outcome(int(meta["status"]), [(k.encode("latin-1"), v.encode("latin-1")) for k, v in meta["headers"]],
                   data[_HEADER.size + length:], float(meta.get("at", 0)))


def encode_index(entry: Entry, holder: str, sha256: str) -> bytes:
    """An index record: where the body is and what it is, then the entry without its body."""
    ref = json.dumps({"holder": holder, "size": len(entry.body), "sha256": sha256}, separators=(",", ":")).encode()
    return _HEADER.pack(len(ref)) + ref + encode_entry(dataclasses.replace(entry, body=b""))


def decode_index(data: bytes, kind: type[Entry] = Entry) -> tuple[dict, Entry]:
    (length,) = _HEADER.unpack_from(data)
    ref = json.loads(data[_HEADER.size:_HEADER.size + length])
    if not isinstance(ref, dict):
        raise ValueError("not an index record")
    return ref, decode_entry(data[_HEADER.size + length:], kind)


def _glob(text: str) -> str:
    """`text` matched literally by a Redis MATCH pattern."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


class SharedTier:
    """The shared entries, locks, outcomes and flush channel of one Redis. Every method fails soft:
    after an error it answers "nothing shared" (None, False, 0) for RETRY_AFTER seconds."""

    def __init__(self, url: str, max_body_bytes: int, database: str, prefix: str = PREFIX, timeout: float = 0.5,
                 bodies: PeerBodies | None = None) -> None:
        import redis.asyncio as aioredis  # imported only when configured
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff
        from redis.exceptions import ConnectionError as RedisConnectionError
        from redis.exceptions import TimeoutError as RedisTimeoutError

        self.url = url
        self.prefix = prefix
        self.max_body_bytes = max_body_bytes
        self.database = database  # store.database_id: whose user numbers a partition "u<id>" means
        self.origin = uuid.uuid4().hex  # this process, in the flushes it publishes
        # One immediate retry on a broken connection: after Redis restarts, each pooled connection
        # fails once, and that must not count as Redis being down.
        self.client = aioredis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout,
                                              retry=Retry(NoBackoff(), 1), retry_on_error=[RedisConnectionError])
        self._down_until = 0.0
        self._warned_at = 0.0
        self._timeout_error = RedisTimeoutError  # redis is imported only when configured
        self._confirming: asyncio.Task | None = None  # the PING that checks a late reply
        self._listener: asyncio.Task | None = None
        self._puts: set[asyncio.Task] = set()  # share_later's writes in flight
        self.bodies = bodies  # bodies over max_body_bytes: held here, fetched from their holders
        self.tier = "".join(c if c.isalnum() else "-" for c in prefix).strip("-")  # its name in peer URLs

    # --- entries ------------------------------------------------------------------------------

    def name(self, key: str, route: str, partition: str, uri: str, kind: str = "e") -> str:
        """An entry's name ("e"), or its index record's ("i"): flushes select both alike."""
        return f"{self.prefix}{kind}:{route}|{self._partition(partition)}|{uri}|{key}"

    def _partition(self, partition: str) -> str:
        """A user's partition ("u3") names its database too: only processes sharing that database
        share that user's entries; "shared" entries are everyone's."""
        return partition if partition == "shared" else f"{self.database}.{partition}"

    def shareable(self, entry: Entry) -> bool:
        return not entry.memory_only and len(entry.body) <= self.max_body_bytes

    def indexable(self, entry: Entry) -> bool:
        """Too big to share, but its index record can be: this process is a holder others reach."""
        return (not entry.memory_only and len(entry.body) > self.max_body_bytes
                and self.bodies is not None and self.bodies.holder is not None)

    async def get(self, key: str, route: str, partition: str, uri: str, kind: type[Entry] = Entry) -> Entry | None:
        """The shared entry, or the body its index record names fetched from its holder."""
        names = [self.name(key, route, partition, uri), self.name(key, route, partition, uri, "i")]
        found = await self.call(lambda: self.client.mget(names))
        data, index = found if found else (None, None)
        try:
            if data:
                return decode_entry(data, kind)
            if not index or self.bodies is None:
                return None
            ref, entry = decode_index(index, kind)
            holder, size, sha256 = str(ref["holder"]), int(ref["size"]), str(ref["sha256"])
        except (ValueError, KeyError, TypeError, struct.error) as exc:  # not ours, or damaged: a miss
            log.warning("shared cache: an unreadable entry (%s) ignored", type(exc).__name__)
            return None
        if holder == self.bodies.holder:  # this process's own record, of what it no longer has
            return None
        body = await self.bodies.fetch(holder, self.tier, key, size, sha256)
        return dataclasses.replace(entry, body=body) if body is not None else None

    async def put(self, key: str, entry: Entry) -> bool:
        """Share the entry (or, too big, its index record) until its last usable moment."""
        if not (self.shareable(entry) or self.indexable(entry)):
            return False
        expire = entry.ttl + max(entry.stale_while_revalidate, entry.stale_if_error) - entry.age()
        if expire <= 0:
            return False
        entry_name, index_name = (self.name(key, entry.route, entry.partition, entry.uri, kind) for kind in "ei")
        if self.shareable(entry):
            name, data, other = entry_name, encode_entry(entry), index_name
        else:
            name, data, other = index_name, encode_index(entry, self.bodies.holder, await digest(entry.body)), entry_name

        async def replace() -> bool:  # what the key held in the other form is an older answer
            async with self.client.pipeline(transaction=True) as pipe:
                pipe.set(name, data, px=max(1, int(expire * 1000)))
                pipe.delete(other)
                stored, _ = await pipe.execute()
            return bool(stored)
        return bool(await self.call(replace))

    def serve_bodies(self, lookup) -> None:
        """This process hands the bodies it holds (`await lookup(key)`: bytes or None) to the
        others (through the operations listener)."""
        if self.bodies is not None:
            self.bodies.register(self.tier, lookup)

    async def delete_where(self, *, routes: Iterable[str] | None = None, partition: str | None = None,
                           uri: str | None = None, key_prefix: str | None = None) -> int:
        """Delete the shared entries of these routes / this partition / this URI / key prefix (all
        when nothing is given), and the leaders' recent outcomes; returns how many."""
        part = _glob(self._partition(partition)) if partition is not None else "*"
        patterns = []
        if routes is not None:
            patterns = [f"{_glob(self.prefix)}[ei]:{_glob(route)}|{part}|*" for route in routes]
        else:
            patterns = [f"{_glob(self.prefix)}[ei]:*|{part}|{_glob(uri) if uri else '*'}|"
                        f"{_glob(key_prefix) + '*' if key_prefix is not None else '*'}"]
        # Outcomes are seconds old and name only their key: all go, so that none outlives a flush.
        patterns.append(f"{_glob(self.prefix)}o:*")

        async def scan_and_delete() -> int:
            deleted = 0
            for pattern in patterns:
                batch = []
                async for name in self.client.scan_iter(match=pattern, count=500):
                    batch.append(name)
                    if len(batch) >= 500:
                        deleted += await self.client.unlink(*batch)
                        batch = []
                if batch:
                    deleted += await self.client.unlink(*batch)
            return deleted
        return await self.call(scan_and_delete) or 0

    async def delete_for_flush(self, target: str, value: str | None, uri: str | None = None) -> int:
        """The shared entries a cache flush selects: all (or one whole bucket: this tier is one
        bucket's), one route, a key prefix, one partition, or one URI (`uri`, for target "url")."""
        if target in ("all", "bucket"):
            return await self.delete_where()
        if target == "route":
            return await self.delete_where(routes=[value or ""])
        if target == "prefix":
            return await self.delete_where(key_prefix=value or "\0")
        if target == "partition":
            return await self.delete_where(partition=value or "")
        if target == "url" and uri is not None:
            return await self.delete_where(uri=uri)
        return 0

    def share_later(self, key: str, entry: Entry) -> None:
        """`put` in the background, off the request; past PUTS_IN_FLIGHT_MAX waiting (a slow Redis),
        entries are not shared rather than queued."""
        if (not (self.shareable(entry) or self.indexable(entry)) or len(self._puts) >= PUTS_IN_FLIGHT_MAX
                or not self.available()):
            return
        task = asyncio.get_running_loop().create_task(self.put(key, entry))
        self._puts.add(task)
        task.add_done_callback(self._puts.discard)

    # --- one fetch per cold key, across processes -------------------------------------------

    async def lead(self, key: str) -> bool | None:
        """Take the key's fetch lock: True (fetch it), False (another process fetches), None (no Redis)."""
        if not self.available():
            return None
        taken = await self.call(lambda: self.client.set(f"{self.prefix}lock:{key}", self.origin, nx=True,
                                                         px=LOCK_MS), failed=None)
        return None if taken is None and not self.available() else bool(taken)

    @contextlib.asynccontextmanager
    async def leading(self, key: str):
        """While the leader fetches, its lock is kept alive; a leader that dies lets it lapse
        within LOCK_MS, and a follower takes over."""
        async def keep() -> None:
            while True:
                await asyncio.sleep(LOCK_MS / 3000)
                await self.call(lambda: self.client.pexpire(f"{self.prefix}lock:{key}", LOCK_MS))
        keeper = asyncio.get_running_loop().create_task(keep())
        try:
            yield
        finally:
            keeper.cancel()

    async def finish(self, key: str, status: int, headers: Iterable[tuple[bytes, bytes]], body: bytes) -> None:
        """The leader's outcome for the followers, then the lock released."""
        data = encode_outcome(status, headers, body, time.time())

        async def publish() -> None:
            async with self.client.pipeline(transaction=False) as pipe:
                pipe.set(f"{self.prefix}o:{key}", data, px=OUTCOME_TTL_MS)
                pipe.delete(f"{self.prefix}lock:{key}")
                await pipe.execute()
        await self.call(publish)

    async def release(self, key: str) -> None:
        """The leader has no outcome to give (its fetch failed): a follower takes over."""
        await self.call(lambda: self.client.delete(f"{self.prefix}lock:{key}"))

    async def outcome(self, key: str, newer_than: float = 0.0) -> Outcome | None:
        """The outcome a leader left for `key` in the last OUTCOME_TTL_MS, if it is newer than
        `newer_than` (the stale entry a refetch replaces: the fetch that stored it is no answer)."""
        data = await self.call(lambda: self.client.get(f"{self.prefix}o:{key}"))
        if not data:
            return None
        try:
            outcome = decode_outcome(data)
        except (ValueError, KeyError, struct.error):
            return None
        return outcome if outcome.at > newer_than else None

    async def follow(self, key: str, deadline: float, take_over: Callable[[], Awaitable[object]],
                     result: Callable[[], Awaitable[object | None]] | None = None,
                     newer_than: float = 0.0) -> object | None:
        """Wait for another process's outcome for `key` until `deadline` (monotonic): `result()`
        when given (the image cache waits for the shared entry itself), else the Outcome it left.
        When its lock goes without one (the leader died or failed), this process takes the lock and
        runs `take_over()`, whose result is returned. None: nothing in time, or Redis failed."""
        result = result or (lambda: self.outcome(key, newer_than))
        pause = POLL_INTERVAL
        while time.monotonic() < deadline:
            if (outcome := await result()) is not None:
                return outcome
            if not self.available():
                return None
            if not await self.call(lambda: self.client.exists(f"{self.prefix}lock:{key}"), failed=1):
                if await self.lead(key):
                    return await take_over()
            await asyncio.sleep(pause)
            pause = min(pause * 2, POLL_INTERVAL_MAX)  # a slow origin is not asked about 50 times a second
        return None

    # --- flushes ------------------------------------------------------------------------------

    async def publish_flush(self, target: str, value: str | None) -> None:
        message = json.dumps({"origin": self.origin, "target": target, "value": value})
        await self.call(lambda: self.client.publish(self.prefix + FLUSH_CHANNEL, message))

    def listen_for_flushes(self, apply: Callable[[str, str | None], Awaitable[object]]) -> None:
        """Apply every other process's published flush here (until close())."""
        self._listener = asyncio.get_running_loop().create_task(self._listen(apply))

    async def _listen(self, apply: Callable[[str, str | None], Awaitable[object]]) -> None:
        while True:
            try:
                async with self.client.pubsub(ignore_subscribe_messages=True) as pubsub:
                    await pubsub.subscribe(self.prefix + FLUSH_CHANNEL)
                    while True:
                        message = await pubsub.get_message(timeout=1.0)
                        if message is None:
                            continue
                        try:
                            flush = json.loads(message["data"])
                        except (ValueError, TypeError):
                            continue
                        if isinstance(flush, dict) and flush.get("origin") != self.origin:
                            try:
                                await apply(str(flush.get("target")), flush.get("value"))
                            except Exception:  # a flush this process could not apply is no Redis failure
                                log.exception("shared cache: applying a flush of another process failed")
            except asyncio.CancelledError:
                raise
            except (TimeoutError, self._timeout_error) as exc:  # late, as in `call`: down only if a PING fails too
                self._suspect(exc)
                await asyncio.sleep(RESUBSCRIBE_AFTER if self.available() else RETRY_AFTER)
            except Exception as exc:  # noqa: BLE001 - Redis down: listen again once it answers
                self._failed(exc)
                await asyncio.sleep(RETRY_AFTER)

    # --- failing soft -------------------------------------------------------------------------

    def available(self) -> bool:
        return time.monotonic() >= self._down_until

    async def call(self, operation: Callable[[], Awaitable], failed=None):
        """`await operation()` (a Redis command), or `failed` when Redis fails or failed lately."""
        if not self.available():
            return failed
        try:
            return await operation()
        except (TimeoutError, self._timeout_error) as exc:
            self._suspect(exc)
            return failed
        except Exception as exc:  # noqa: BLE001 - any Redis failure: this process goes on alone
            self._failed(exc)
            return failed

    def _suspect(self, exc: Exception) -> None:
        """A command whose replies (its retry's too) came later than the socket timeout: Redis may
        be gone, or paused, or this process's event loop was too busy to read them in time (a burst
        of new connections on a loaded machine). One PING, given longer, tells them apart; only a
        PING that fails too takes the shared tier away, since that turns one cluster-wide fetch
        into one per process."""
        if self._confirming is not None:
            return

        async def confirm() -> None:
            import redis.asyncio as aioredis

            # A client of its own: the PING gets CONFIRM_TIMEOUT, not the commands' socket timeout.
            prober = aioredis.Redis.from_url(self.url, socket_timeout=CONFIRM_TIMEOUT,
                                             socket_connect_timeout=CONFIRM_TIMEOUT)
            try:
                await prober.ping()
            except Exception:  # noqa: BLE001 - no answer again: down
                self._failed(exc)
            else:
                log.debug("shared cache: a Redis reply came late (%s); Redis answers", type(exc).__name__)
            finally:
                self._confirming = None
                await prober.aclose()
        self._confirming = asyncio.get_running_loop().create_task(confirm())

    def _failed(self, exc: Exception) -> None:
        now = time.monotonic()
        self._down_until = now + RETRY_AFTER
        if now - self._warned_at > 30:
            self._warned_at = now
            log.warning("shared cache (Redis) failed (%s: %s); this process serves from its own cache meanwhile",
                        type(exc).__name__, exc)

    async def close(self) -> None:
        for task in [*self._puts, *([self._confirming] if self._confirming else [])]:
            task.cancel()
        if self._listener is not None:
            self._listener.cancel()
            try:
                await self._listener
            except (asyncio.CancelledError, Exception):  # noqa: BLE001
                pass
        await self.client.aclose()
