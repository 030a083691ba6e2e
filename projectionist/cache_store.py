"""The response cache's storage: cache keys, entries, and two layers (memory LRU over diskcache).

Entries keep the upstream's body exactly as received (still content-encoded), so a hit is served
without re-encoding. The memory layer is bounded in bytes and answers in the event loop; the disk
layer (diskcache: SQLite index + files, safe across processes, bounded in bytes with LRU culling)
is blocking and is only touched from a worker thread.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import diskcache

from .disk_guard import DiskWrites

# Query parameters that carry credentials: never part of a key (the scope partition is).
CREDENTIAL_PARAMS = frozenset({"x-plex-token", "api_key", "access_token"})
# Parameters that say which device, app or play session asks, not what it asks for: a fresh
# browser profile (new client identifier) or a second device must hit what the first stored.
DEVICE_PARAMS = frozenset({
    "x-plex-client-identifier", "x-plex-session-identifier", "x-plex-session-id", "x-plex-product",
    "x-plex-version", "x-plex-platform", "x-plex-platform-version", "x-plex-device", "x-plex-device-name",
    "x-plex-device-screen-resolution", "x-plex-device-vendor", "x-plex-model", "x-plex-features",
    "x-plex-provider-version", "x-plex-drm", "x-plex-client-profile-name", "x-plex-client-platform",
})
KEY_NEUTRAL_PARAMS = CREDENTIAL_PARAMS | DEVICE_PARAMS


def key_query(query: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """The query as part of a key: sorted, without credentials and device identity."""
    return sorted((k, v) for k, v in query if k.lower() not in KEY_NEUTRAL_PARAMS)


def without_key_neutral_params(url: str) -> str:
    """A URL as a key sees it: its credentials and device identity left out (flush by URL stores
    and logs this form only, never a token)."""
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k.lower() not in KEY_NEUTRAL_PARAMS]
    return urlunsplit(parts._replace(query=urlencode(query)))


def uri_key(upstream: str, method: str, path: str, query: Iterable[tuple[str, str]]) -> str:
    """What the request names, whoever asks and whatever its varied headers: a miss whose URI is
    stored for another partition or another variant is told apart from a URI never seen."""
    raw = f"{method} {upstream} {path}?{urlencode(key_query(query))}"
    return hashlib.sha256(raw.encode()).hexdigest()


def cache_key(upstream: str, method: str, path: str, query: Iterable[tuple[str, str]],
              vary: Mapping[str, str], partition: str) -> str:
    """method + upstream + path + sorted query without credentials or device identity + declared
    vary headers + scope partition ("shared", or "u<user id>" for user-scoped routes), hashed."""
    varied = "&".join(f"{k.lower()}={v}" for k, v in sorted(vary.items()))
    raw = f"{method} {upstream} {path}?{urlencode(key_query(query))}\n{varied}\n{partition}"
    return hashlib.sha256(raw.encode()).hexdigest()


@dataclass
class Entry:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes  # as received: still gzip/br if the upstream compressed it
    stored_at: float
    ttl: float
    stale_while_revalidate: float
    stale_if_error: float
    route: str
    partition: str
    hits: int = 0
    memory_only: bool = False
    uri: str = ""  # its uri_key (flush by URL); entries stored before it existed have none

    @property
    def size(self) -> int:
        return len(self.body) + sum(len(k) + len(v) for k, v in self.headers) + 200

    def age(self, now: float | None = None) -> float:
        return (now or time.time()) - self.stored_at

    def fresh(self, now: float | None = None) -> bool:
        return self.age(now) < self.ttl

    def usable_stale(self, window: float, now: float | None = None) -> bool:
        return self.age(now) < self.ttl + window

    def expired_for_good(self, now: float | None = None) -> bool:
        return self.age(now) >= self.ttl + max(self.stale_while_revalidate, self.stale_if_error)


class MemoryLRU:
    """Least-recently-used entries, bounded by their total size in bytes."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self.evictions = 0
        self._entries: OrderedDict[str, Entry] = OrderedDict()

    def get(self, key: str) -> Entry | None:
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
        return entry

    def put(self, key: str, entry: Entry) -> list[tuple[str, Entry]]:
        """Store; returns the entries evicted to make room."""
        self.pop(key)
        if entry.size > self.max_bytes:
            return []
        self._entries[key] = entry
        self.bytes += entry.size
        evicted = []
        while self.bytes > self.max_bytes:
            old_key, old = self._entries.popitem(last=False)
            self.bytes -= old.size
            self.evictions += 1
            evicted.append((old_key, old))
        return evicted

    def pop(self, key: str) -> Entry | None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.bytes -= entry.size
        return entry

    def peek(self, key: str) -> Entry | None:
        """The entry without counting it as used."""
        return self._entries.get(key)

    def keys(self) -> list[str]:
        return list(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


TAG_SEP = "\x1f"  # never in a route name, a partition or a hex URI key
_AFTER_SEP = chr(ord(TAG_SEP) + 1)


def entry_tag(entry: Entry) -> str:
    """The disk entry's tag, "route<US>partition<US>uri": what flush and invalidation select on."""
    return f"{entry.route}{TAG_SEP}{entry.partition}{TAG_SEP}{entry.uri}"


# diskcache's SQLite defaults let each connection (one per thread) hold a 32 MB page cache and map
# 64 MB of the file: RSS then climbs for a long while as the disk fills (the soak's creep), for
# little gain, since the OS page cache holds the file anyway. Small and bounded instead.
SQLITE_MEMORY = {"sqlite_cache_size": 512, "sqlite_mmap_size": 0}  # 512 pages: 2 MB per connection


class DiskLayer:
    """diskcache, bounded in bytes, least-recently-used culling. Blocking: call from a thread."""

    def __init__(self, directory: Path, max_bytes: int) -> None:
        # tag_index: entries are selected by their tag (entry_tag) in SQL, so the proxy keeps no
        # per-entry index in memory (RSS stays flat while the disk fills).
        self.cache = diskcache.Cache(str(directory), size_limit=max_bytes,
                                     eviction_policy="least-recently-used", cull_limit=10, tag_index=True,
                                     **SQLITE_MEMORY)
        self.writes = DiskWrites(f"response cache {directory}")

    def get(self, key: str) -> Entry | None:
        return self.cache.get(key)

    def put(self, key: str, entry: Entry) -> None:
        expire = entry.ttl + max(entry.stale_while_revalidate, entry.stale_if_error)
        # A full or read-only disk: the entry stays in memory only (warned once a minute).
        self.writes.attempt(lambda: self.cache.set(key, entry, expire=max(expire - entry.age(), 1),
                                                    tag=entry_tag(entry)))

    def delete(self, keys: Iterable[str]) -> None:
        for key in keys:
            self.cache.delete(key)

    def expire(self) -> set[str]:
        """Remove the expired entries; returns their keys."""
        now = time.time()
        gone = {key for key, in self.cache._sql(
            "SELECT key FROM Cache WHERE raw = 1 AND expire_time IS NOT NULL AND expire_time < ?", (now,))}
        self.cache.expire(now)
        return gone

    def keys_where(self, *, routes: Iterable[str] | None = None, partition: str | None = None,
                   uri: str | None = None, prefix: str | None = None) -> list[str]:
        """Keys of the stored entries of these routes / this partition / this URI / key prefix (all
        when nothing is given), read from diskcache's own table by tag (see entry_tag)."""
        sql = "SELECT key FROM Cache WHERE raw = 1"
        if routes is not None:
            keys: list[str] = []
            for route in routes:  # a range on the tag index: "route<US>partition<US>..." is a prefix
                low = f"{route}{TAG_SEP}{partition}{TAG_SEP}" if partition is not None else f"{route}{TAG_SEP}"
                keys += [k for k, in self.cache._sql(f"{sql} AND tag >= ? AND tag < ?", (low, low[:-1] + _AFTER_SEP))]
            return keys
        args: list[str] = []
        if partition is not None:
            sql += " AND instr(tag, ?) > 0"
            args.append(f"{TAG_SEP}{partition}{TAG_SEP}")
        if uri:
            sql += " AND substr(tag, -?) = ?"
            args += [len(uri) + 1, f"{TAG_SEP}{uri}"]
        if prefix is not None:
            sql += " AND substr(key, 1, ?) = ?"
            args += [len(prefix), prefix]
        return [k for k, in self.cache._sql(sql, args)]

    def tag_untagged(self) -> int:
        """Entries stored before tags existed get theirs (once, at start, in a thread)."""
        count = 0
        for key, in self.cache._sql("SELECT key FROM Cache WHERE raw = 1 AND tag IS NULL").fetchall():
            entry = self.cache.get(key)
            if isinstance(entry, Entry):
                self.put(key, entry)
                count += 1
        return count

    def __len__(self) -> int:
        return len(self.cache)

    def contains(self, keys: Iterable[str]) -> set[str]:
        return {k for k in keys if k in self.cache}

    def clear(self) -> None:
        self.cache.clear()

    def volume(self) -> int:
        return self.cache.volume()

    def close(self) -> None:
        self.cache.close()
