"""Usage and performance figures from the proxy's usage tables (read-only queries).

Totals per route come from `usage_hourly` (kept by the proxy's writer in the same transaction as
the rows); latency percentiles, credential counts and errors need the rows themselves
(`usage_events`, indexed by time and by user). The queries are blocking: they run in a thread on
the app's read connection, never on the event loop.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import TypeVar

from aiohttp import web

from projectionist.redact import RedactSecrets

from .keys import DB, DB_LOCK
from .models import (
    AdminErrors,
    AdminPerformance,
    AdminUsage,
    CacheSummary,
    CredentialUsage,
    DaysQuery,
    ErrorEvent,
    RoutePerformance,
    RouteUsage,
    UsageResponse,
    UserUsage,
)
from .openapi import USER, Api, Call

api = Api("usage")
routes = api.routes

TMDB_UPSTREAM = "tmdb"  # rules.yaml's TMDB API upstream: the one whose credential the proxy chooses
T = TypeVar("T")


async def query(app: web.Application, fn: Callable[..., T], *args) -> T:
    async with app[DB_LOCK]:
        return await asyncio.to_thread(fn, app[DB], *args)


def _since(days: int = 0, hours: int = 0) -> datetime:
    now = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    return now - timedelta(days=days, hours=hours)


def _hour(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:00")  # usage_hourly.hour


_ROUTE_TOTALS = """
    SELECT upstream, route, sum(requests), sum(errors), sum(bytes_out), sum(cache_hits), sum(rate_limited),
           CASE WHEN sum(requests) > 0 THEN sum(latency_ms_sum) / sum(requests) END
    FROM usage_hourly WHERE hour >= ? {user} GROUP BY upstream, route ORDER BY sum(requests) DESC, upstream, route
"""


def _routes(conn: sqlite3.Connection, since: datetime, user_id: int | None) -> list[RouteUsage]:
    sql = _ROUTE_TOTALS.format(user="AND user_id = ?" if user_id is not None else "")
    params = (_hour(since), user_id) if user_id is not None else (_hour(since),)
    return [RouteUsage(upstream=r[0], route=r[1], requests=r[2], errors=r[3], bytes_out=r[4], cache_hits=r[5],
                       rate_limited=r[6], avg_latency_ms=round(r[7], 2) if r[7] is not None else None)
            for r in conn.execute(sql, params)]


def _tmdb_credentials(conn: sqlite3.Connection, since: datetime, user_id: int | None) -> CredentialUsage:
    sql = ("SELECT credential, count(*) FROM usage_events WHERE ts >= ? AND upstream = ? "
           + ("AND user_id = ? " if user_id is not None else "") + "GROUP BY credential")
    params = (since.timestamp(), TMDB_UPSTREAM) + ((user_id,) if user_id is not None else ())
    counts = dict(conn.execute(sql, params).fetchall())
    return CredentialUsage(default=counts.get("default", 0), custom=counts.get("custom", 0))


def user_usage(conn: sqlite3.Connection, user_id: int, days: int) -> UsageResponse:
    since = _since(days=days)
    routes = _routes(conn, since, user_id)
    return UsageResponse(user_id=user_id, since=since, requests=sum(r.requests for r in routes),
                         errors=sum(r.errors for r in routes), rate_limited=sum(r.rate_limited for r in routes),
                         routes=routes,
                         tmdb=_tmdb_credentials(conn, since, user_id))


def all_usage(conn: sqlite3.Connection, days: int) -> AdminUsage:
    since = _since(days=days)
    routes = _routes(conn, since, None)
    users = [UserUsage(user_id=r[0] or None, username=r[1], requests=r[2], errors=r[3], bytes_out=r[4])
             for r in conn.execute(
                 "SELECT h.user_id, u.username, sum(h.requests), sum(h.errors), sum(h.bytes_out) FROM usage_hourly h "
                 "LEFT JOIN users u ON u.id = h.user_id WHERE h.hour >= ? GROUP BY h.user_id "
                 "ORDER BY sum(h.requests) DESC", (_hour(since),))]
    return AdminUsage(since=since, requests=sum(r.requests for r in routes), errors=sum(r.errors for r in routes),
                      rate_limited=sum(r.rate_limited for r in routes), bytes_out=sum(r.bytes_out for r in routes), routes=routes, users=users,
                      tmdb=_tmdb_credentials(conn, since, None))


# Nearest-rank percentiles per route with window functions: rank ceil(p * n) is (p*n + 99) / 100
# in integers (SQLite may lack ceil()).
_PERCENTILES = """
WITH ranked AS (
    SELECT upstream, route, latency_ms,
           row_number() OVER (PARTITION BY upstream, route ORDER BY latency_ms) AS rank,
           count(*) OVER (PARTITION BY upstream, route) AS n
    FROM usage_events WHERE ts >= ? AND latency_ms IS NOT NULL
)
SELECT upstream, route, n,
       max(CASE WHEN rank = (50 * n + 99) / 100 THEN latency_ms END),
       max(CASE WHEN rank = (90 * n + 99) / 100 THEN latency_ms END),
       max(CASE WHEN rank = (95 * n + 99) / 100 THEN latency_ms END),
       max(CASE WHEN rank = (99 * n + 99) / 100 THEN latency_ms END),
       max(latency_ms), avg(latency_ms)
FROM ranked GROUP BY upstream, route ORDER BY n DESC, upstream, route
"""


def performance(conn: sqlite3.Connection, hours: int) -> AdminPerformance:
    since = _since(hours=hours)
    cache = {(r[0], r[1]): (r[2], r[3], r[4]) for r in conn.execute(
        "SELECT upstream, route, sum(cache_hits), sum(cache_misses), sum(cache_stale) FROM usage_hourly "
        "WHERE hour >= ? GROUP BY upstream, route", (_hour(since),))}
    routes = []
    for upstream, route, n, p50, p90, p95, p99, slowest, mean in conn.execute(_PERCENTILES, (since.timestamp(),)):
        hits, misses, stale = cache.get((upstream, route), (0, 0, 0))
        looked_up = hits + misses + stale
        routes.append(RoutePerformance(
            upstream=upstream, route=route, requests=n, p50_ms=_ms(p50), p90_ms=_ms(p90), p95_ms=_ms(p95),
            p99_ms=_ms(p99), max_ms=_ms(slowest), avg_ms=_ms(mean),
            cache_hit_ratio=round(hits / looked_up, 4) if looked_up else None))
    hits, misses, stale = (sum(v[i] for v in cache.values()) for i in range(3))
    looked_up = hits + misses + stale
    return AdminPerformance(since=since, routes=routes, cache=CacheSummary(
        hits=hits, misses=misses, stale=stale, hit_ratio=round(hits / looked_up, 4) if looked_up else None))


def _ms(value: float | None) -> float | None:
    return round(value, 2) if value is not None else None


def recent_errors(conn: sqlite3.Connection, hours: int, limit: int) -> AdminErrors:
    since = _since(hours=hours)
    rows = conn.execute(
        "SELECT id, ts, listener, upstream, route, method, status, latency_ms, user_id, error FROM usage_events "
        "WHERE ts >= ? AND (error IS NOT NULL OR status IS NULL OR status >= 500) ORDER BY id DESC LIMIT ?",
        (since.timestamp(), limit)).fetchall()
    return AdminErrors(since=since, errors=[
        ErrorEvent(id=r[0], ts=datetime.fromtimestamp(r[1], UTC), listener=r[2], upstream=r[3], route=r[4],
                   method=r[5], status=r[6], latency_ms=r[7], user_id=r[8],
                   # error texts come from exceptions: they may quote a URL or a header
                   error=RedactSecrets.redact(r[9]) if r[9] else None)
        for r in rows])


@api.get("/api/usage", summary="Your own usage", access=USER, query=DaysQuery, response=UsageResponse)
async def my_usage(request: web.Request, call: Call) -> UsageResponse:
    """Requests per upstream and route made with your surrogates, and how many TMDB calls used the
    server's key (`default`) or your own (`custom`)."""
    return await query(request.app, user_usage, call.user.user_id, call.query.days)
