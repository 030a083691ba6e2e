"""The response cache: rules.yaml-declared, two layers, coalesced, stale-tolerant, per-user.

For a GET on a route with a `cache` rule (anchors: nginx proxy_cache_lock / use_stale, Varnish
grace, RFC 5861, RFC 9111, RFC 9211):

- fresh entry: answered from memory (or disk, then promoted), `Cache-Status: …; hit`;
- stale inside `stale_while_revalidate`: answered at once, one background refresh per key;
- miss: the cache fetches upstream in a task it owns (with a deadline); every concurrent
  identical miss waits for that one answer (`collapsed`). The task belongs to no client: one that
  disconnects, times out or meets a limiter's refusal neither cancels it nor sends the others
  upstream on their own, and what it fetches is stored all the same;
- upstream down, timing out, 5xx or 429: stale inside `stale_if_error`, else a quick 502/504.

Every miss says why (RFC 9211 `fwd=` uri-miss / vary-miss / stale / request / bypass, plus
`fwd-status`, `stored`, `collapsed`, `ttl` and a `detail=`: expired, evicted, new-partition,
uncacheable-status, no-store, invalidated, flushed, no-rule, write, unknown-user), and the usage
recorder keeps the same reason per request (usage_events.cache_reason).

Keys never contain credentials nor device identity (cache_store.KEY_NEUTRAL_PARAMS); `user`-scoped routes are partitioned by the real account, so two
users never share an entry and requests whose user is unknown bypass the cache. Writes on routes
with `invalidates` drop the named routes' entries of the same partition. Every answer carries
`Cache-Status` and `Age`, and CORS headers for the requesting Origin.

The cache fetches misses itself (aiohttp, bodies kept encoded as received) rather than letting
mitmproxy forward them: that gives a deadline, and one code path for misses and refreshes. The
entry is stored in the `response` hook, after the credential addons rewrote the answer, so what is
stored is what a client may see; plex.tv answers (rewritten per user) keep that in-flow path,
everything else is stored by the fetching task itself.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Iterable
from urllib.parse import parse_qsl, urlsplit
from dataclasses import dataclass
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import aiohttp
from mitmproxy import ctx, http
from mitmproxy.net.http import url as http_url

from projectionist.cache_store import DiskLayer, Entry, MemoryLRU, cache_key, uri_key
from projectionist.cache_mirror import CacheMirror
from projectionist.limits import RateLimited
from projectionist.metrics import CACHE_EVICTIONS, add_cache_source, remove_cache_source
from projectionist.peer_bodies import PeerBodies
from projectionist.rules import MEMO_ENTRIES, MEMO_MAX_TARGET, CacheRule
from projectionist.shared_tier import Outcome, SharedTier, redis_url
from projectionist.store import database_id

from . import anonymous, flowinfo
from .header_lookup import header
from .local_responses import cors_headers, gateway_error
from .rules_watch import RulesWatcher
from .upstream_fetch import Fetched, fetch, upstream_session

log = logging.getLogger(__name__)

BUCKET = "api"
_CORS_PREFIX = "access-control-"
_LEADER = "projectionist.cache.leader"
_INVALIDATES = "projectionist.cache.invalidates"
_TOKEN_BEARING = ("plex-tv",)  # answers rewritten by the credential addons: refreshed only in-flow
WARM_HEADER = "X-Projectionist-Warm"  # set by the cache warmer on its own requests (stripped here)
_STATUS = "projectionist.cache.status"  # Cache-Status for a forwarded flow, set in `response`
# Per-key bookkeeping is bounded: RSS stays flat once the memory layer is full, however many
# entries the disk holds (flush and invalidation select disk entries in SQL, by tag).
_GONE_MAX = 20_000  # why recently dropped keys went: remembered for this many keys
_KNOWN_URIS_MAX = 20_000  # URIs whose stored variants are remembered (miss reasons only)
_FOLLOW_SLACK = 6.0  # seconds a waiter allows beyond the upstream timeout (a limiter's queue)
_INVALIDATE = "invalidate"  # a write's invalidation, as published to the other processes
# Flushes every process applies (the shared tier publishes them); "warm" too: each process
# warms the lists of the accounts that signed in through it.
_SHARED_TARGETS = frozenset({"all", "bucket", "route", "prefix", "url", "partition", "warm"})


class UpstreamFailed(Exception):
    """The upstream answered 5xx/429 where a stale entry can stand in."""


@dataclass(frozen=True, slots=True)
class Miss:
    """Why a request went upstream (RFC 9211 `fwd` and `detail`)."""

    fwd: str  # uri-miss | vary-miss | stale | request | bypass | miss
    detail: str | None = None

    def params(self, *, fwd_status: int | None = None, stored: bool = False, collapsed: bool = False,
               ttl: float | None = None) -> str:
        parts = [f"fwd={self.fwd}"]
        if fwd_status is not None:
            parts.append(f"fwd-status={fwd_status}")
        if stored:
            parts.append("stored")
        if collapsed:
            parts.append("collapsed")
        if ttl is not None:
            parts.append(f"ttl={int(ttl)}")
        if self.detail:
            parts.append(f"detail={self.detail}")
        return "; ".join(parts)

    @property
    def reason(self) -> str:
        """As recorded in usage_events.cache_reason: "uri-miss:new-partition"."""
        return f"{self.fwd}:{self.detail}" if self.detail else self.fwd


@dataclass(frozen=True, slots=True)
class Fetch:
    """What the cache's own fetch of a miss brought back."""

    fetched: Fetched
    stored: bool
    ttl: float | None
    collapsed: bool = False  # another process fetched it (the shared tier's leader)


class ResponseCache:
    def __init__(self, watcher: RulesWatcher) -> None:
        self.watcher = watcher
        self.memory: MemoryLRU | None = None
        self.disk: DiskLayer | None = None
        self.shared: SharedTier | None = None  # Redis, when configured: behind memory and disk
        self.mirror: CacheMirror | None = None
        self.session: aiohttp.ClientSession | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._inflight: dict[str, asyncio.Future] = {}  # key -> the fetch (task or in-flow leader)
        # The stored keys (-> partition) of recently stored URIs: how a miss of a known URI (another
        # variant, another partition, an entry the disk culled) is told from a URI never seen.
        self._variants: OrderedDict[str, dict[str, str]] = OrderedDict()
        self._gone: OrderedDict[str, str] = OrderedDict()  # key -> why it was dropped
        self._refreshing: set[str] = set()
        # The router's known Plex connections (set by the runner): a URL of another server of the
        # account names its own entries (`plex@<machine id>`) when flushed by URL.
        self.plex_connections = None
        self._tasks: set[asyncio.Task] = set()
        # The rate limiter (proxy_addons/rate_limit.py) sets itself here; every upstream fetch of
        # the cache then goes through its fetch(): a slot first, retries of 429/503 inside it.
        self.upstream_gate = None
        self.warmer = None  # proxy_addons/cache_warmer.py sets itself here (flush target "warm")
        self.bodies: PeerBodies | None = None  # set by the runner: bodies too big for the shared tier

    def load(self, loader) -> None:
        loader.add_option("projectionist_cache", bool, True, "Serve and store cacheable answers (rules.yaml).")

    def running(self) -> None:
        if self.memory is not None or self.watcher.rules is None or not ctx.options.projectionist_home:
            return
        settings = self.watcher.rules.model.cache
        home = Path(ctx.options.projectionist_home).expanduser()
        self.memory = MemoryLRU(settings.memory_max_bytes)
        self._executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="cache-disk")
        self.disk = DiskLayer(home / "cache" / "responses", settings.disk_max_bytes)
        self.mirror = CacheMirror(Path(ctx.options.projectionist_db).expanduser()).start()
        self.session = upstream_session()
        if url := redis_url(self.watcher.rules.model.proxy.redis_url):  # read at start: a change needs a restart
            self.shared = SharedTier(url, settings.shared_max_body_bytes,
                                     database_id(Path(ctx.options.projectionist_db).expanduser()), bodies=self.bodies)
            self.shared.listen_for_flushes(self._apply_peer_flush)
            self.shared.serve_bodies(self._held_body)
            log.info("response cache: shared tier on Redis")
        self._spawn(self._tag_legacy_entries())
        self._spawn(self._apply_flush_requests_forever())
        add_cache_source(self._memory_size)
        add_cache_source(self._disk_size)

    def _memory_size(self) -> tuple[str, str, int, int]:
        return BUCKET, "memory", len(self.memory), self.memory.bytes

    def _disk_size(self) -> tuple[str, str, int, int]:  # scraped from a thread: diskcache's own connection
        return BUCKET, "disk", len(self.disk), self.disk.volume()

    async def done(self) -> None:
        remove_cache_source(self._memory_size)
        remove_cache_source(self._disk_size)
        for task in list(self._tasks):
            task.cancel()
        if self.session is not None:
            await self.session.close()
        if self.shared is not None:
            await self.shared.close()
            self.shared = None
        if self.mirror is not None:
            self.mirror.close()
        if self._executor is not None:
            self._executor.submit(self.disk.close).result()
            self._executor.shutdown(wait=True)
        self.memory = None

    # --- the request path ---------------------------------------------------------------------

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        """Fresh entries of shared routes are answered as soon as the headers are in: they need no
        user and no credential, so the credential addons' work would be wasted on them."""
        info = flowinfo.get(flow)
        if info is not None and flow.request.headers.pop(WARM_HEADER, None) is not None:
            info.warm = True  # never forwarded: the upstream sees the player's request shape
        if info is None or self.memory is None or not ctx.options.projectionist_cache or info.match.route is None:
            return
        rule = info.match.route.rule.cache
        if (rule is None or info.scope(rule.scope) != "shared" or flow.request.method not in ("GET", "HEAD")
                or _asks_no_cache(flow.request)):
            return
        if info.match.credentials in ("tmdb", "trakt") and anonymous.mode(self.watcher) != "lend":
            return  # what the server's key fetched is not for strangers: the credential addons decide first
        key = self._key(flow, info, rule, "shared")
        entry = self.memory.get(key)
        now = time.time()
        if entry is not None and entry.fresh(now):
            self._serve(flow, info, key, entry, "hit", now)

    async def request(self, flow: http.HTTPFlow) -> None:
        info = flowinfo.get(flow)
        if info is None or flow.response is not None or self.memory is None or not ctx.options.projectionist_cache:
            return
        rule = info.match.route.rule if info.match.route else None
        if rule is None:
            return
        if rule.invalidates and flow.request.method != "OPTIONS" and info.user_id is not None:
            # Routes that invalidate are writes; they change what this user's entries say.
            flow.metadata[_INVALIDATES] = (rule.invalidates, f"u{info.user_id}")
        if rule.cache is None or flow.request.method not in ("GET", "HEAD"):
            return
        if info.credential == anonymous.CREDENTIAL:  # forwarded as sent: its answer is the client's key's
            info.cache = "bypass"
            bypass(flow, info, Miss("bypass", "anonymous"))
            return
        partition = self._partition(rule.cache, info)
        if partition is None:  # user-scoped data of an unknown user: never shared, never stored
            info.cache = "bypass"
            bypass(flow, info, Miss("bypass", "unknown-user"))
            return
        key = self._key(flow, info, rule.cache, partition)
        uri = self._uri(flow, info)
        entry = await self._lookup(key, uri, info.match.route_name, partition)
        now = time.time()
        no_cache = _asks_no_cache(flow.request)
        if entry is not None and entry.fresh(now) and not no_cache:
            return self._serve(flow, info, key, entry, "hit", now)
        cache = rule.cache
        revalidates_in_background = (cache.stale_while_revalidate > 0
                                     and info.match.upstream.kind not in _TOKEN_BEARING)
        if (entry is not None and not no_cache and revalidates_in_background
                and entry.usable_stale(cache.stale_while_revalidate, now)):
            self._serve(flow, info, key, entry, "stale", now, detail="fwd=stale")
            info.cache_reason = "stale:stale-while-revalidate"
            if key not in self._refreshing and key not in self._inflight:
                self._refreshing.add(key)
                self._spawn(self._refresh(key, uri, flow.copy()))
            return
        if no_cache:
            miss = Miss("request")
        elif entry is not None:
            miss = Miss("stale", "expired")
        else:
            miss = self._why_missing(key, uri, partition)
        info.cache_reason = miss.reason
        if info.match.upstream.kind in _TOKEN_BEARING:
            return await self._miss_in_flow(flow, info, key, entry, miss)
        owned = self._inflight.get(key)
        collapsed = owned is not None
        if owned is None:
            stale_ok = entry is not None and entry.usable_stale(cache.stale_if_error)
            owned = self._inflight[key] = self._spawn(self._owned_fetch(key, uri, flow.copy(), stale_ok))
            owned.add_done_callback(lambda done, key=key: self._inflight.pop(key, None) if self._inflight.get(key) is done else None)
        # Varnish's grace: with a stale entry usable, a sick upstream costs the client
        # proxy.stale_timeout at most; the owned fetch goes on and stores.
        graced = entry is not None and entry.usable_stale(cache.stale_if_error)
        wait = self.watcher.rules.model.proxy.stale_timeout if graced else self._timeout() + _FOLLOW_SLACK
        try:
            outcome = await asyncio.wait_for(asyncio.shield(owned), wait)
        except TimeoutError as exc:  # the fetch goes on and stores; this client gets stale or its 504 now
            if graced:
                info.cache_reason = "stale:stale-timeout"
                return self._serve(flow, info, key, entry, "stale", detail="fwd=stale; detail=stale-timeout")
            outcome = exc
        except asyncio.CancelledError:
            if owned.cancelled():  # the proxy is shutting down
                outcome = ConnectionError("cancelled")
            else:
                raise
        self._answer(flow, info, key, entry, miss, outcome, collapsed)

    async def _owned_fetch(self, key: str, uri: str, flow: http.HTTPFlow, stale_ok: bool,
                           background: bool | None = None) -> Fetch | Exception:
        """The cache's own fetch of a miss: nobody's request, so nobody's disconnect ends it. With a
        shared tier, one process fetches for all: the others follow its outcome."""
        if self.shared is None:
            return await self._fetch_and_store(key, uri, flow, stale_ok, background=background)
        led = await self.shared.lead(key)
        if led is False:  # another process fetches it
            outcome = await self.shared.follow(key, time.monotonic() + self._timeout() + _FOLLOW_SLACK,
                                               lambda: self._lead(key, uri, flow, stale_ok, background),
                                               newer_than=self._went_stale_at(key))
            if isinstance(outcome, Outcome):
                return self._followed(key, uri, flow, outcome)
            if outcome is not None:  # its lock went without an outcome: this process led instead
                return outcome
            led = None  # nothing in time, or Redis failed: fetch here
        if led:
            return await self._lead(key, uri, flow, stale_ok, background)
        return await self._fetch_and_store(key, uri, flow, stale_ok, background=background)

    async def _lead(self, key: str, uri: str, flow: http.HTTPFlow, stale_ok: bool,
                    background: bool | None = None) -> Fetch | Exception:
        """With the key's lock: fetch, store (shared before the lock goes), hand the outcome over.
        A fresh entry here (another request of this process followed the leader and stored its
        answer meanwhile), a leader that finished a moment ago left its outcome, or a fresh shared
        entry: that is the answer, not a new fetch."""
        if (held := self.memory.peek(key)) is not None and held.fresh():
            await self.shared.release(key)
            return _collapsed(held)
        replaced = self._went_stale_at(key)
        if (recent := await self.shared.outcome(key, replaced)) is not None:
            await self.shared.release(key)
            return self._followed(key, uri, flow, recent)
        info = flowinfo.get(flow)
        stored = await self.shared.get(key, info.match.route_name, self._partition(info.match.route.rule.cache, info) or "", uri)
        if stored is not None and stored.fresh() and stored.stored_at > replaced:  # refreshed since this one looked
            await self.shared.release(key)
            self._put(key, uri, stored, share=False)
            return _collapsed(stored)
        async with self.shared.leading(key):
            outcome = await self._fetch_and_store(key, uri, flow, stale_ok, share=False, background=background)
        if isinstance(outcome, Fetch):
            if outcome.stored and (entry := self.memory.peek(key)) is not None:
                await self.shared.put(key, entry)
            fetched = outcome.fetched
            await self.shared.finish(key, fetched.status, fetched.headers, fetched.body)
        else:
            await self.shared.release(key)
        return outcome

    def _went_stale_at(self, key: str) -> float:
        """When this process's entry for `key` went (or goes) stale; 0 when it has none. An answer
        fetched before that is the one this process already has, not the refetch it wants."""
        entry = self.memory.peek(key)
        return entry.stored_at + entry.ttl if entry is not None else 0.0

    def _followed(self, key: str, uri: str, flow: http.HTTPFlow, outcome: Outcome) -> Fetch:
        """Another process's answer for `key`: stored here too (it shared the entry itself)."""
        info = flowinfo.get(flow)
        fetched = Fetched(outcome.status, outcome.headers, outcome.body)
        stored, ttl = False, None
        if fetched.status < 500 and fetched.status != 429:
            stored = self._store(key, uri, flow, info, fetched, share=False)
            ttl = _storable_ttl(info.match.route.rule.cache, fetched) if stored else None
        return Fetch(fetched, stored, ttl, collapsed=True)

    async def _fetch_and_store(self, key: str, uri: str, flow: http.HTTPFlow, stale_ok: bool,
                               share: bool = True, background: bool | None = None) -> Fetch | Exception:
        info = flowinfo.get(flow)
        try:  # the warmer's misses (and refreshes) take a slot only when one is free: people first
            fetched = await self._fetch(flow, stale_ok=stale_ok, background=info.warm if background is None else background)
        except (RateLimited, TimeoutError, aiohttp.ClientError, OSError) as exc:
            return exc
        stored, ttl = False, None
        if fetched.status < 500 and fetched.status != 429:
            stored = self._store(key, uri, flow, info, fetched, share=share)
            ttl = _storable_ttl(info.match.route.rule.cache, fetched) if stored else None
        else:
            self._remember_gone(key, "uncacheable-status")
        return Fetch(fetched, stored, ttl)

    def _answer(self, flow: http.HTTPFlow, info, key: str, stale: Entry | None, miss: Miss,
                outcome: Fetch | Exception, collapsed: bool) -> None:
        rule = info.match.route.rule.cache
        stale_ok = stale is not None and stale.usable_stale(rule.stale_if_error)
        info.cache = "miss"
        if isinstance(outcome, Fetch):
            fetched = outcome.fetched
            if (fetched.status >= 500 or fetched.status == 429) and stale_ok:
                info.cache_reason = "stale:stale-if-error"
                return self._serve(flow, info, key, stale, "stale",
                                   detail=f"fwd=stale; fwd-status={fetched.status}; detail=stale-if-error")
            collapsed = collapsed or outcome.collapsed
            flow.response = self._response(flow, info, fetched, miss.params(
                fwd_status=fetched.status, stored=outcome.stored and not collapsed, collapsed=collapsed,
                ttl=outcome.ttl))
        elif isinstance(outcome, RateLimited):  # no slot for the upstream: stale if usable, else the 429
            if stale_ok:
                info.cache_reason = "stale:rate-limited"
                return self._serve(flow, info, key, stale, "stale", detail="fwd=stale; detail=rate-limited")
            flow.response = outcome.response.copy()
            flow.response.headers["Cache-Status"] = f"Projectionist; {miss.params(fwd_status=429)}"
        else:
            self._answer_failure(flow, info, key, stale, outcome, miss)

    async def _miss_in_flow(self, flow: http.HTTPFlow, info, key: str, entry: Entry | None, miss: Miss) -> None:
        """plex.tv: the answer is stored once the credential addons rewrote it (`response`), so the
        first request is the leader and the others follow it."""
        if (leader := self._inflight.get(key)) is not None:
            try:
                outcome = await asyncio.wait_for(asyncio.shield(leader), self._timeout())
            except TimeoutError as exc:
                outcome = exc
            if isinstance(outcome, Fetched):
                flow.response = self._response(flow, info, outcome, miss.params(fwd_status=outcome.status, collapsed=True))
                info.cache = "miss"
                return
            if isinstance(outcome, Exception):  # the leader's upstream failed: so would ours
                return self._answer_failure(flow, info, key, entry, outcome, miss)
        await self._fetch_as_leader(flow, info, key, entry, miss)

    async def _fetch_as_leader(self, flow: http.HTTPFlow, info, key: str, stale: Entry | None, miss: Miss) -> None:
        future = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        flow.metadata[_LEADER] = (key, self._uri(flow, info), miss)
        rule = info.match.route.rule.cache
        stale_ok = stale is not None and stale.usable_stale(rule.stale_if_error)
        try:  # a warm request takes a slot only when one is free, as for shared routes
            fetched = await self._fetch(flow, stale_ok=stale_ok, background=info.warm)
        except RateLimited as refused:  # no slot for the upstream: stale if usable, else the 429
            self._finish(key, None)  # followers ask the limiter for themselves
            flow.metadata.pop(_LEADER, None)
            if stale_ok:
                return self._serve(flow, info, key, stale, "stale", detail="fwd=stale; detail=rate-limited")
            flow.response = refused.response
            info.cache = "miss"
            return
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            self._finish(key, exc)
            flow.metadata.pop(_LEADER, None)  # nothing of this answer is stored
            return self._answer_failure(flow, info, key, stale, exc, miss)
        if (fetched.status >= 500 or fetched.status == 429) and stale is not None and stale.usable_stale(rule.stale_if_error):
            self._finish(key, UpstreamFailed(fetched.status))
            flow.metadata.pop(_LEADER, None)
            return self._serve(flow, info, key, stale, "stale",
                               detail=f"fwd=stale; fwd-status={fetched.status}; detail=stale-if-error")
        flow.response = fetched.to_response()
        info.cache = "miss"

    def _answer_failure(self, flow: http.HTTPFlow, info, key: str, stale: Entry | None, exc: Exception,
                        miss: Miss = Miss("miss")) -> None:
        """No upstream answer: stale inside stale_if_error, else a quick clean 504 or 502."""
        if stale is not None and stale.usable_stale(info.match.route.rule.cache.stale_if_error):
            info.cache_reason = "stale:stale-if-error"
            return self._serve(flow, info, key, stale, "stale", detail="fwd=stale; detail=stale-if-error")
        gateway = 504 if isinstance(exc, TimeoutError) else 502
        flow.response = gateway_error(flow.request, info.match.upstream.kind, gateway, "the upstream did not answer")
        flow.response.headers["Cache-Status"] = f"Projectionist; {miss.params(fwd_status=gateway)}"
        info.cache = "miss"

    def _why_missing(self, key: str, uri: str, partition: str) -> Miss:
        if (gone := self._gone.get(key)) is not None:
            return Miss("uri-miss", gone)
        variants = self._variants.get(uri)
        if variants:
            if key in variants:  # stored, dropped by no one: the disk culled it
                return Miss("uri-miss", "evicted")
            if partition in variants.values():
                return Miss("vary-miss")
            return Miss("uri-miss", "new-partition")
        return Miss("uri-miss")

    async def _fetch(self, flow: http.HTTPFlow, *, stale_ok: bool = False, background: bool = False) -> Fetched:
        if self.upstream_gate is not None:
            return await self.upstream_gate.fetch(flow, self._fetch_once, stale_ok=stale_ok, background=background)
        return await self._fetch_once(flow)

    async def _fetch_once(self, flow: http.HTTPFlow) -> Fetched:
        info = flowinfo.get(flow)
        rules = self.watcher.rules
        timeouts = info.match.timeouts(rules.model.proxy) if info is not None and rules is not None else self._timeout()
        return await fetch(self.session, flow.request, timeouts)

    # --- the response path --------------------------------------------------------------------

    async def response(self, flow: http.HTTPFlow) -> None:
        info = flowinfo.get(flow)
        if info is None or self.memory is None:
            return
        response = flow.response
        if (leader := flow.metadata.pop(_LEADER, None)) is not None:
            key, uri, miss = leader
            fetched = Fetched(response.status_code, list(response.headers.fields), response.raw_content or b"")
            self._finish(key, fetched)
            stored = self._store(key, uri, flow, info, fetched)
            ttl = _storable_ttl(info.match.route.rule.cache, fetched) if stored else None
            response.headers["Cache-Status"] = f"Projectionist; {miss.params(fwd_status=fetched.status, stored=stored, ttl=ttl)}"
        elif "Cache-Status" not in response.headers and not response.stream:
            miss = flow.metadata.pop(_STATUS, None) or _not_cached(flow)
            response.headers["Cache-Status"] = f"Projectionist; {miss.params(fwd_status=response.status_code)}"
            if info.cache_reason is None:
                info.cache_reason = miss.reason
        if (invalidates := flow.metadata.pop(_INVALIDATES, None)) and response.status_code < 400:
            await self.invalidate(*invalidates)

    def error(self, flow: http.HTTPFlow) -> None:
        # plex.tv's in-flow leader went away before the answer: its followers fetch for themselves.
        if (leader := flow.metadata.pop(_LEADER, None)) is not None:
            self._finish(leader[0], None)

    def _store(self, key: str, uri: str, flow: http.HTTPFlow, info, fetched: Fetched, now: float | None = None,
               share: bool = True) -> bool:
        rule: CacheRule = info.match.route.rule.cache
        ttl = _storable_ttl(rule, fetched)
        if ttl is None:
            self._remember_gone(key, "no-store" if fetched.status in (200, 404) else "uncacheable-status")
            return False
        entry = Entry(
            status=fetched.status,
            # CORS is answered per request (see _response), never replayed from whoever stored it.
            headers=[(k, v) for k, v in fetched.headers
                     if not k.lower().startswith(b"access-control-allow-origin") and k.lower() not in (b"age", b"cache-status")],
            body=fetched.body, stored_at=now or time.time(), ttl=ttl,
            stale_while_revalidate=rule.stale_while_revalidate, stale_if_error=rule.stale_if_error,
            route=info.match.route_name, partition=self._partition(rule, info) or "",
            memory_only=rule.memory_only, uri=uri,
        )
        self._put(key, uri, entry, share=share)
        return True

    def _put(self, key: str, uri: str, entry: Entry, share: bool = True) -> None:
        # Disk holds every other entry: only a memory-only entry is lost when memory evicts it.
        lost = [old_key for old_key, old in self.memory.put(key, entry) if old.memory_only]
        if lost:
            self._forget(lost, evicted=True)
        self._known(key, uri, entry)
        if not entry.memory_only:
            self._executor.submit(self.disk.put, key, entry)
        if share and self.shared is not None:
            self.shared.share_later(key, entry)
        self.mirror.stored(key, BUCKET, entry)

    # --- serving ------------------------------------------------------------------------------

    def _serve(self, flow: http.HTTPFlow, info, key: str, entry: Entry, outcome: str, now: float | None = None,
               detail: str = "hit") -> None:
        now = now or time.time()
        fetched = Fetched(entry.status, entry.headers, entry.body)
        age = max(0, int(entry.age(now)))
        flow.response = self._response(flow, info, fetched, f"{detail}; ttl={int(entry.ttl - entry.age(now))}", age=age)
        info.cache = outcome
        entry.hits += 1
        self.mirror.hit(key, now)

    def _response(self, flow: http.HTTPFlow, info, fetched: Fetched, status_detail: str,
                  age: int | None = None) -> http.Response:
        settings = cors_headers(flow.request, info.match.upstream.kind)
        if age is not None:
            settings["Age"] = str(age)
        settings["Cache-Status"] = f"Projectionist; {status_detail}"
        headers = http.Headers(answer_fields(fetched.headers, settings))
        response = http.Response(b"HTTP/1.1", fetched.status, b"", headers, None, None, time.time(), time.time())
        response.raw_content = b"" if flow.request.method == "HEAD" else fetched.body
        return response

    # --- background work ----------------------------------------------------------------------

    async def _refresh(self, key: str, uri: str, flow: http.HTTPFlow) -> None:
        """Stale-while-revalidate: fetch again and store, while clients get the stale entry. With a
        shared tier, one process refreshes for all; the others follow it and store its answer."""
        info = flowinfo.get(flow)
        try:
            if self.shared is not None:  # stored by whichever process fetches
                outcome = await self._owned_fetch(key, uri, flow, False, background=True)
                if isinstance(outcome, Exception):
                    raise outcome
                return
            fetched = await self._fetch(flow, background=True)
            if fetched.status < 500 and fetched.status != 429:
                self._store(key, uri, flow, info, fetched)
        except (TimeoutError, aiohttp.ClientError, OSError, RateLimited) as exc:
            log.info("background refresh of %s failed: %s", info.route, type(exc).__name__)
        finally:
            self._refreshing.discard(key)

    async def invalidate(self, routes: Iterable[str], partition: str, broadcast: bool = True) -> int:
        routes = set(routes)
        keys = set(self._memory_keys(lambda e: e.route in routes and e.partition == partition))
        keys.update(await self._disk_keys(routes=sorted(routes), partition=partition))
        await self._forget_async(list(keys), reason="invalidated")
        if broadcast and self.shared is not None:
            await self.shared.delete_where(routes=sorted(routes), partition=partition)
            await self.shared.publish_flush(_INVALIDATE, json.dumps([sorted(routes), partition]))
        return len(keys)

    async def _apply_peer_flush(self, target: str, value: str | None) -> None:
        """Another process's flush or invalidation (published on the shared tier), applied here."""
        if target == _INVALIDATE:
            routes, partition = json.loads(value or "[[], \"\"]")
            count = await self.invalidate(routes, partition, broadcast=False)
        else:
            count = await self.flush(target, value, broadcast=False)
            if target != "expired":  # the image cache's variants too, as for the control plane's flushes
                count += await asyncio.get_running_loop().run_in_executor(
                    None, self.mirror.flush_other_caches, target, value)
        log.info("cache flush %s %s from another process: %d entries", target, value or "", count)

    async def flush(self, target: str, value: str | None, broadcast: bool = True) -> int:
        """Drop entries: all, one bucket (this cache is the "api" bucket), one route, a key prefix, or
        the expired ones (the control plane's cache-cleanup job). With a shared tier, its entries go
        too and every other process drops its own (`broadcast`)."""
        if broadcast and self.shared is not None and target in _SHARED_TARGETS:
            await self._flush_shared(target, value)
        if target == "expired":
            return await self._drop_expired()
        if target == "all" or (target == "bucket" and value == BUCKET):
            keys = self.memory.keys() + await self._disk_keys()
        elif target == "route":
            keys = self._memory_keys(lambda e: e.route == value) + await self._disk_keys(routes=[value or ""])
        elif target == "prefix":
            prefix = value or "\0"
            keys = [k for k in self.memory.keys() if k.startswith(prefix)] + await self._disk_keys(prefix=prefix)
        elif target == "warm":
            return await self.warmer.warm(value or "schedule") if self.warmer is not None else 0
        elif target == "url":
            keys = await self._keys_of_url(value or "")
        elif target == "partition":  # one user's entries ("u<id>"): an admin disabled them
            keys = self._memory_keys(lambda e: e.partition == value) + await self._disk_keys(partition=value or "")
        else:
            return 0
        await self._forget_async(keys, reason="flushed")
        return len(set(keys))

    async def _flush_shared(self, target: str, value: str | None) -> None:
        if target != "bucket" or value == BUCKET:  # another bucket's flush is only published
            await self.shared.delete_for_flush(target, value, self._uri_of_url(value or "") if target == "url" else None)
        await self.shared.publish_flush(target, value)

    async def _keys_of_url(self, url: str) -> list[str]:
        """Every partition's and variant's entry of an upstream URL as the player sends it (the
        explicit proxy's host, or a reverse listener's address), normalised like the keys."""
        uri = self._uri_of_url(url)
        if uri is None:
            return []
        return list(set(self._memory_keys(lambda e: e.uri == uri)) | set(await self._disk_keys(uri=uri)))

    def _uri_of_url(self, url: str) -> str | None:
        rules = self.watcher.rules
        parts = urlsplit(url)
        if rules is None or not parts.hostname:
            return None
        upstream = rules.upstream_for_host(parts.hostname)
        if upstream is None and parts.port is not None:
            upstream = rules.reverse_listener(parts.port)
        if upstream is None:
            return None
        if self.plex_connections is not None and rules.upstreams[upstream].kind == "plex-server" and (
                server := self.plex_connections.other_server_at(upstream, parts.hostname, parts.port
                                                                or (443 if parts.scheme == "https" else 80))):
            upstream = f"{upstream}@{server}"
        return uri_key(upstream, "GET", parts.path or "/", parse_qsl(parts.query, keep_blank_values=True))

    def _memory_keys(self, selected) -> list[str]:
        return [k for k in self.memory.keys() if (e := self.memory.peek(k)) is not None and selected(e)]

    async def _disk_keys(self, **where) -> list[str]:
        return await asyncio.get_running_loop().run_in_executor(
            self._executor, lambda: self.disk.keys_where(**where))

    async def _drop_expired(self) -> int:
        """Entries past their last usable moment: from memory, and from disk (diskcache knows their expiry)."""
        now = time.time()
        stale = [k for k in self.memory.keys() if (e := self.memory.peek(k)) is not None and e.expired_for_good(now)]
        for key in stale:
            self.memory.pop(key)
        on_disk = await asyncio.get_running_loop().run_in_executor(self._executor, self.disk.expire)
        gone = set(stale) | on_disk
        self._forget(list(gone))
        await self._drop_culled_mirror_rows()
        return len(gone)

    async def _drop_culled_mirror_rows(self) -> None:
        """diskcache culls its least recently used entries silently when it is full: their mirror
        rows (cache_entries) go at the next cleanup, or the table would grow without bound."""
        loop = asyncio.get_running_loop()
        mirrored = {key for key, _, _ in await loop.run_in_executor(None, self.mirror.index_rows, BUCKET)}
        stored = set(await self._disk_keys()) | set(self.memory.keys())
        self.mirror.deleted(sorted(mirrored - stored), evicted=True)

    async def _forget_async(self, keys: list[str], reason: str) -> None:
        self._forget(keys, reason=reason)
        await asyncio.get_running_loop().run_in_executor(self._executor, self.disk.delete, keys)

    def _forget(self, keys: list[str], evicted: bool = False, reason: str | None = None) -> None:
        if evicted:
            CACHE_EVICTIONS.labels(BUCKET).inc(len(keys))
        reason = reason or ("evicted" if evicted else "expired")
        for key in keys:
            entry = self.memory.pop(key)
            if entry is not None and (variants := self._variants.get(entry.uri)) is not None:
                variants.pop(key, None)
                if not variants:
                    del self._variants[entry.uri]
            self._remember_gone(key, reason)
        self.mirror.deleted(keys, evicted=evicted)

    def _known(self, key: str, uri: str, entry: Entry) -> None:
        self._variants.setdefault(uri, {})[key] = entry.partition
        self._variants.move_to_end(uri)
        while len(self._variants) > _KNOWN_URIS_MAX:
            self._variants.popitem(last=False)
        self._gone.pop(key, None)

    def _remember_gone(self, key: str, reason: str) -> None:
        self._gone[key] = reason
        self._gone.move_to_end(key)
        while len(self._gone) > _GONE_MAX:
            self._gone.popitem(last=False)

    async def _lookup(self, key: str, uri: str, route: str, partition: str) -> Entry | None:
        entry = self.memory.get(key)
        if entry is None:  # the disk also holds what an earlier run stored
            entry = await asyncio.get_running_loop().run_in_executor(self._executor, self.disk.get, key)
            if entry is not None:
                self.memory.put(key, entry)
                self._known(key, uri, entry)
        if entry is None and self.shared is not None:  # what another process stored
            entry = await self.shared.get(key, route, partition, uri)
            if entry is not None and not entry.expired_for_good():
                self._put(key, uri, entry, share=False)
        if entry is not None and entry.expired_for_good():
            self._forget([key])
            return None
        return entry

    async def _held_body(self, key: str) -> bytes | None:
        """The body of an entry this process holds, for another machine its index record sent here."""
        entry = self.memory.peek(key) if self.memory is not None else None
        if entry is None and self.disk is not None:
            entry = await asyncio.get_running_loop().run_in_executor(self._executor, self.disk.get, key)
        return entry.body if entry is not None and not entry.memory_only else None

    async def _tag_legacy_entries(self) -> None:
        """Entries survive restarts on disk, tagged with what they are; those stored before tags
        existed are tagged once (flush and invalidation find them by tag)."""
        count = await asyncio.get_running_loop().run_in_executor(self._executor, self.disk.tag_untagged)
        if count:
            log.info("response cache: %d entries of an earlier version tagged", count)

    async def _apply_flush_requests_forever(self) -> None:
        while True:
            try:
                for request_id, target, value in await asyncio.get_running_loop().run_in_executor(
                        None, self.mirror.pending_flushes):
                    count = await self.flush(target, value)
                    await asyncio.get_running_loop().run_in_executor(None, self.mirror.flush_applied, request_id, count)
                    log.info("cache flush %s %s: %d entries", target, value or "", count)
            except Exception:
                log.exception("applying cache flush requests failed")
            await asyncio.sleep(0.5)

    # --- helpers ------------------------------------------------------------------------------

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _timeout(self) -> float:
        return self.watcher.rules.model.proxy.upstream_timeout if self.watcher.rules else 15.0

    @staticmethod
    def _partition(rule: CacheRule | None, info) -> str | None:
        if rule is not None and info.scope(rule.scope) == "shared":
            return "shared"
        if info.user_id is None:
            return None
        if rule is not None and rule.memory_only:
            # These answers embed the user's surrogates: key them to the surrogate presented, so a
            # new login (new surrogates) never receives answers carrying revoked ones.
            return f"u{info.user_id}:c{info.credential_ref}" if info.credential_ref is not None else None
        return f"u{info.user_id}"

    @staticmethod
    def _key(flow: http.HTTPFlow, info, rule: CacheRule, partition: str) -> str:
        request = flow.request
        vary = tuple((name, request.headers.get(name, "")) for name in rule.vary)
        method = request.method if request.method != "HEAD" else "GET"
        target = request.path
        if len(target) > MEMO_MAX_TARGET:
            return _target_key.__wrapped__(info.cache_upstream, method, target, vary, partition)
        return _target_key(info.cache_upstream, method, target, vary, partition)

    @staticmethod
    def _uri(flow: http.HTTPFlow, info) -> str:
        request = flow.request
        return uri_key(info.cache_upstream, request.method if request.method != "HEAD" else "GET",
                       request.path.split("?", 1)[0], request.query.items(multi=True))

    def _finish(self, key: str, outcome: Fetched | Exception | None) -> None:
        """Hand the leader's outcome to the followers (None: they fetch for themselves)."""
        future = self._inflight.pop(key, None)
        if future is not None and not future.done():
            future.set_result(outcome)


@functools.lru_cache(maxsize=MEMO_ENTRIES)
def _target_key(upstream: str, method: str, target: str, vary: tuple[tuple[str, str], ...], partition: str) -> str:
    """`cache_key` of a request target, remembered: a hit would otherwise parse its query and hash
    it again each time (5% of a hit). The query is split as mitmproxy's `Request.query` does."""
    path, _, query = target.partition("?")
    return cache_key(upstream, method, path, http_url.decode(query.partition("#")[0]), dict(vary), partition)


def _collapsed(entry: Entry) -> Fetch:
    """A fresh stored entry as the outcome of a fetch another request made."""
    return Fetch(Fetched(entry.status, entry.headers, entry.body), True, entry.ttl - entry.age(), collapsed=True)


def answer_fields(stored: Iterable[tuple[bytes, bytes]], settings: dict[str, str]) -> list[tuple[bytes, bytes]]:
    """A stored answer's header fields for one client: the upstream's Access-Control-Allow-Origin
    dropped, each of `settings` set as `Headers[name] = value` sets it (the first field of that
    name takes the value, the others go, a new name goes last), a Vary setting joined to the
    stored Vary values (folded, as `Headers.get` folds them). One pass over the fields instead of
    one per setting: this runs on every hit."""
    wanted = {name.lower().encode() for name in settings}
    fields: list[tuple[bytes, bytes]] = []
    stored_vary: list[bytes] = []
    placed: dict[bytes, int] = {}  # lower-case name -> index in `fields` of a set field
    for name, value in stored:
        lower = name.lower()
        if lower == b"access-control-allow-origin":
            continue
        if lower == b"vary":
            stored_vary.append(value)
        if lower in wanted:
            if lower not in placed:
                placed[lower] = len(fields)
                fields.append((name, b""))
            continue
        fields.append((name, value))
    for name, value in settings.items():
        lower = name.lower().encode()
        raw = value.encode("utf-8", "surrogateescape")
        if lower == b"vary" and (folded := b", ".join(stored_vary)):
            raw = folded + b", " + raw if raw else folded
        if lower in placed:
            fields[placed[lower]] = (fields[placed[lower]][0], raw)
        else:
            fields.append((name.encode(), raw))
    return fields


def _asks_no_cache(request: http.Request) -> bool:
    """The client asked for a fresh answer (RFC 9111 request `no-cache`; Pragma for HTTP/1.0)."""
    value = header(request.headers, b"cache-control") or header(request.headers, b"pragma")
    return value is not None and "no-cache" in value.lower()


def bypass(flow: http.HTTPFlow, info, miss: Miss) -> None:
    """A request a cache forwards untouched: its answer says why (set in `response`)."""
    flow.metadata[_STATUS] = miss
    info.cache_reason = miss.reason


def _not_cached(flow: http.HTTPFlow) -> Miss:
    """Why a request that reached no cache rule went upstream."""
    method = flow.request.method
    if method == "OPTIONS":
        return Miss("bypass", "preflight")
    if method not in ("GET", "HEAD"):
        return Miss("bypass", "write")
    return Miss("bypass", "no-rule")


def _storable_ttl(rule: CacheRule, fetched: Fetched) -> float | None:
    """How long an upstream answer may be kept (None: not at all)."""
    if fetched.status == 404:
        return rule.negative_ttl or None
    if fetched.status != 200:
        return None
    cache_control = (fetched.header(b"cache-control") or "").lower()
    if not rule.override_no_store and ("no-store" in cache_control or "private" in cache_control):
        return None
    return rule.ttl
