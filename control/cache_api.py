"""Cache administration: statistics, keys, and flushes (admins only).

The caches live in the proxy (its memory layer) and on disk; the control plane reads their SQLite
mirror (`cache_entries`, `cache_evictions`) and the per-request outcomes in `usage_events`, and
asks the proxy to flush by queueing a `cache_flush_requests` row, which the proxy applies within
about half a second.
"""

from __future__ import annotations

import sqlite3
import time
from typing import Literal
from urllib.parse import urlsplit

from aiohttp import web
from pydantic import BaseModel, Field, model_validator

from projectionist.cache_store import without_key_neutral_params
from projectionist.store import utcnow_iso

from .openapi import ADMIN, Api, Call
from .usage import query

api = Api("cache")
routes = api.routes


class RouteCacheStats(BaseModel):
    bucket: str
    route: str
    hits: int
    misses: int
    stale: int
    hit_ratio: float | None = Field(description="(hits + stale) / (hits + stale + misses); null without traffic")
    keys: int
    bytes: int
    evictions: int
    bytes_saved: int = Field(default=0, description="images: bytes re-encoding and resizing saved in the period")


class BucketCacheStats(BaseModel):
    bucket: str = Field(description='"api" (the response cache) or "images" (the image cache)')
    hits: int
    misses: int
    stale: int
    keys: int
    bytes: int = Field(description="bytes stored")
    bytes_saved: int = Field(description="bytes re-encoding and resizing saved in the period (images)")
    evictions: int


class CacheStats(BaseModel):
    since_hours: int
    routes: list[RouteCacheStats]
    buckets: list[BucketCacheStats] = []


class StatsQuery(BaseModel):
    hours: int = Field(default=24, ge=1, le=24 * 90)


class FlushRequest(BaseModel):
    target: Literal["all", "bucket", "route", "prefix", "url"]
    value: str | None = Field(default=None, max_length=4096,
                              description="bucket name, route name, key-hash prefix (hex), or an upstream URL as "
                                          "the player requests it (every user's and variant's entry of that URL)")

    @model_validator(mode="after")
    def _value_matches_target(self) -> FlushRequest:
        if self.target != "all" and not self.value:
            raise ValueError(f"value is required to flush a {self.target}")
        if self.target == "prefix" and not all(c in "0123456789abcdef" for c in self.value or ""):
            raise ValueError("a key prefix is hexadecimal (cache keys are SHA-256 hashes)")
        if self.target == "url":
            parts = urlsplit(self.value or "")
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError("a URL to flush is absolute: http(s)://host/path?query")
            # Normalised like a key: a token in the URL is never stored with the request.
            self.value = without_key_neutral_params(self.value)
        elif self.value and len(self.value) > 200:
            raise ValueError("value is at most 200 characters")
        return self


class FlushQueued(BaseModel):
    id: int
    target: str
    value: str | None
    status: Literal["queued"] = "queued"


class KeysQuery(BaseModel):
    bucket: str | None = None
    route: str | None = None
    prefix: str | None = Field(default=None, pattern="^[0-9a-f]{1,64}$")
    limit: int = Field(default=50, ge=1, le=500)
    offset: int = Field(default=0, ge=0)


class CacheKey(BaseModel):
    key_hash: str
    bucket: str
    route: str
    scope: str
    partition: str
    size: int
    created_at: float
    expires_at: float | None
    hits: int


class CacheKeys(BaseModel):
    total: int
    keys: list[CacheKey]


def cache_stats(conn: sqlite3.Connection, hours: int) -> CacheStats:
    since = time.time() - hours * 3600
    since_hour = time.strftime("%Y-%m-%dT%H:00", time.gmtime(since))
    # Usage rows say hit/miss/stale, not which cache: a route is the image cache's when that
    # cache ever stored, evicted or served it; otherwise the response cache's.
    image_routes = {route for (route,) in conn.execute(
        "SELECT route FROM cache_entries WHERE bucket = 'images' UNION SELECT route FROM cache_evictions "
        "WHERE bucket = 'images' UNION SELECT route FROM cache_savings_hourly WHERE bucket = 'images'")}
    outcomes = {("images" if route in image_routes else "api", route): (hits, misses, stale)
                for route, hits, misses, stale in conn.execute(
                    "SELECT route, sum(cache = 'hit'), sum(cache = 'miss'), sum(cache = 'stale') FROM usage_events "
                    "WHERE ts >= ? AND cache IN ('hit', 'miss', 'stale') GROUP BY route", (since,))}
    stored = {(bucket, route): (keys, size) for bucket, route, keys, size in conn.execute(
        "SELECT bucket, route, count(*), coalesce(sum(size), 0) FROM cache_entries GROUP BY bucket, route")}
    evictions = {(bucket, route): n for bucket, route, n in conn.execute(
        "SELECT bucket, route, evictions FROM cache_evictions")}
    saved = {(bucket, route): n for bucket, route, n in conn.execute(
        "SELECT bucket, route, sum(bytes_saved) FROM cache_savings_hourly WHERE hour >= ? GROUP BY bucket, route",
        (since_hour,))}
    rows = []
    for bucket, route in sorted(set(outcomes) | set(stored) | set(evictions) | set(saved)):
        hits, misses, stale = outcomes.get((bucket, route), (0, 0, 0))
        served = hits + misses + stale
        keys, size = stored.get((bucket, route), (0, 0))
        rows.append(RouteCacheStats(bucket=bucket, route=route, hits=hits, misses=misses, stale=stale,
                                    hit_ratio=round((hits + stale) / served, 4) if served else None,
                                    keys=keys, bytes=size, evictions=evictions.get((bucket, route), 0),
                                    bytes_saved=saved.get((bucket, route), 0)))
    buckets = []
    for bucket in sorted({r.bucket for r in rows} | {"api", "images"}):
        mine = [r for r in rows if r.bucket == bucket]
        buckets.append(BucketCacheStats(bucket=bucket, **{f: sum(getattr(r, f) for r in mine) for f in (
            "hits", "misses", "stale", "keys", "bytes", "bytes_saved", "evictions")}))
    return CacheStats(since_hours=hours, routes=rows, buckets=buckets)


def queue_flush(conn: sqlite3.Connection, target: str, value: str | None, user_id: int) -> int:
    with conn:
        return conn.execute("INSERT INTO cache_flush_requests (target, value, requested_at, requested_by) "
                            "VALUES (?, ?, ?, ?)", (target, value, utcnow_iso(), user_id)).lastrowid


def list_keys(conn: sqlite3.Connection, q: KeysQuery) -> CacheKeys:
    where, args = ["1"], []
    for column, value in (("bucket", q.bucket), ("route", q.route)):
        if value:
            where.append(f"{column} = ?")
            args.append(value)
    if q.prefix:
        where.append("key_hash LIKE ?")
        args.append(q.prefix + "%")
    clause = " AND ".join(where)
    total = conn.execute(f"SELECT count(*) FROM cache_entries WHERE {clause}", args).fetchone()[0]
    rows = conn.execute(
        f"SELECT key_hash, bucket, route, scope, partition, size, created_at, expires_at, hits FROM cache_entries "
        f"WHERE {clause} ORDER BY created_at DESC LIMIT ? OFFSET ?", [*args, q.limit, q.offset]).fetchall()
    return CacheKeys(total=total, keys=[CacheKey(key_hash=r[0], bucket=r[1], route=r[2], scope=r[3], partition=r[4],
                                                 size=r[5], created_at=r[6], expires_at=r[7], hits=r[8]) for r in rows])


@api.get("/api/cache/stats", summary="Hits, misses, stale answers, keys, bytes, bytes saved and evictions per cache "
         "route and bucket (api, images)",
         access=ADMIN, query=StatsQuery, response=CacheStats)
async def get_cache_stats(request: web.Request, call: Call) -> CacheStats:
    return await query(request.app, cache_stats, call.query.hours)


@api.post("/api/cache/flush", summary="Flush the cache: everything, a bucket, a route, a key prefix, or one URL",
          access=ADMIN, body=FlushRequest, response=FlushQueued, status=202)
async def post_cache_flush(request: web.Request, call: Call) -> FlushQueued:
    body: FlushRequest = call.body
    request_id = await query(request.app, queue_flush, body.target, body.value, call.user.user_id)
    return FlushQueued(id=request_id, target=body.target, value=body.value)


@api.get("/api/cache/keys", summary="Cached entries (hashed keys; no URLs), newest first", access=ADMIN,
         query=KeysQuery, response=CacheKeys)
async def get_cache_keys(request: web.Request, call: Call) -> CacheKeys:
    return await query(request.app, list_keys, call.query)
