"""Rate limits and throttles from rules.yaml, applied only to requests that reach the upstream.

Where it sits (see runner.projectionist_addons):

- `RateLimit` comes after the credential addons (it needs `info.user_id` and `info.credential`) and
  after the caches. Its `request` hook sees only flows nobody answered: cache hits, collapsed
  followers and local refusals already carry a response and are neither limited nor counted.
- A cache miss is fetched by `ResponseCache` itself, inside its own `request` hook: the cache calls
  `RateLimit.fetch(flow, fetch_once, stale_ok=..., background=...)` (its `upstream_gate`) around
  every upstream fetch, so the leader of a miss queues like any forwarded request; with a stale
  entry inside `stale_if_error` it does not wait: a refused slot serves the stale entry instead.
- `UpstreamRetry` comes before the credential addons' response hooks, so that an answer it fetches
  again is rewritten like the first one (plex.tv tokens).

What a request goes through, in order:
1. its route's `throttle` (e.g. `/:/timeline` once per 10 s per session unless `state` changes):
   the others are answered locally with what the upstream would have said (empty MediaContainer);
2. the GCRA limits of its upstream and route that match its credential kind, plus any pause of its
   credential: it goes now, or waits for its slot up to `max_wait` (a slower answer, not an error),
   or gets 429 with `Retry-After`, `RateLimit-Policy` / `RateLimit` and CORS headers. Background
   work (warming, revalidation) takes only a slot free now and never the second half of a burst;
   a client over its own `over: yield` budget (a flood) only a slot nobody else could use: people
   never queue behind them;
3. an upstream 429/503 with `Retry-After` pauses that credential for every process and user; GETs
   are retried with jittered backoff (taking a slot again) while their deadline allows.

Every queued, refused, throttled or retried request and every pause writes a `rate_limit_events`
row (batched off the hot path). The state lives in `projectionist.limits`: in this process, or in
Redis when `PROJECTIONIST_REDIS_URL` or `proxy.redis_url` is set (then several proxy processes
share one budget). When Redis fails, decisions fall back to this process' own state.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import random
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
from mitmproxy import ctx, http

from projectionist.limits import (
    PAUSE,
    Backend,
    Decision,
    LimitKey,
    MemoryBackend,
    RateLimited,
    RateLimitEvent,
    RedisBackend,
    parse_retry_after,
    policy_header,
    ratelimit_header,
)
from projectionist.metrics import RATELIMIT_EVENTS, RATELIMIT_WAIT_SECONDS, RATELIMIT_WAITING
from projectionist.event_stream import rate_limit_writer
from projectionist.store import UsageWriter
from projectionist.rules import Limit, Rules, Throttle
from projectionist.shared_tier import redis_url

from . import flowinfo
from .local_responses import cors_headers
from .rules_watch import RulesWatcher
from .upstream_fetch import fetch, upstream_session

log = logging.getLogger(__name__)

DEFAULT_MAX_WAIT = 5.0  # for a request under no limit that meets a paused credential
MAX_RETRIES = 2
BACKEND_RETRY_AFTER = 5.0  # seconds of local decisions after the shared backend failed
RETRY_BASE = 0.25  # seconds; doubled per attempt, jittered ×0.5–1.5
_RETRY_STATUSES = (429, 503)
_IDEMPOTENT = ("GET", "HEAD")
_FORWARDED = "projectionist.ratelimit.forwarded"  # admitted to go upstream through mitmproxy
_EXPOSE = "Retry-After, RateLimit, RateLimit-Policy"

TMDB_429 = {"status_code": 25, "status_message": "Your request count (#) is over the allowed limit of (40).",
            "success": False}
PLEX_SERVER_429 = b"<html><head><title>Too Many Requests</title></head><body><h1>429 Too Many Requests</h1></body></html>"
PLEX_TV_429_JSON = {"errors": [{"code": 1029, "message": "Too many requests", "status": 429}]}
PLEX_TV_429_XML = (b'<?xml version="1.0" encoding="UTF-8"?>\n<errors>\n'
                   b'  <error code="1029" message="Too many requests" status="429"/>\n</errors>\n')
EMPTY_CONTAINER_XML = b'<?xml version="1.0" encoding="UTF-8"?>\n<MediaContainer size="0">\n</MediaContainer>\n'
EMPTY_CONTAINER_JSON = b'{"MediaContainer":{"size":0}}'


class RateLimit:
    def __init__(self, watcher: RulesWatcher, *caches) -> None:
        self.watcher = watcher
        self.memory = MemoryBackend()
        self.backend: Backend = self.memory
        self.writer: UsageWriter | None = None  # a RateLimitWriter, maybe streamed
        self.session: aiohttp.ClientSession | None = None
        self.retry = UpstreamRetry(self)  # the runner puts it before the credential addons
        self._limits: dict[tuple, list[tuple[str, Limit]]] = {}
        self._backend_error_logged = 0.0
        self._backend_down_until = 0.0  # after a Redis failure, decide locally for a while
        for cache in caches:
            cache.upstream_gate = self  # the caches' own fetches come through fetch() / admit()
        watcher.subscribe(self._rules_changed)

    # --- lifecycle ----------------------------------------------------------------------------

    def running(self) -> None:
        if self.session is not None:
            return
        self.session = upstream_session()
        db = getattr(ctx.options, "projectionist_db", "")
        if db:
            self.writer = rate_limit_writer(Path(db).expanduser(), self.watcher.redis_url).start()
        self._use_backend(self.watcher.rules)

    async def done(self) -> None:
        if self.session is not None:
            await self.session.close()
            self.session = None
        if self.backend is not self.memory:
            await self.backend.close()
            self.backend = self.memory
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def _rules_changed(self, rules: Rules) -> None:
        self._limits.clear()
        if self.session is not None:
            self._use_backend(rules)

    def _use_backend(self, rules: Rules | None) -> None:
        url = redis_url(rules.model.proxy.redis_url if rules else None)
        current = getattr(self.backend, "url", None)
        if url == current:
            return
        old = self.backend
        self.backend = RedisBackend(url) if url else self.memory
        self._backend_down_until = 0.0
        if old is not self.memory:
            asyncio.get_running_loop().create_task(old.close())
        log.info("rate limits: %s state", "shared (Redis)" if url else "in-process")

    # --- the request path ---------------------------------------------------------------------

    async def request(self, flow: http.HTTPFlow) -> None:
        info = flowinfo.get(flow)
        if info is None or flow.response is not None or self.watcher.rules is None:
            return  # not ours, or answered without the upstream (cache hit, local answer)
        route = info.match.route
        if route is not None and route.rule.throttle is not None and flow.request.method != "OPTIONS":
            if not await self._throttle_forwards(flow, info, route.rule.throttle):
                flow.response = throttled_response(flow.request, info.match.upstream.kind)
                self._record(flow, info, f"throttle:{info.route}", 0.0, "throttled")
                return
        try:
            await self.admit(flow)
        except RateLimited as refused:
            flow.response = refused.response
            return
        flow.metadata[_FORWARDED] = time.time()

    async def admit(self, flow: http.HTTPFlow, *, stale_ok: bool = False, background: bool = False,
                    max_wait: float | None = None, record_refusal: bool = True) -> Decision | None:
        """Wait for this flow's slot under its limits (and its credential's pause).

        Raises `RateLimited` (with the 429 to answer) when the slot is further away than the wait
        allowed: the limits' `max_wait`, or none at all with `stale_ok` (a stale answer is ready)
        or `background` (a refresh nobody waits for). Other addons that fetch upstream themselves
        (e.g. an image cache) call this before their fetch and `observe()` after it.
        """
        info = flowinfo.get(flow)
        if info is None or flow.request.method == "OPTIONS":  # preflights carry no credential
            return None
        limits = self._applicable(info)
        pause_key = self._pause_key(flow, info)
        if not limits and self.memory.paused_for(pause_key) <= 0:
            return None  # the common case of an unlimited route: no state to consult
        # A limit edited in rules.yaml is a new limiter: its old state (e.g. the debt of a slower
        # rate) must not hold requests back under the new one.
        keys = [LimitKey(f"{name}@{limit.rate:g}/{limit.burst}|{self._subject(limit.per, flow, info)}",
                         1.0 / limit.rate, limit.burst, name,
                         yields=limit.over == "yield" and limit.per in ("client", "user")) for name, limit in limits]
        cap = min((limit.max_wait for _, limit in limits), default=DEFAULT_MAX_WAIT)
        if stale_ok or background:
            cap = 0.0
        if max_wait is not None:
            cap = min(cap, max(0.0, max_wait))
        decision = await self._acquire(keys, pause_key, cap, background)
        if not decision.allowed:
            if record_refusal and not background:
                self._record(flow, info, decision.binding or "limit", 0.0, "stale" if stale_ok else "refused")
            raise RateLimited(too_many_requests(flow.request, info.match.upstream.kind, limits, decision, cap), decision)
        if decision.wait > 0:
            RATELIMIT_WAITING.inc()
            try:
                await asyncio.sleep(decision.wait)
            finally:
                RATELIMIT_WAITING.dec()
            self._record(flow, info, decision.binding or "limit", decision.wait * 1000, "queued")
        return decision

    async def observe(self, flow: http.HTTPFlow, status: int, retry_after: str | None) -> float | None:
        """An upstream answer: 429/503 with Retry-After pauses the flow's credential for everyone."""
        info = flowinfo.get(flow)
        seconds = parse_retry_after(retry_after) if status in _RETRY_STATUSES else None
        if info is None or not seconds:
            return None
        pause_key = self._pause_key(flow, info)
        await self.memory.pause(pause_key, seconds)
        if (shared := self._shared()) is not None:
            try:
                await shared.pause(pause_key, seconds)
            except Exception as exc:  # noqa: BLE001 - Redis down: this process still pauses
                self._backend_failed(exc)
        log.info("upstream %s answered %d with Retry-After: %s paused for %.1f s", info.upstream, status, pause_key, seconds)
        self._record(flow, info, PAUSE, seconds * 1000, "paused")
        return seconds

    async def fetch(self, flow: http.HTTPFlow, fetch_once: Callable[[http.HTTPFlow], Awaitable], *,
                    stale_ok: bool = False, background: bool = False):
        """The response cache's gate: a slot, the fetch, and retries of 429/503 inside the deadline.
        `fetch_once(flow)` returns an `upstream_fetch.Fetched`."""
        deadline = time.time() + self._timeout()
        await self.admit(flow, stale_ok=stale_ok, background=background)
        fetched = await fetch_once(flow)
        retries = not (stale_ok or background) and flow.request.method in _IDEMPOTENT
        for attempt in range(MAX_RETRIES + 1):
            if fetched.status not in _RETRY_STATUSES:
                break
            await self.observe(flow, fetched.status, fetched.header(b"retry-after"))
            if not retries or attempt == MAX_RETRIES or not await self._before_retry(flow, attempt, deadline):
                break
            fetched = await fetch_once(flow)
        return fetched

    async def _before_retry(self, flow: http.HTTPFlow, attempt: int, deadline: float) -> bool:
        """Back off (jittered), then take a slot again; False when the deadline does not allow it."""
        delay = RETRY_BASE * (2 ** attempt) * random.uniform(0.5, 1.5)
        remaining = deadline - time.time() - delay
        info = flowinfo.get(flow)
        if remaining <= 0 or info is None or self.memory.paused_for(self._pause_key(flow, info)) > remaining:
            return False
        await asyncio.sleep(delay)
        try:
            await self.admit(flow, max_wait=deadline - time.time(), record_refusal=False)
        except RateLimited:
            return False
        self._record(flow, info, "retry", delay * 1000, "retried")
        return True

    # --- which limits, keyed on what ------------------------------------------------------------

    def _applicable(self, info: flowinfo.FlowInfo) -> list[tuple[str, Limit]]:
        cache_key = (info.upstream, info.route, info.credential)
        found = self._limits.get(cache_key)
        if found is None:
            rules = self.watcher.rules
            names = list(info.match.upstream.limits)
            if info.match.route is not None:
                names += [n for n in info.match.route.rule.limits if n not in names]
            found = [(n, rules.model.limits[n]) for n in names if n in rules.model.limits
                     and rules.model.limits[n].when_credential in ("any", info.credential)]
            self._limits[cache_key] = found
        return found

    def _subject(self, per: str, flow: http.HTTPFlow, info: flowinfo.FlowInfo) -> str:
        if per == "credential":
            return credential_key(flow, info)
        if per == "server":
            return server_key(flow, info)
        if per == "upstream":
            return info.upstream
        if per == "user" and info.user_id is not None:
            return f"u{info.user_id}"
        if per in ("user", "client"):
            return "c" + client_key(flow, info)
        return "*"  # global

    @staticmethod
    def _pause_key(flow: http.HTTPFlow, info: flowinfo.FlowInfo) -> str:
        # A Plex server that says "busy" is busy for every account; elsewhere the credential is.
        return server_key(flow, info) if info.match.upstream.kind == "plex-server" else credential_key(flow, info)

    async def _throttle_forwards(self, flow: http.HTTPFlow, info: flowinfo.FlowInfo, rule: Throttle) -> bool:
        request = flow.request
        if rule.per == "user" and info.user_id is not None:
            subject = f"u{info.user_id}"
        elif rule.per == "session":
            subject = _plex_param(request, "X-Plex-Session-Identifier") or client_key(flow, info)
        else:
            subject = client_key(flow, info)
        query = request.query
        key = "|".join([info.route, subject, *(f"{p}={query.get(p, '')}" for p in rule.key_params)])
        signature = "&".join(f"{p}={query.get(p, '')}" for p in rule.forward_on_change)
        if (shared := self._shared()) is not None:
            try:
                return await shared.throttle(key, rule.interval, signature)
            except Exception as exc:  # noqa: BLE001
                self._backend_failed(exc)
        return await self.memory.throttle(key, rule.interval, signature)

    async def _acquire(self, keys: list[LimitKey], pause_key: str, cap: float, background: bool = False) -> Decision:
        if keys and (shared := self._shared()) is not None:
            try:
                decision = await shared.acquire(keys, pause_key, cap, background)
            except Exception as exc:  # noqa: BLE001 - Redis down or slow: decide locally
                self._backend_failed(exc)
            else:
                if decision.paused_for > 0:  # mirrored, for requests under no limit
                    await self.memory.pause(pause_key, decision.paused_for)
                return decision
        return self.memory.acquire_now(keys, pause_key, cap, background)

    def _shared(self) -> Backend | None:
        """The shared backend, unless there is none or it failed moments ago."""
        if self.backend is self.memory or time.monotonic() < self._backend_down_until:
            return None
        return self.backend

    def _backend_failed(self, exc: Exception) -> None:
        now = time.monotonic()
        self._backend_down_until = now + BACKEND_RETRY_AFTER  # a dead Redis must not slow every request
        if now - self._backend_error_logged > 30:
            self._backend_error_logged = now
            log.warning("rate-limit backend %s failed (%s: %s); deciding in this process meanwhile",
                        self.backend.name, type(exc).__name__, exc)

    def _timeout(self) -> float:
        return self.watcher.rules.model.proxy.upstream_timeout if self.watcher.rules else 15.0

    def _record(self, flow: http.HTTPFlow, info: flowinfo.FlowInfo, rule: str, waited_ms: float, outcome: str) -> None:
        RATELIMIT_EVENTS.labels(rule, outcome).inc()
        if waited_ms:
            RATELIMIT_WAIT_SECONDS.labels(rule).observe(waited_ms / 1000)
        if self.writer is not None:
            self.writer.record(RateLimitEvent(
                ts=time.time(), user_id=info.user_id, client=_hash(client_key(flow, info)), upstream=info.upstream,
                rule=rule, waited_ms=round(waited_ms, 3), outcome=outcome))

    # --- retries of forwarded flows (called by UpstreamRetry) -------------------------------------

    async def fetch_direct(self, flow: http.HTTPFlow) -> http.Response:
        return (await fetch(self.session, flow.request, self._timeout())).to_response()


class UpstreamRetry:
    """Forwarded flows: an upstream 429/503 pauses the credential, and an idempotent request is
    fetched again (after backoff and a fresh slot) while its deadline allows. Placed before the
    credential addons so their response hooks see the final answer."""

    def __init__(self, limiter: RateLimit) -> None:
        self.limiter = limiter

    async def response(self, flow: http.HTTPFlow) -> None:
        started = flow.metadata.get(_FORWARDED)
        response = flow.response
        if started is None or response is None or response.status_code not in _RETRY_STATUSES:
            return
        limiter = self.limiter
        await limiter.observe(flow, response.status_code, response.headers.get("Retry-After"))
        info = flowinfo.get(flow)
        streamed = response.stream or (info.match.route is not None and info.match.route.rule.stream)
        if flow.request.method not in _IDEMPOTENT or streamed or limiter.session is None:
            return
        deadline = started + limiter._timeout()
        for attempt in range(MAX_RETRIES):
            if not await limiter._before_retry(flow, attempt, deadline):
                return
            try:
                again = await limiter.fetch_direct(flow)
            except (TimeoutError, aiohttp.ClientError, OSError):
                return  # the first answer stands
            flow.response = again
            if again.status_code not in _RETRY_STATUSES:
                return
            await limiter.observe(flow, again.status_code, again.headers.get("Retry-After"))


# --- keys ------------------------------------------------------------------------------------------

def credential_key(flow: http.HTTPFlow, info: flowinfo.FlowInfo) -> str:
    """Which upstream credential a request spends: the shared default key, or one account's."""
    kind = info.match.upstream.kind
    base = server_key(flow, info) if kind == "plex-server" else info.upstream
    credential = info.credential or "none"
    if credential in ("default", "none") or info.user_id is None:
        return f"{base}|{credential}"
    return f"{base}|{credential}|u{info.user_id}"


def server_key(flow: http.HTTPFlow, info: flowinfo.FlowInfo) -> str:
    # Another server of the account by its machine id (all its connections are one server).
    return f"{info.upstream}@{info.server}" if info.server else f"{info.upstream}|{flow.request.host}:{flow.request.port}"


def client_key(flow: http.HTTPFlow, info: flowinfo.FlowInfo) -> str:
    """One browser: its Plex client identifier, else its address (with its user when known)."""
    client = _plex_param(flow.request, "X-Plex-Client-Identifier")
    if not client:
        peer = flow.client_conn.peername
        client = peer[0] if peer else "?"
    return client if info.user_id is None else f"{client}|u{info.user_id}"


def _plex_param(request: http.Request, name: str) -> str | None:
    value = request.headers.get(name)
    if value is None and name in request.path:  # parse the query only when it can be there
        value = request.query.get(name)
    return value or None


def _hash(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()[:16]


# --- answers the proxy makes ---------------------------------------------------------------------

def _cors(request: http.Request, kind: str) -> dict[str, str]:
    headers = cors_headers(request, kind)
    if headers and "Access-Control-Expose-Headers" not in headers:
        headers["Access-Control-Expose-Headers"] = _EXPOSE
    return headers


def too_many_requests(request: http.Request, kind: str, limits: list[tuple[str, Limit]], decision: Decision,
                      max_wait: float) -> http.Response:
    """429 in the upstream's own format, with Retry-After, the IETF RateLimit headers and CORS."""
    retry_after = max(1, math.ceil(decision.wait - max_wait))
    headers = {"Retry-After": str(retry_after)}
    if limits:
        headers["RateLimit-Policy"] = ", ".join(policy_header(name, limit.rate) for name, limit in limits)
        binding = decision.binding if any(decision.binding == name for name, _ in limits) else limits[0][0]
        headers["RateLimit"] = ratelimit_header(binding, 0, retry_after)
    wants_json = "json" in request.headers.get("Accept", "")
    if kind == "tmdb":
        body, content_type = json.dumps(TMDB_429).encode(), "application/json;charset=utf-8"
    elif kind == "plex-server":
        body, content_type = PLEX_SERVER_429, "text/html"
    elif kind == "plex-tv":
        body, content_type = ((json.dumps(PLEX_TV_429_JSON).encode(), "application/json") if wants_json
                              else (PLEX_TV_429_XML, "application/xml"))
    else:
        body, content_type = (json.dumps({"error": "rate_limited", "retry_after": retry_after}).encode(),
                              "application/json")
    return http.Response.make(429, body, {"Content-Type": content_type, **headers, **_cors(request, kind)})


def throttled_response(request: http.Request, kind: str) -> http.Response:
    """What the upstream answers a throttled report with: Plex, an empty MediaContainer (XML or JSON
    by Accept); anything else, 204."""
    if kind in ("plex-server", "plex-tv"):
        if "json" in request.headers.get("Accept", ""):
            body, content_type = EMPTY_CONTAINER_JSON, "application/json"
        else:
            body, content_type = EMPTY_CONTAINER_XML, "text/xml;charset=utf-8"
        return http.Response.make(200, body, {"Content-Type": content_type, **cors_headers(request, kind)})
    return http.Response.make(204, b"", cors_headers(request, kind))
