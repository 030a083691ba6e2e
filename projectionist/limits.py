"""Rate-limit state: GCRA limiters, credential pauses and throttles, behind one interface.

Two backends hold the state: `MemoryBackend` (one process, the default) and `RedisBackend` (several
proxy processes share one budget: every decision is one Lua script, atomic in Redis, timed by
Redis' own clock). `proxy_addons/rate_limit.py` decides *which* limits apply to a request; this
module only answers "may this go now, later, or not at all".

GCRA (the generic cell rate algorithm, a token bucket written as one timestamp per key): a limit
with rate `r` and burst `b` has emission interval T = 1/r and stores its theoretical arrival time
TAT. A request arriving at `now` may go at `max(now, TAT - (b - 1)·T)`; if that is within its
`max_wait`, it *reserves* that slot (TAT := max(TAT, slot) + T) and waits until then, else it is
refused. A request under several limits (per credential, per user, ...) goes at the latest of
their slots and reserves the same slot in each, atomically. Over any window of D seconds a limit
therefore admits at most b + D·r requests, however many processes share it. A credential *pause*
(the upstream said 429/503 with Retry-After) is one more constraint: no slot before it ends.

Background work (the cache warmer, stale-while-revalidate refreshes) never waits and never takes
the second half of a burst: it goes only while half the burst is still free, so a person arriving
finds at least burst // 2 slots free, not a bucket the warmer emptied. A client over its own budget (`yields` limiters: per client or
user with `over: yield`) is treated so too, and each request it is refused keeps it there (its own
TAT is held at a burst's worth ahead): while it floods it queues ahead of nobody and spends nothing
of the shared budget; slowed to its own rate it is served again.

Events (queued, refused, throttled, paused, retried) go to `rate_limit_events` through
`RateLimitWriter`, the usage writer's batching thread; a trigger keeps `rate_limit_hourly`.
"""

from __future__ import annotations

import logging
import math
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any, Protocol

from .store import UsageWriter

log = logging.getLogger(__name__)

PAUSE = "retry-after"  # the "rule" of a wait or refusal caused by an upstream's Retry-After
MAX_PAUSE = 3600.0  # a Retry-After longer than this is taken as this


class RateLimited(Exception):
    """The limiter refused a request without asking the upstream; `response` is the answer to give."""

    def __init__(self, response: Any, decision: Decision | None = None) -> None:
        super().__init__("rate limited")
        self.response = response
        self.decision = decision


@dataclass(frozen=True, slots=True)
class LimitKey:
    """One limiter a request is subject to: its state key, emission interval (1/rate) and burst."""

    key: str
    interval: float
    burst: int
    name: str  # the rules.yaml limit name, for events and headers
    yields: bool = False  # the requester's own budget (per client/user, over: yield): over it, it yields


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    wait: float  # seconds until the slot (allowed) or until a slot would be free (refused)
    binding: str | None  # the limit name (or PAUSE) that set the slot; None: nothing held it back
    paused_for: float = 0.0  # seconds the credential stays paused (0: not paused)
    yielded: bool = False  # decided as background work: the client was over its own budget


class Backend(Protocol):
    name: str

    async def acquire(self, keys: Sequence[LimitKey], pause_key: str | None, max_wait: float,
                      background: bool = False) -> Decision: ...

    async def pause(self, pause_key: str, seconds: float) -> None: ...

    async def throttle(self, key: str, interval: float, signature: str) -> bool: ...

    async def close(self) -> None: ...


# --- in-process ------------------------------------------------------------------------------------

class MemoryBackend:
    """The state in dictionaries of this process; swept of expired keys now and then."""

    name = "memory"

    def __init__(self, clock=time.monotonic) -> None:
        self.clock = clock
        self.tats: dict[str, float] = {}
        self.pauses: dict[str, float] = {}
        self.throttles: dict[str, tuple[float, float, str]] = {}  # key -> (forwarded at, expires, signature)
        self._next_sweep = 0.0

    def acquire_now(self, keys: Sequence[LimitKey], pause_key: str | None, max_wait: float,
                    background: bool = False) -> Decision:
        now = self.clock()
        self._sweep(now)
        demoted = not background and any(self.tats.get(k.key, 0.0) - (k.burst - 1) * k.interval > now
                                         for k in keys if k.yields)
        if demoted:
            background, max_wait = True, 0.0  # over its own budget: only a free slot, or none
        slot, binding = now, None
        paused_until = self.pauses.get(pause_key, 0.0) if pause_key else 0.0
        if paused_until > slot:
            slot, binding = paused_until, PAUSE
        for k in keys:
            burst = k.burst
            if demoted:
                burst = 1  # a flood: only what nobody else wants
            elif background and not k.yields:  # its own budget's burst is its own
                burst = k.burst - k.burst // 2  # half the burst stays the people's
            allowed_at = self.tats.get(k.key, 0.0) - (burst - 1) * k.interval
            if allowed_at > slot:
                slot, binding = allowed_at, k.name
        wait = slot - now
        paused_for = max(0.0, paused_until - now)
        if wait > max_wait + 1e-9:
            if demoted:  # (not real background work: the warmer is no flood)
                for k in keys:
                    if k.yields and self.tats.get(k.key, 0.0) > now:  # still flooding: still over
                        self.tats[k.key] = max(self.tats[k.key], now + k.burst * k.interval)
            return Decision(False, wait, binding, paused_for, background)
        for k in keys:
            self.tats[k.key] = max(self.tats.get(k.key, 0.0), slot) + k.interval
        return Decision(True, wait, binding, paused_for, background)

    async def acquire(self, keys: Sequence[LimitKey], pause_key: str | None, max_wait: float,
                      background: bool = False) -> Decision:
        return self.acquire_now(keys, pause_key, max_wait, background)

    async def pause(self, pause_key: str, seconds: float) -> None:
        until = self.clock() + min(seconds, MAX_PAUSE)
        if until > self.pauses.get(pause_key, 0.0):
            self.pauses[pause_key] = until

    def paused_for(self, pause_key: str) -> float:
        return max(0.0, self.pauses.get(pause_key, 0.0) - self.clock())

    async def throttle(self, key: str, interval: float, signature: str) -> bool:
        now = self.clock()
        last = self.throttles.get(key)
        if last is not None and now < last[1] and last[2] == signature:
            return False
        self.throttles[key] = (now, now + interval, signature)
        return True

    async def close(self) -> None:
        pass

    def _sweep(self, now: float) -> None:
        """Forget keys whose state no longer holds anything back (a TAT in the past is no TAT)."""
        if now < self._next_sweep:
            return
        self._next_sweep = now + 10.0
        self.tats = {k: v for k, v in self.tats.items() if v > now}
        self.pauses = {k: v for k, v in self.pauses.items() if v > now}
        self.throttles = {k: v for k, v in self.throttles.items() if v[1] > now}


# --- Redis -----------------------------------------------------------------------------------------

# KEYS: the limiters' TAT keys, then the pause key. ARGV: max_wait, background (0/1), then interval,
# burst and yields (0/1) per limiter. Background (or a client over a `yields` limiter) counts every
# burst as 1 and may not wait.
# Returns {allowed, wait, index of the binding limiter (0: the pause, -1: none), paused_for}; floats as
# strings (Redis would truncate Lua numbers to integers). Time is Redis' own, so processes agree.
_ACQUIRE_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local n = #KEYS - 1
local max_wait = tonumber(ARGV[1])
local background = tonumber(ARGV[2]) == 1
local demoted = false
local tats = {}
for i = 1, n do
  tats[i] = tonumber(redis.call('GET', KEYS[i]) or '0')
  local interval, burst = tonumber(ARGV[3 * i]), tonumber(ARGV[3 * i + 1])
  if not background and tonumber(ARGV[3 * i + 2]) == 1 and tats[i] - (burst - 1) * interval > now then
    demoted = true
  end
end
if demoted then background, max_wait = true, 0 end
local slot, binding = now, -1
local paused_until = tonumber(redis.call('GET', KEYS[n + 1]) or '0')
if paused_until > slot then slot, binding = paused_until, 0 end
for i = 1, n do
  local interval, burst = tonumber(ARGV[3 * i]), tonumber(ARGV[3 * i + 1])
  if demoted then burst = 1
  elseif background and tonumber(ARGV[3 * i + 2]) ~= 1 then burst = burst - math.floor(burst / 2) end
  local allowed_at = tats[i] - (burst - 1) * interval
  if allowed_at > slot then slot, binding = allowed_at, i end
end
local wait = slot - now
local paused_for = math.max(0, paused_until - now)
local yielded = 0
if background then yielded = 1 end
if wait > max_wait + 0.000001 then
  if demoted then
    for i = 1, n do
      local interval, burst = tonumber(ARGV[3 * i]), tonumber(ARGV[3 * i + 1])
      if tonumber(ARGV[3 * i + 2]) == 1 and tats[i] > now then
        local tat = math.max(tats[i], now + burst * interval)
        redis.call('SET', KEYS[i], string.format('%.6f', tat), 'PX', math.ceil((tat - now) * 1000) + 1000)
      end
    end
  end
  return {0, string.format('%.6f', wait), binding, string.format('%.6f', paused_for), yielded}
end
for i = 1, n do
  local tat = math.max(tats[i], slot) + tonumber(ARGV[3 * i])
  redis.call('SET', KEYS[i], string.format('%.6f', tat), 'PX', math.ceil((tat - now) * 1000) + 1000)
end
return {1, string.format('%.6f', wait), binding, string.format('%.6f', paused_for), yielded}
"""

# KEYS[1]: pause key. ARGV[1]: seconds. Only ever lengthens a pause.
_PAUSE_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local seconds = tonumber(ARGV[1])
local until_ = now + seconds
if until_ > tonumber(redis.call('GET', KEYS[1]) or '0') then
  redis.call('SET', KEYS[1], string.format('%.6f', until_), 'PX', math.ceil(seconds * 1000) + 1000)
end
return 1
"""

# KEYS[1]: throttle key. ARGV: interval, signature. 1: forward (and remember), 0: answer locally.
_THROTTLE_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local last = redis.call('HMGET', KEYS[1], 'at', 'sig')
if last[1] and now - tonumber(last[1]) < tonumber(ARGV[1]) and last[2] == ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], 'at', string.format('%.6f', now), 'sig', ARGV[2])
redis.call('PEXPIRE', KEYS[1], math.ceil(tonumber(ARGV[1]) * 1000))
return 1
"""


class RedisBackend:
    """The state in Redis, shared by every proxy process pointed at the same server and prefix."""

    name = "redis"

    def __init__(self, url: str, prefix: str = "projectionist:rl:", timeout: float = 1.0) -> None:
        import redis.asyncio as aioredis  # imported only when configured

        self.url = url
        self.prefix = prefix
        self.client = aioredis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout,
                                              decode_responses=True)
        self._acquire = self.client.register_script(_ACQUIRE_LUA)
        self._pause = self.client.register_script(_PAUSE_LUA)
        self._throttle = self.client.register_script(_THROTTLE_LUA)

    async def acquire(self, keys: Sequence[LimitKey], pause_key: str | None, max_wait: float,
                      background: bool = False) -> Decision:
        redis_keys = [self.prefix + "gcra:" + k.key for k in keys] + [self.prefix + "pause:" + (pause_key or "-")]
        args: list[Any] = [repr(float(max_wait)), int(background)]
        for k in keys:
            args += [repr(float(k.interval)), k.burst, int(k.yields)]
        allowed, wait, binding, paused_for, yielded = await self._acquire(keys=redis_keys, args=args)
        binding = int(binding)
        name = PAUSE if binding == 0 else (keys[binding - 1].name if binding > 0 else None)
        return Decision(bool(int(allowed)), float(wait), name, float(paused_for), bool(int(yielded)))

    async def pause(self, pause_key: str, seconds: float) -> None:
        await self._pause(keys=[self.prefix + "pause:" + pause_key], args=[repr(float(min(seconds, MAX_PAUSE)))])

    async def throttle(self, key: str, interval: float, signature: str) -> bool:
        return bool(int(await self._throttle(keys=[self.prefix + "throttle:" + key],
                                             args=[repr(float(interval)), signature])))

    async def close(self) -> None:
        await self.client.aclose()


# --- headers ---------------------------------------------------------------------------------------

def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date); None if absent or invalid."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return min(float(value), MAX_PAUSE)
    try:
        when = parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError):
        return None
    return min(max(0.0, when - (now if now is not None else time.time())), MAX_PAUSE)


def quota_window(rate: float) -> tuple[int, int]:
    """A rate (requests per second) as the IETF RateLimit-Policy's integer quota `q` per window `w`."""
    for window in range(1, 3601):
        quota = rate * window
        if quota >= 1 and abs(quota - round(quota)) < 1e-6:
            return round(quota), window
    return max(1, round(rate)), 1


def policy_header(name: str, rate: float) -> str:
    """`RateLimit-Policy` (draft-ietf-httpapi-ratelimit-headers): `"tmdb-default";q=2;w=1`."""
    quota, window = quota_window(rate)
    return f'"{_sf_string(name)}";q={quota};w={window}'


def ratelimit_header(name: str, remaining: int, reset: float) -> str:
    """`RateLimit`: `"tmdb-default";r=0;t=3` (remaining quota, seconds until it is available)."""
    return f'"{_sf_string(name)}";r={max(0, remaining)};t={max(0, math.ceil(reset))}'


def _sf_string(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"')


# --- events ----------------------------------------------------------------------------------------

EVENT_COLUMNS = ("ts", "user_id", "client", "upstream", "rule", "waited_ms", "outcome")
_INSERT_EVENTS = (f"INSERT INTO rate_limit_events ({', '.join(EVENT_COLUMNS)}) "
                  f"VALUES ({', '.join('?' for _ in EVENT_COLUMNS)})")


@dataclass(slots=True)
class RateLimitEvent:
    """One queued / refused / throttled / retried request, or one pause. No URL, no token: the client
    is a short hash of its identifier (or address)."""

    ts: float
    user_id: int | None
    client: str | None
    upstream: str
    rule: str
    waited_ms: float
    outcome: str  # queued | refused | stale | throttled | paused | retried

    def as_row(self) -> tuple:
        return tuple(getattr(self, c) for c in EVENT_COLUMNS)


class RateLimitWriter(UsageWriter):
    """The usage writer's batching thread, writing `rate_limit_events` (the rollup is a trigger's)."""

    @staticmethod
    def _write(conn: sqlite3.Connection, events: list[RateLimitEvent]) -> bool:
        try:
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany(_INSERT_EVENTS, [e.as_row() for e in events])
            conn.execute("COMMIT")
            return True
        except sqlite3.Error as exc:
            log.debug("rate-limit writer: batch of %d rows not written yet (%s); will retry", len(events), exc)
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            return False
