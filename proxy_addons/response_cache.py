"""The response cache: rules.yaml-declared, two layers, coalesced, stale-tolerant, per-user.

For a GET on a route with a `cache` rule (anchors: nginx proxy_cache_lock / use_stale, Varnish
grace, RFC 5861, RFC 9111, RFC 9211):

- fresh entry: answered from memory (or disk, then promoted), `Cache-Status: …; hit`;
- stale inside `stale_while_revalidate`: answered at once, one background refresh per key;
- miss: the first request fetches upstream itself (with a deadline), concurrent identical
  misses wait for that one answer (`fwd=miss; collapsed`);
- upstream down, timing out, 5xx or 429: stale inside `stale_if_error`, else a quick 502/504.

Keys never contain credentials; `user`-scoped routes are partitioned by the real account, so two
users never share an entry and requests whose user is unknown bypass the cache. Writes on routes
with `invalidates` drop the named routes' entries of the same partition. Every answer carries
`Cache-Status` and `Age`, and CORS headers for the requesting Origin.

The cache fetches misses itself (aiohttp, bodies kept encoded as received) rather than letting
mitmproxy forward them: that gives a deadline, and one code path for misses and refreshes. The
entry is stored in the `response` hook, after the credential addons rewrote the answer, so what is
stored is what a client may see.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import aiohttp
from mitmproxy import ctx, http

from projectionist.cache_store import DiskLayer, Entry, MemoryLRU, cache_key
from projectionist.cache_mirror import CacheMirror
from projectionist.limits import RateLimited
from projectionist.metrics import CACHE_EVICTIONS, add_cache_source, remove_cache_source
from projectionist.rules import CacheRule

from . import flowinfo
from .local_responses import cors_headers
from .rules_watch import RulesWatcher
from .upstream_fetch import Fetched, fetch, upstream_session

log = logging.getLogger(__name__)

BUCKET = "api"
_CORS_PREFIX = "access-control-"
_LEADER = "projectionist.cache.leader"
_INVALIDATES = "projectionist.cache.invalidates"
_TOKEN_BEARING = ("plex-tv",)  # answers rewritten by the credential addons: refreshed only in-flow


class UpstreamFailed(Exception):
    """The upstream answered 5xx/429 where a stale entry can stand in."""


class ResponseCache:
    def __init__(self, watcher: RulesWatcher) -> None:
        self.watcher = watcher
        self.memory: MemoryLRU | None = None
        self.disk: DiskLayer | None = None
        self.mirror: CacheMirror | None = None
        self.session: aiohttp.ClientSession | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._inflight: dict[str, asyncio.Future] = {}
        self._refreshing: set[str] = set()
        self._tasks: set[asyncio.Task] = set()
        # key -> (route, partition): what flush and invalidation select on.
        self.index: dict[str, tuple[str, str]] = {}
        # The rate limiter (proxy_addons/rate_limit.py) sets itself here; every upstream fetch of
        # the cache then goes through its fetch(): a slot first, retries of 429/503 inside it.
        self.upstream_gate = None

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
        self._spawn(self._load_index())
        self._spawn(self._apply_flush_requests_forever())
        add_cache_source(self._memory_size)
        add_cache_source(self._disk_size)

    def _memory_size(self) -> tuple[str, str, int, int]:
        return BUCKET, "memory", len(self.memory), self.memory.bytes

    def _disk_size(self) -> tuple[str, str, int, int]:  # scraped from a thread: diskcache's own connection
        return BUCKET, "disk", len(self.index), self.disk.volume()

    async def done(self) -> None:
        remove_cache_source(self._memory_size)
        remove_cache_source(self._disk_size)
        for task in list(self._tasks):
            task.cancel()
        if self.session is not None:
            await self.session.close()
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
        if info is None or self.memory is None or not ctx.options.projectionist_cache or info.match.route is None:
            return
        rule = info.match.route.rule.cache
        if rule is None or info.scope(rule.scope) != "shared" or flow.request.method not in ("GET", "HEAD"):
            return
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
        partition = self._partition(rule.cache, info)
        if partition is None:  # user-scoped data of an unknown user: never shared, never stored
            info.cache = "bypass"
            return
        key = self._key(flow, info, rule.cache, partition)
        entry = await self._lookup(key)
        now = time.time()
        if entry is not None and entry.fresh(now):
            return self._serve(flow, info, key, entry, "hit", now)
        cache = rule.cache
        revalidates_in_background = (cache.stale_while_revalidate > 0
                                     and info.match.upstream.kind not in _TOKEN_BEARING)
        if entry is not None and revalidates_in_background and entry.usable_stale(cache.stale_while_revalidate, now):
            self._serve(flow, info, key, entry, "stale", now, detail="fwd=stale")
            if key not in self._refreshing:
                self._refreshing.add(key)
                self._spawn(self._refresh(key, flow.copy()))
            return
        if (leader := self._inflight.get(key)) is not None:
            try:
                outcome = await asyncio.wait_for(asyncio.shield(leader), self._timeout())
            except TimeoutError as exc:
                outcome = exc
            if isinstance(outcome, Fetched):
                flow.response = self._response(flow, info, outcome, "fwd=miss; collapsed")
                info.cache = "miss"
                return
            if isinstance(outcome, Exception):  # the leader's upstream failed: so would ours
                return self._answer_failure(flow, info, key, entry, outcome)
        await self._fetch_as_leader(flow, info, key, entry)

    async def _fetch_as_leader(self, flow: http.HTTPFlow, info, key: str, stale: Entry | None) -> None:
        future = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        flow.metadata[_LEADER] = key
        rule = info.match.route.rule.cache
        stale_ok = stale is not None and stale.usable_stale(rule.stale_if_error)
        try:
            fetched = await self._fetch(flow, stale_ok=stale_ok)
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
            return self._answer_failure(flow, info, key, stale, exc)
        if (fetched.status >= 500 or fetched.status == 429) and stale is not None and stale.usable_stale(rule.stale_if_error):
            self._finish(key, UpstreamFailed(fetched.status))
            flow.metadata.pop(_LEADER, None)
            return self._serve(flow, info, key, stale, "stale",
                               detail=f"fwd=stale; fwd-status={fetched.status}; detail=stale-if-error")
        flow.response = fetched.to_response()
        info.cache = "miss"

    def _answer_failure(self, flow: http.HTTPFlow, info, key: str, stale: Entry | None, exc: Exception) -> None:
        """No upstream answer: stale inside stale_if_error, else a quick clean 504 or 502."""
        if stale is not None and stale.usable_stale(info.match.route.rule.cache.stale_if_error):
            return self._serve(flow, info, key, stale, "stale", detail="fwd=stale; detail=stale-if-error")
        gateway = 504 if isinstance(exc, TimeoutError) else 502
        flow.response = http.Response.make(
            gateway, f"{'Gateway Timeout' if gateway == 504 else 'Bad Gateway'}: the upstream did not answer\n",
            {"Content-Type": "text/plain; charset=utf-8", "Cache-Status": f"Projectionist; fwd=miss; fwd-status={gateway}",
             **cors_headers(flow.request, info.match.upstream.kind)})
        info.cache = "miss"

    async def _fetch(self, flow: http.HTTPFlow, *, stale_ok: bool = False, background: bool = False) -> Fetched:
        if self.upstream_gate is not None:
            return await self.upstream_gate.fetch(flow, self._fetch_once, stale_ok=stale_ok, background=background)
        return await self._fetch_once(flow)

    async def _fetch_once(self, flow: http.HTTPFlow) -> Fetched:
        return await fetch(self.session, flow.request, self._timeout())

    # --- the response path --------------------------------------------------------------------

    async def response(self, flow: http.HTTPFlow) -> None:
        info = flowinfo.get(flow)
        if info is None or self.memory is None:
            return
        if (key := flow.metadata.pop(_LEADER, None)) is not None:
            fetched = Fetched(flow.response.status_code, list(flow.response.headers.fields), flow.response.raw_content or b"")
            self._finish(key, fetched)
            stored = self._store(key, flow, info, fetched)
            flow.response.headers["Cache-Status"] = f"Projectionist; fwd=miss{'; stored' if stored else ''}"
        if (invalidates := flow.metadata.pop(_INVALIDATES, None)) and flow.response.status_code < 400:
            await self.invalidate(*invalidates)

    def error(self, flow: http.HTTPFlow) -> None:
        # The client went away (or the flow was killed) before the answer: release the followers.
        if (key := flow.metadata.pop(_LEADER, None)) is not None:
            self._finish(key, None)

    def _store(self, key: str, flow: http.HTTPFlow, info, fetched: Fetched, now: float | None = None) -> bool:
        rule: CacheRule = info.match.route.rule.cache
        ttl = _storable_ttl(rule, fetched)
        if ttl is None:
            return False
        entry = Entry(
            status=fetched.status,
            # CORS is answered per request (see _response), never replayed from whoever stored it.
            headers=[(k, v) for k, v in fetched.headers
                     if not k.lower().startswith(b"access-control-allow-origin") and k.lower() not in (b"age", b"cache-status")],
            body=fetched.body, stored_at=now or time.time(), ttl=ttl,
            stale_while_revalidate=rule.stale_while_revalidate, stale_if_error=rule.stale_if_error,
            route=info.match.route_name, partition=self._partition(rule, info) or "",
            memory_only=rule.memory_only,
        )
        self._put(key, entry)
        return True

    def _put(self, key: str, entry: Entry) -> None:
        # Disk holds every other entry: only a memory-only entry is lost when memory evicts it.
        lost = [old_key for old_key, old in self.memory.put(key, entry) if old.memory_only]
        if lost:
            self._forget(lost, evicted=True)
        self.index[key] = (entry.route, entry.partition)
        if not entry.memory_only:
            self._executor.submit(self.disk.put, key, entry)
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
        headers = http.Headers([(k, v) for k, v in fetched.headers if k.lower() != b"access-control-allow-origin"])
        for name, value in cors_headers(flow.request, info.match.upstream.kind).items():
            if name == "Vary":
                value = ", ".join(filter(None, [headers.get("Vary"), value]))
            headers[name] = value
        if age is not None:
            headers["Age"] = str(age)
        headers["Cache-Status"] = f"Projectionist; {status_detail}"
        response = http.Response(b"HTTP/1.1", fetched.status, b"", headers, None, None, time.time(), time.time())
        response.raw_content = b"" if flow.request.method == "HEAD" else fetched.body
        return response

    # --- background work ----------------------------------------------------------------------

    async def _refresh(self, key: str, flow: http.HTTPFlow) -> None:
        """Stale-while-revalidate: fetch again and store, while clients get the stale entry."""
        info = flowinfo.get(flow)
        try:
            fetched = await self._fetch(flow, background=True)
            if fetched.status < 500 and fetched.status != 429:
                self._store(key, flow, info, fetched)
        except (TimeoutError, aiohttp.ClientError, OSError, RateLimited) as exc:
            log.info("background refresh of %s failed: %s", info.route, type(exc).__name__)
        finally:
            self._refreshing.discard(key)

    async def invalidate(self, routes: Iterable[str], partition: str) -> int:
        routes = set(routes)
        keys = [k for k, (route, part) in self.index.items() if route in routes and part == partition]
        await self._forget_async(keys)
        return len(keys)

    async def flush(self, target: str, value: str | None) -> int:
        """Drop entries: all, one bucket (this cache is the "api" bucket), one route, a key prefix, or
        the expired ones (the control plane's cache-cleanup job)."""
        if target == "expired":
            return await self._drop_expired()
        if target == "all" or (target == "bucket" and value == BUCKET):
            keys = list(self.index) + self.memory.keys()
        elif target == "route":
            keys = [k for k, (route, _) in self.index.items() if route == value]
        elif target == "prefix":
            keys = [k for k in set(self.index) | set(self.memory.keys()) if k.startswith(value or "\0")]
        else:
            return 0
        await self._forget_async(keys)
        return len(set(keys))

    async def _drop_expired(self) -> int:
        """Entries past their last usable moment: from memory, and from disk (diskcache knows their expiry)."""
        now = time.time()
        stale = [k for k in self.memory.keys() if (e := self.memory.peek(k)) is not None and e.expired_for_good(now)]
        for key in stale:
            self.memory.pop(key)
        on_disk = await asyncio.get_running_loop().run_in_executor(self._executor, self.disk.expire, list(self.index))
        gone = set(stale) | on_disk
        self._forget(list(gone))
        return len(gone)

    async def _forget_async(self, keys: list[str]) -> None:
        self._forget(keys)
        await asyncio.get_running_loop().run_in_executor(self._executor, self.disk.delete, keys)

    def _forget(self, keys: list[str], evicted: bool = False) -> None:
        if evicted:
            CACHE_EVICTIONS.labels(BUCKET).inc(len(keys))
        for key in keys:
            self.memory.pop(key)
            self.index.pop(key, None)
        self.mirror.deleted(keys, evicted=evicted)

    async def _lookup(self, key: str) -> Entry | None:
        entry = self.memory.get(key)
        if entry is None:  # the disk also holds what an earlier run stored
            entry = await asyncio.get_running_loop().run_in_executor(self._executor, self.disk.get, key)
            if entry is not None:
                self.memory.put(key, entry)
                self.index.setdefault(key, (entry.route, entry.partition))
        if entry is not None and entry.expired_for_good():
            self._forget([key])
            return None
        return entry

    async def _load_index(self) -> None:
        """Entries survive restarts on disk; the index of what they are comes from the mirror."""
        for key, route, partition in await asyncio.get_running_loop().run_in_executor(None, self.mirror.index_rows, BUCKET):
            self.index.setdefault(key, (route, partition))

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

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

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
        vary = {name: request.headers.get(name, "") for name in rule.vary}
        return cache_key(info.upstream, request.method if request.method != "HEAD" else "GET",
                         request.path.split("?", 1)[0], request.query.items(multi=True), vary, partition)

    def _finish(self, key: str, outcome: Fetched | Exception | None) -> None:
        """Hand the leader's outcome to the followers (None: they fetch for themselves)."""
        future = self._inflight.pop(key, None)
        if future is not None and not future.done():
            future.set_result(outcome)


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
