"""The image cache: rules.yaml `image` routes answered from disk, re-encoded, capped, and checked.

For a GET on a route with an `image` rule (TMDB posters, Plex thumbs and photo transcodes):

- the answer comes from the image cache (memory LRU over diskcache, `images.max_bytes`, least
  recently used evicted), keyed on the upstream, path, query without credentials, the variant
  (target format, width cap) and the scope partition: `shared` for TMDB, `u<user>` for Plex;
- fresh entry: `Cache-Status: …; hit`; `If-None-Match` matching the entry's ETag: 304; stale
  inside `stale_while_revalidate`: answered at once, one background refresh per key;
  `immutable` routes (TMDB paths never change) are kept a year and answered with
  `Cache-Control: public, max-age=31536000, immutable`;
- miss: fetched by the cache itself (aiohttp, deadline, size cap), concurrent misses of a key
  share one fetch and one transcode (`fwd=uri-miss; collapsed`); the body is re-encoded to WebP/AVIF
  when the client's Accept names it (`Vary: Accept`) and that is smaller, and scaled down to the
  route's `max_width`. Pillow runs in worker processes (projectionist/images.py), never here.

Misses wait for a slot under the upstream's rate limits (proxy_addons/rate_limit.py `admit`; the
runner makes the limiter this cache's `upstream_gate`; hits never count); a refused slot is the
limiter's 429.

Safety: only hosts named in rules.yaml are fetched (the flow was attributed to an upstream); a
route's `source_param` (Plex `/photo/:/transcode?url=`) may only name a server path, a declared
Plex server or a rules.yaml host on a public address (else 403, nothing is fetched); a source over
`images.source_max_bytes` or `source_max_pixels` is refused with 422; a body that is not an image
passes through unmodified when the upstream did not call it one, else 502; a dead worker is
replaced and the request answered 502 at worst.

Every entry is mirrored in `cache_entries` (bucket "images"), evictions in `cache_evictions`,
bytes saved by re-encoding in `cache_savings_hourly`; a background job removes expired entries
and logs what it freed. Control-plane flushes (all, bucket "images", route, key prefix) apply here
too: the response cache's applier calls this cache before it marks a request applied.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

import aiohttp
from mitmproxy import ctx, http

from projectionist.cache_mirror import CacheMirror, add_flush_handler, remove_flush_handler
from projectionist.cache_store import CREDENTIAL_PARAMS, MemoryLRU, cache_key
from projectionist.images import (
    NOT_IMAGE,
    TOO_LARGE,
    ImageEntry,
    ImagePool,
    ImageStore,
    Job,
    WorkerCrashed,
    capabilities,
    digest,
    check_source_url,
    etag_matches,
    negotiate,
    transcode,
)
from projectionist.limits import RateLimited
from projectionist.metrics import CACHE_EVICTIONS, IMAGE_ENCODES, add_cache_source, remove_cache_source
from projectionist.peer_bodies import PeerBodies
from projectionist.rules import ImageRule, ResolvedTimeouts, Rules
from projectionist.shared_tier import SharedTier, redis_url
from projectionist.store import database_id

from . import flowinfo
from .local_responses import cors_headers
from .response_cache import Miss, bypass
from .router import Router
from .rules_watch import RulesWatcher
from .upstream_fetch import HOP_BY_HOP, upstream_session

log = logging.getLogger(__name__)

SHARED_PREFIX = "projectionist:images:"  # the shared tier's names for image variants (Redis)
BUCKET = "images"
YEAR = 31_536_000
# The source is fetched whole, as an image, for every client: no client's conditions, ranges or
# cookies go with it, and it comes back decompressed.
_NOT_FORWARDED = HOP_BY_HOP | {"proxy-authorization", "accept", "accept-encoding", "range", "if-range", "if-none-match",
                               "if-modified-since", "if-match", "if-unmodified-since", "cookie"}
_NOT_PASSED_BACK = HOP_BY_HOP | {"content-encoding", "set-cookie"}
_UPSTREAM_ACCEPT = "image/jpeg,image/png;q=0.9,image/*;q=0.8,*/*;q=0.5"


@dataclass(frozen=True)
class Refusal:
    """An answer the cache makes instead of an image (nothing stored)."""

    status: int
    message: str
    detail: str


@dataclass(frozen=True)
class Limited:
    """The rate limiter had no slot for the upstream fetch: its 429 is the answer."""

    response: http.Response


@dataclass(frozen=True)
class Passthrough:
    """The upstream's answer as it came (an error status, or a body that is no image)."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes


_NOT_MODIFIED = object()


@dataclass(frozen=True)
class _Source:
    url: str
    headers: list[tuple[str, str]]
    route: str
    rule: ImageRule
    target: str | None
    partition: str
    timeouts: ResolvedTimeouts  # the route's (else its upstream's) connect, first-byte and idle


def default_pool_size() -> int:
    """One Pillow process per core but one, split between the proxy's workers (at least 1 each)."""
    workers = os.environ.get("PROJECTIONIST_PROXY_WORKERS", "")  # set by launcher/workers.py
    return max(1, ((os.cpu_count() or 2) - 1) // (int(workers) if workers.isdigit() and int(workers) else 1))


class ImageCache:
    def __init__(self, watcher: RulesWatcher, router: Router) -> None:
        self.watcher = watcher
        self.router = router
        self.memory: MemoryLRU | None = None
        self.store: ImageStore | None = None
        self.pool: ImagePool | None = None
        self.mirror: CacheMirror | None = None
        self.session: aiohttp.ClientSession | None = None
        self.supported: set[str] = set()
        self.db_path: Path | None = None
        self.index: dict[str, tuple[str, str]] = {}  # key -> (route, partition)
        self.shared: SharedTier | None = None  # Redis, when configured: variants shared by every process
        self.bodies: PeerBodies | None = None  # set by the runner: variants too big for the shared tier
        self._disk: ThreadPoolExecutor | None = None
        self._ready: asyncio.Event | None = None
        self._inflight: dict[str, asyncio.Task] = {}
        self._tasks: set[asyncio.Task] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        # The rate limiter (proxy_addons/rate_limit.py), set by it: misses wait for its slot.
        self.upstream_gate = None

    def load(self, loader) -> None:
        loader.add_option("projectionist_images", bool, True,
                          "Serve image routes from the image cache, re-encoded and capped (rules.yaml images:).")

    # --- lifecycle --------------------------------------------------------------------------------

    def running(self) -> None:
        if self.memory is not None or self.watcher.rules is None or not ctx.options.projectionist_home:
            return
        settings = self.watcher.rules.model.images
        home = Path(ctx.options.projectionist_home).expanduser()
        directory = Path(settings.directory).expanduser()
        self.memory = MemoryLRU(settings.memory_max_bytes)
        self._disk = ThreadPoolExecutor(max_workers=2, thread_name_prefix="image-disk")
        self.pool = ImagePool(settings.workers or default_pool_size(), settings.worker_timeout)
        self.db_path = Path(ctx.options.projectionist_db).expanduser()
        self.mirror = CacheMirror(self.db_path).start()
        self.session = upstream_session(auto_decompress=True)
        self._ready = asyncio.Event()
        self._spawn(self._start(directory if directory.is_absolute() else home / directory, settings.max_bytes))
        self._loop = asyncio.get_running_loop()
        add_flush_handler(self.db_path, self._flush_from_thread)  # control-plane flushes
        if url := redis_url(self.watcher.rules.model.proxy.redis_url):  # read at start, as the response cache
            self.shared = SharedTier(url, self.watcher.rules.model.cache.shared_max_body_bytes, database_id(self.db_path),
                                     prefix=SHARED_PREFIX, bodies=self.bodies)
            self.shared.serve_bodies(self._held_body)
        self.watcher.subscribe(self._rules_changed)

    async def _start(self, directory: Path, max_bytes: int) -> None:
        loop = asyncio.get_running_loop()
        try:
            store = await loop.run_in_executor(self._disk, ImageStore, directory, max_bytes)
            for key, route, partition in store.index():
                self.index[key] = (route, partition)
            # Mirror rows of entries that are gone (an old cache directory was removed) are dropped.
            mirrored = await loop.run_in_executor(None, self.mirror.index_rows, BUCKET)
            self.mirror.deleted([key for key, _, _ in mirrored if key not in self.index])
            try:
                await self.pool.start()
                self.supported = {fmt for fmt, ok in (await self.pool.run(capabilities)).items() if ok}
            except Exception:
                log.exception("image workers did not start: images are served without re-encoding")
            self.store = store
            add_cache_source(self._disk_size)
            log.info("image cache: %d entries (%d bytes) in %s; re-encodes to %s", len(self.index), store.bytes,
                     directory, ", ".join(sorted(self.supported)) or "nothing")
        except Exception:
            log.exception("the image cache could not open %s: images pass through uncached", directory)
        finally:
            self._ready.set()

    def _disk_size(self) -> tuple[str, str, int, int]:
        return BUCKET, "disk", len(self.index), self.store.bytes

    async def done(self) -> None:
        remove_cache_source(self._disk_size)
        if self.db_path is not None:
            remove_flush_handler(self.db_path, self._flush_from_thread)
        for task in list(self._tasks):
            task.cancel()
        if self.session is not None:
            await self.session.close()
        if self.shared is not None:
            await self.shared.close()
            self.shared = None
        if self.mirror is not None:
            self.mirror.close()
        if self.pool is not None:
            self.pool.shutdown()
        if self._disk is not None:
            if self.store is not None:
                self._disk.submit(self.store.close).result()
            self._disk.shutdown(wait=True)
        self.memory = None

    def _rules_changed(self, rules: Rules) -> None:
        if self.memory is None or self.store is None:
            return
        settings = rules.model.images
        self.memory.max_bytes = settings.memory_max_bytes
        if settings.max_bytes != self.store.max_bytes:
            self._spawn(self._set_max_bytes(settings.max_bytes))

    async def _set_max_bytes(self, max_bytes: int) -> None:
        evicted = await asyncio.get_running_loop().run_in_executor(self._disk, self.store.set_max_bytes, max_bytes)
        self._forget(evicted, evicted=True)

    # --- the request path -------------------------------------------------------------------------

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        """Fresh shared images (TMDB) from memory as soon as the headers are in."""
        info = flowinfo.get(flow)
        if (info is None or self.store is None or info.match.route is None
                or not ctx.options.projectionist_images):
            return
        rule = info.match.route.rule.image
        if (rule is None or info.scope(rule.scope) != "shared" or rule.source_param
                or flow.request.method not in ("GET", "HEAD")):
            return
        key = self._key(flow, info, rule, self._target(flow, rule), "shared")
        entry = self.memory.get(key)
        now = time.time()
        if entry is not None and entry.fresh(now):
            self.store.touch(key)
            self._serve(flow, info, rule, key, entry, "hit", now)

    async def request(self, flow: http.HTTPFlow) -> None:
        info = flowinfo.get(flow)
        if info is None or flow.response is not None or self.memory is None:
            return
        if (refused := self._refused_source(flow, info)) is not None:
            flow.response = self._refusal(flow, info, Refusal(403, f"Forbidden: {refused}", "refused"))
            return
        rule = info.match.route.rule.image if info.match.route else None
        if rule is None or flow.request.method not in ("GET", "HEAD"):
            return
        if not ctx.options.projectionist_images or not await self._wait_ready() or self.store is None:
            return
        partition = "shared" if info.scope(rule.scope) == "shared" else (
            f"u{info.user_id}" if info.user_id is not None else None)
        if partition is None:  # a user's image, but whose? never stored, never shared
            info.cache = "bypass"
            bypass(flow, info, Miss("bypass", "unknown-user"))
            return
        target = self._target(flow, rule)
        key = self._key(flow, info, rule, target, partition)
        entry = await self._lookup(key, info.route, partition)
        now = time.time()
        if entry is not None and entry.fresh(now):
            return self._serve(flow, info, rule, key, entry, "hit", now)
        source = self._source(flow, info, rule, target, partition)
        if entry is not None and entry.usable_stale(rule.stale_while_revalidate, now):
            self._serve(flow, info, rule, key, entry, "stale", now)
            self._production(key, source, entry, flow.copy(), background=True)  # one refresh per key
            return
        miss = Miss("uri-miss") if entry is None else Miss("stale", "expired")  # RFC 9211, as for documents
        info.cache_reason = miss.reason
        task, leader = self._production(key, source, entry, flow)
        outcome = await self._outcome(task)
        if isinstance(outcome, Limited) and not leader:  # the leader's slot was refused: ask for ours
            task, leader = self._production(key, source, entry, flow)
            outcome = await self._outcome(task)
        if isinstance(outcome, Limited):
            flow.response = outcome.response if leader else outcome.response.copy()
            info.cache = "miss"
        elif isinstance(outcome, ImageEntry):
            detail = "encoder-busy" if outcome.provisional else miss.detail
            self._serve(flow, info, rule, key, outcome, "miss", time.time(),
                        f"fwd={miss.fwd}; {'stored' if leader else 'collapsed'}" + (f"; detail={detail}" if detail else ""))
        elif isinstance(outcome, Passthrough):
            flow.response = self._passthrough(flow, info, outcome, miss)
        else:
            flow.response = self._refusal(flow, info, outcome)

    async def _outcome(self, task: asyncio.Task):
        try:
            return await asyncio.wait_for(asyncio.shield(task), self._deadline())
        except TimeoutError:
            return Refusal(504, "Gateway Timeout: the image took too long", "fwd-status=504")

    async def _wait_ready(self) -> bool:
        if self._ready.is_set():
            return True
        try:
            await asyncio.wait_for(self._ready.wait(), 15)
            return True
        except TimeoutError:
            return False

    async def _lookup(self, key: str, route: str, partition: str) -> ImageEntry | None:
        entry = self.memory.get(key)
        if entry is not None:
            self.store.touch(key)
            return entry
        entry = await asyncio.get_running_loop().run_in_executor(self._disk, self.store.get, key)
        if entry is not None:
            self.memory.put(key, entry)
        elif self.shared is not None:  # another process's variant: kept here too
            entry = await self.shared.get(key, route, partition, "", ImageEntry)
            if entry is not None:
                self._store(key, entry, share=False)
        return entry

    async def _held_body(self, key: str) -> bytes | None:
        """The body of a variant this process holds, for another machine its index record sent here."""
        entry = self.memory.peek(key) if self.memory is not None else None
        if entry is None and self.store is not None:
            entry = await asyncio.get_running_loop().run_in_executor(self._disk, self.store.get, key)
        return entry.body if entry is not None else None

    def _target(self, flow: http.HTTPFlow, rule: ImageRule) -> str | None:
        if not rule.optimize:
            return None
        formats = [f for f in self.watcher.rules.model.images.formats if f in self.supported]
        return negotiate(flow.request.headers.get("Accept"), formats)

    @staticmethod
    def _key(flow: http.HTTPFlow, info, rule: ImageRule, target: str | None, partition: str) -> str:
        request = flow.request
        query = request.query.items(multi=True)
        if rule.source_param:
            param = rule.source_param.lower()
            query = [(k, _without_credentials(v) if k.lower() == param else v) for k, v in query]
        variant = f"{target or 'source'}/{rule.max_width or 0}"
        return cache_key(info.cache_upstream, "GET", request.path.split("?", 1)[0], query, {"image-variant": variant},
                         partition)

    def _refused_source(self, flow: http.HTTPFlow, info) -> str | None:
        """Why the image URL a route's `source_param` names must not be fetched (None: it may).

        The route is looked up again on the decoded path too, so `/photo/%3A/transcode` or
        `/photo/:/transcode/` (which a server may treat as the same endpoint) is checked as well.
        """
        rules = self.watcher.rules
        route = info.match.route
        rule = route.rule.image if route else None
        path = flow.request.path.split("?", 1)[0]
        if (rule is None or not rule.source_param) and ("%" in path or "//" in path or path.endswith("/")):
            normalized = "/" + "/".join(part for part in unquote(path).split("/") if part)
            route = rules.match(info.upstream, flow.request.method, normalized, flow.request.query).route
            rule = route.rule.image if route else None
        if rule is None or not rule.source_param:
            return None
        values = [v for k, v in flow.request.query.items(multi=True) if k.lower() == rule.source_param.lower()]
        if not values:
            return None
        plex_servers = set()
        for name, upstream in rules.upstreams.items():
            if upstream.kind == "plex-server":
                for url in (upstream.base_url, self.router.overrides.get(name)):
                    if url:
                        parts = urlsplit(url)
                        port = parts.port or (443 if parts.scheme == "https" else 80)
                        plex_servers.add((parts.hostname.lower(), port))
        for value in values:
            if reason := check_source_url(value, rules.upstream_for_host, plex_servers):
                return reason
        return None

    # --- producing an entry: fetch, check, transcode, store ---------------------------------------

    def _source(self, flow: http.HTTPFlow, info, rule: ImageRule, target: str | None, partition: str) -> _Source:
        request = flow.request
        headers = [(k, v) for k, v in request.headers.items(multi=True) if k.lower() not in _NOT_FORWARDED]
        return _Source(request.url, headers, info.route, rule, target, partition,
                       info.match.timeouts(self.watcher.rules.model.proxy))

    def _production(self, key: str, source: _Source, previous: ImageEntry | None, flow: http.HTTPFlow,
                    background: bool = False) -> tuple[asyncio.Task, bool]:
        """The task producing `key` (one per key at a time); True if this call started it."""
        task = self._inflight.get(key)
        if task is not None:
            return task, False
        task = asyncio.get_running_loop().create_task(self._produce(key, source, previous, flow, background))
        self._inflight[key] = task
        self._tasks.add(task)
        task.add_done_callback(lambda t: (self._tasks.discard(t), self._inflight.pop(key, None)))
        return task, True

    async def _produce(self, key: str, source: _Source, previous: ImageEntry | None, flow: http.HTTPFlow,
                       background: bool):
        """One variant per key cluster-wide with a shared tier: the process holding the key's lock
        fetches and encodes, the others wait for the variant it shares (and take over when its
        lock lapses without one). Background refreshes are this process's own."""
        if self.shared is None or background:
            return await self._produce_here(key, source, previous, flow, background)
        led = await self.shared.lead(key)
        if led is False:
            async def shared_variant() -> ImageEntry | None:
                entry = await self.shared.get(key, source.route, source.partition, "", ImageEntry)
                return entry if entry is not None and entry.fresh() else None
            result = await self.shared.follow(key, time.monotonic() + self._deadline(),
                                              lambda: self._produce_leading(key, source, previous, flow),
                                              result=shared_variant)
            if isinstance(result, ImageEntry) and result is not self.memory.peek(key):
                self._store(key, result, share=False)
            if result is not None:
                return result
            led = None
        if led:
            return await self._produce_leading(key, source, previous, flow)
        return await self._produce_here(key, source, previous, flow, background)

    async def _produce_leading(self, key: str, source: _Source, previous: ImageEntry | None, flow: http.HTTPFlow):
        async with self.shared.leading(key):
            result = await self._produce_here(key, source, previous, flow, False, share=False)
        if isinstance(result, ImageEntry) and not result.provisional:
            await self.shared.put(key, result)  # before the lock goes: followers find it
        await self.shared.release(key)
        return result

    async def _produce_here(self, key: str, source: _Source, previous: ImageEntry | None, flow: http.HTTPFlow,
                            background: bool, share: bool = True):
        settings = self.watcher.rules.model.images
        gate = self.upstream_gate
        try:
            if gate is not None:  # a slot under the upstream's rate limits (a refresh does not wait)
                await gate.admit(flow, background=background)
            fetched = await self._fetch(source, settings.source_max_bytes,
                                        previous.source_etag if previous is not None else None)
            if gate is not None and isinstance(fetched, Passthrough):  # 429/503 + Retry-After: pause
                await gate.observe(flow, fetched.status, _header(fetched.headers, "retry-after"))
            if fetched is _NOT_MODIFIED:
                entry = dataclasses.replace(previous, stored_at=time.time(), hits=0)
            elif isinstance(fetched, (Refusal, Passthrough)):
                return fetched
            else:
                status, headers, body = fetched
                content_type = _header(headers, "content-type") or ""
                if not content_type.lower().startswith("image/"):
                    return Passthrough(status, headers, body)  # not ours to judge: as it came
                if not background and (source.target or source.rule.max_width) and self.pool.saturated():
                    # Every encoder is busy: a person gets the original now (its own type, cached)
                    # rather than a place in the CPU queue; the encoded variant replaces it later.
                    entry = self._entry(source, headers, body, body, content_type, digest(body), provisional=True)
                    self._store(key, entry)
                    self._spawn(self._encode_later(key, source, headers, body, content_type))
                    return entry
                result = await self._encode(source, body)
                if isinstance(result, Refusal):
                    return result
                entry = self._entry(source, headers, body, result.body if result.body is not None else body,
                                    result.content_type or content_type, result.digest, result.width, result.height)
            self._store(key, entry, share=share)
            return entry
        except RateLimited as refused:
            return Limited(refused.response)
        except WorkerCrashed:
            return Refusal(502, "Bad Gateway: the image worker crashed on this image", "worker-crashed")
        except TimeoutError:
            return Refusal(504, "Gateway Timeout: the upstream or the image worker did not answer in time",
                           "fwd-status=504")
        except (aiohttp.ClientError, OSError) as exc:
            log.info("image route %s: upstream failed: %s", source.route, type(exc).__name__)
            return Refusal(502, "Bad Gateway: the upstream did not answer", "fwd-status=502")

    async def _encode(self, source: _Source, body: bytes):
        settings = self.watcher.rules.model.images
        result = await self.pool.run(transcode, Job(
            body, source.target, source.rule.max_width, settings.source_max_pixels,
            settings.webp_quality, settings.avif_quality, settings.jpeg_quality))
        IMAGE_ENCODES.labels(result.outcome.lower()).inc()
        if result.outcome == TOO_LARGE:
            return Refusal(422, f"Unprocessable: the source image is too large ({result.detail})", "source-too-large")
        if result.outcome == NOT_IMAGE:
            log.info("image route %s: upstream body is not a decodable image (%s)", source.route, result.detail)
            return Refusal(502, "Bad Gateway: the upstream's image could not be decoded", "not-an-image")
        return result

    @staticmethod
    def _entry(source: _Source, headers, source_body: bytes, body: bytes, content_type: str, body_digest: str,
               width: int = 0, height: int = 0, provisional: bool = False) -> ImageEntry:
        rule = source.rule
        return ImageEntry(
            status=200, headers=[], body=body, stored_at=time.time(), ttl=YEAR if rule.immutable else rule.ttl,
            stale_while_revalidate=0 if rule.immutable else rule.stale_while_revalidate, stale_if_error=0,
            route=source.route, partition=source.partition, content_type=content_type, etag=f'"{body_digest}"',
            source_size=len(source_body), source_etag=_header(headers, "etag"), immutable=rule.immutable,
            width=width, height=height, provisional=provisional)

    async def _encode_later(self, key: str, source: _Source, headers, body: bytes, content_type: str) -> None:
        """The encoding a busy pool deferred: it replaces the original stored meanwhile (a source
        the workers refuse is dropped, so the next request gets the refusal)."""
        try:
            result = await self._encode(source, body)
        except (WorkerCrashed, TimeoutError):
            return  # the original stays: it is a correct answer
        current = self.memory.get(key)
        if current is None or not current.provisional:
            return  # flushed or replaced meanwhile
        if isinstance(result, Refusal):
            self._forget([key])
            await asyncio.get_running_loop().run_in_executor(self._disk, self.store.delete, [key])
            return
        self._store(key, self._entry(source, headers, body, result.body if result.body is not None else body,
                                     result.content_type or content_type, result.digest, result.width, result.height))

    async def _fetch(self, source: _Source, max_bytes: int, etag: str | None):
        headers = [*source.headers, ("Accept", _UPSTREAM_ACCEPT), ("Accept-Encoding", "identity")]
        if etag:
            headers.append(("If-None-Match", etag))
        timeouts = source.timeouts  # a hung origin: TimeoutError, a 504 (see _produce)
        async with asyncio.timeout(timeouts.until_headers):
            r = await self.session.get(source.url, headers=headers, allow_redirects=False,
                                       timeout=aiohttp.ClientTimeout(total=None, sock_connect=timeouts.connect,
                                                                     sock_read=timeouts.first_byte))
        async with r:
            if r.status == 304 and etag:
                return _NOT_MODIFIED
            kept = [(k, v) for k, v in r.headers.items() if k.lower() not in _NOT_PASSED_BACK]
            if r.content_length is not None and r.content_length > max_bytes:
                return Refusal(422, f"Unprocessable: the source image is over {max_bytes} bytes", "source-too-large")
            body = bytearray()
            while True:
                async with asyncio.timeout(timeouts.idle):
                    chunk = await r.content.readany()
                if not chunk:
                    break
                body += chunk
                if len(body) > max_bytes:
                    return Refusal(422, f"Unprocessable: the source image is over {max_bytes} bytes",
                                   "source-too-large")
        if r.status != 200:
            return Passthrough(r.status, kept, bytes(body))
        return r.status, kept, bytes(body)

    def _store(self, key: str, entry: ImageEntry, share: bool = True) -> None:
        self.memory.put(key, entry)  # memory evictions lose nothing: the disk has every entry
        self.index[key] = (entry.route, entry.partition)
        self.mirror.stored(key, BUCKET, entry)
        self._spawn(self._persist(key, entry))
        if share and self.shared is not None and not entry.provisional:  # an original is replaced soon
            self.shared.share_later(key, entry)

    async def _persist(self, key: str, entry: ImageEntry) -> None:
        evicted = await asyncio.get_running_loop().run_in_executor(self._disk, self.store.put, key, entry)
        self._forget(evicted, evicted=True)

    # --- answers ----------------------------------------------------------------------------------

    def _serve(self, flow: http.HTTPFlow, info, rule: ImageRule, key: str, entry: ImageEntry, outcome: str,
               now: float, status_detail: str | None = None) -> None:
        request = flow.request
        if_none_match = request.headers.get("If-None-Match")
        not_modified = bool(if_none_match) and etag_matches(if_none_match, entry.etag)
        headers = http.Headers()
        if not not_modified:
            headers["Content-Type"] = entry.content_type
            headers["Content-Length"] = str(len(entry.body))
        headers["ETag"] = entry.etag
        headers["Cache-Control"] = _cache_control(rule, entry, now)
        vary = ["Accept"] if rule.optimize else []
        for name, value in cors_headers(request, info.match.upstream.kind).items():
            if name == "Vary":
                vary.append(value)
            else:
                headers[name] = value
        if vary:
            headers["Vary"] = ", ".join(vary)
        if outcome != "miss":
            headers["Age"] = str(max(0, int(entry.age(now))))
        if status_detail is None:
            remaining = int(entry.ttl - entry.age(now))
            status_detail = f"hit; ttl={remaining}" if outcome == "hit" else f"fwd=stale; ttl={remaining}"
        headers["Cache-Status"] = f"Projectionist; {status_detail}"
        headers["X-Content-Type-Options"] = "nosniff"
        sends_body = not not_modified and request.method != "HEAD"
        # The body is given as raw content (never re-encoded); bytes, not None, spare mitmproxy's
        # type check an exception (cyclic garbage) per answer.
        flow.response = http.Response(b"HTTP/1.1", 304 if not_modified else 200, b"", headers,
                                      entry.body if sends_body else b"", None, now, now)
        info.cache = outcome
        if outcome != "miss":
            entry.hits += 1
            self.mirror.hit(key, now)
        if sends_body and entry.source_size:
            self.mirror.saved(BUCKET, entry.route, entry.source_size, len(entry.body), now)

    def _passthrough(self, flow: http.HTTPFlow, info, passed: Passthrough, miss: Miss) -> http.Response:
        headers = http.Headers([(k.encode(), v.encode("latin-1", "replace")) for k, v in passed.headers
                                if not k.lower().startswith("access-control-")])
        for name, value in cors_headers(flow.request, info.match.upstream.kind).items():
            headers[name] = value
        headers["Content-Length"] = str(len(passed.body))
        headers["Cache-Status"] = f"Projectionist; {miss.params(fwd_status=passed.status)}"
        info.cache = "miss"
        return http.Response(b"HTTP/1.1", passed.status, b"", headers,
                             b"" if flow.request.method == "HEAD" else passed.body, None, time.time(), time.time())

    @staticmethod
    def _refusal(flow: http.HTTPFlow, info, refusal: Refusal) -> http.Response:
        info.cache = "none" if refusal.detail == "refused" else "miss"
        return http.Response.make(refusal.status, refusal.message + "\n", {
            "Content-Type": "text/plain; charset=utf-8", "Cache-Control": "no-store",
            "Cache-Status": f"Projectionist; {'fwd=miss; ' if info.cache == 'miss' else ''}detail={refusal.detail}",
            **cors_headers(flow.request, info.match.upstream.kind)})

    # --- background work --------------------------------------------------------------------------

    async def cleanup(self) -> dict:
        """Remove the entries past their last usable moment; report (and log) what was freed.
        The control plane's cache-cleanup job asks for it (a flush request with target "expired")."""
        if not await self._wait_ready() or self.store is None:
            return {}
        now = time.time()
        keys, freed = await asyncio.get_running_loop().run_in_executor(self._disk, self.store.expired, now)
        self._forget(keys)
        if keys:
            log.info("image cache cleanup: removed %d expired entries, freed %d bytes (%d entries, %d bytes left)",
                     len(keys), freed, len(self.index), self.store.bytes)
        return {"at": now, "removed": len(keys), "freed_bytes": freed, "entries": len(self.index),
                "bytes": self.store.bytes}

    def _forget(self, keys: list[str], evicted: bool = False) -> None:
        if evicted:
            CACHE_EVICTIONS.labels(BUCKET).inc(len(keys))
        for key in keys:
            self.memory.pop(key)
            self.index.pop(key, None)
        self.mirror.deleted(list(keys), evicted=evicted)

    async def flush(self, target: str, value: str | None) -> int:
        """Drop entries: all, the "images" bucket, one route, a key prefix, or the expired ones."""
        if self.store is None:
            return 0
        if target == "expired":
            return (await self.cleanup()).get("removed", 0)
        if target == "all" or (target == "bucket" and value == BUCKET):
            keys = set(self.index) | set(self.memory.keys())
        elif target == "route":
            keys = {k for k, (route, _) in self.index.items() if route == value}
        elif target == "prefix":
            keys = {k for k in set(self.index) | set(self.memory.keys()) if k.startswith(value or "\0")}
        elif target == "partition":  # one user's entries ("u<id>"): an admin disabled them
            keys = {k for k, (_, part) in self.index.items() if part == value}
        else:
            return 0
        self._forget(list(keys))
        await asyncio.get_running_loop().run_in_executor(self._disk, self.store.delete, list(keys))
        if self.shared is not None:  # every process applies a flush (response_cache publishes it): idempotent
            await self.shared.delete_for_flush(target, value)
        return len(keys)

    def _flush_from_thread(self, target: str, value: str | None) -> int:
        """Called by the response cache's flush applier (a thread) before it marks a request applied."""
        try:
            return asyncio.run_coroutine_threadsafe(self.flush(target, value), self._loop).result(30)
        except Exception:
            log.exception("flushing the image cache failed")
            return 0

    # --- helpers ----------------------------------------------------------------------------------

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _deadline(self) -> float:
        model = self.watcher.rules.model
        return model.proxy.upstream_timeout + model.images.worker_timeout * 2 + 5


def _cache_control(rule: ImageRule, entry: ImageEntry, now: float) -> str:
    if entry.immutable:
        return f"public, max-age={YEAR}, immutable"
    scope = "public" if rule.scope == "shared" else "private"
    value = f"{scope}, max-age={max(0, int(entry.ttl - entry.age(now)))}"
    if entry.stale_while_revalidate:
        value += f", stale-while-revalidate={int(entry.stale_while_revalidate)}"
    return value


def _header(headers: list[tuple[str, str]], name: str) -> str | None:
    return next((v for k, v in headers if k.lower() == name), None)


def _without_credentials(url: str) -> str:
    """A source URL as part of a key: its credential parameters (Plex tokens) left out."""
    parts = urlsplit(url)
    if not parts.query:
        return url
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k.lower() not in CREDENTIAL_PARAMS]
    return urlunsplit(parts._replace(query=urlencode(query)))
