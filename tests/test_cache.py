"""The response cache through the real proxy (embedded, as `projectionist proxy` runs it) against a
local upstream whose speed, failures and headers each test controls."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time

import aiohttp
import pytest
from aiohttp import web

from proxy_addons.runner import EmbeddedProxy

from support import LocalUpstream, start_embedded_proxy

TMDB_PATH = "/3/movie/603"


class Upstream(LocalUpstream):
    """Counts requests per path; `delay`, `status` and `cache_control` are per test."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: dict[str, int] = {}
        self.delay = 0.0
        self.status = 200
        self.cache_control: str | None = None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.calls[request.path] = self.calls.get(request.path, 0) + 1
        if self.delay:
            await asyncio.sleep(self.delay)
        headers = {"Access-Control-Allow-Origin": "*"}
        if self.cache_control:
            headers["Cache-Control"] = self.cache_control
        return web.json_response({"path": request.path, "n": self.calls[request.path],
                                  "accept": request.headers.get("Accept", "")}, status=self.status, headers=headers)


def short_ttls(rules: dict) -> None:
    """tmdb.details: fresh 1 s, then stale-while-revalidate for 2 s; stale-if-error for 30 s."""
    for route in rules["routes"]:
        if route["name"] == "tmdb.details":
            route["cache"] = {"ttl": 1, "stale_while_revalidate": 2, "stale_if_error": 30, "scope": "shared",
                              "negative_ttl": 30}
        if route["name"] == "tmdb.search":
            route["cache"] = {"ttl": 1, "stale_if_error": 30, "scope": "shared"}
    rules["proxy"]["upstream_timeout"] = 1


def long_ttls(rules: dict) -> None:
    """short_ttls, but tmdb.details fresh for a minute: for tests whose timing a slow machine stretches."""
    short_ttls(rules)
    for route in rules["routes"]:
        if route["name"] == "tmdb.details":
            route["cache"]["ttl"] = 60


@pytest.fixture
async def upstream():
    async with Upstream() as up:
        yield up


async def start_proxy(tmp_path, upstream: Upstream) -> EmbeddedProxy:
    return await start_embedded_proxy(tmp_path, [f"tmdb={upstream.url}"], short_ttls)


@pytest.fixture
async def proxy(tmp_path, upstream):
    p = await start_proxy(tmp_path, upstream)
    yield p
    await p.stop()


class Client:
    def __init__(self, proxy: EmbeddedProxy) -> None:
        self.proxy_url = f"http://127.0.0.1:{proxy.ports['regular']}"
        self.session = aiohttp.ClientSession()

    async def get(self, path: str, **headers) -> tuple[int, dict, dict]:
        async with self.session.get(f"http://api.themoviedb.org{path}", proxy=self.proxy_url,
                                    headers=headers) as r:
            text = await r.text()
            return r.status, dict(r.headers), (json.loads(text) if text.startswith("{") else text)

    async def close(self) -> None:
        await self.session.close()


@pytest.fixture
async def client(proxy):
    c = Client(proxy)
    yield c
    await c.close()


async def test_miss_then_hit_with_cache_status_and_age(client, upstream):
    status, headers, body = await client.get(TMDB_PATH)
    assert status == 200 and headers["Cache-Status"] == "Projectionist; fwd=uri-miss; fwd-status=200; stored; ttl=1"
    status, headers, again = await client.get(TMDB_PATH)
    assert status == 200 and again == body
    assert headers["Cache-Status"].startswith("Projectionist; hit; ttl=")
    assert int(headers["Age"]) >= 0
    assert upstream.calls[TMDB_PATH] == 1


async def test_credentials_are_not_part_of_the_key(client, upstream):
    await client.get(f"{TMDB_PATH}?api_key=one")
    _, headers, _ = await client.get(f"{TMDB_PATH}?api_key=two")
    assert "hit" in headers["Cache-Status"] and upstream.calls[TMDB_PATH] == 1


async def test_concurrent_identical_misses_make_one_upstream_request(client, upstream):
    upstream.delay = 0.5
    results = await asyncio.gather(*(client.get(TMDB_PATH) for _ in range(100)))
    assert upstream.calls[TMDB_PATH] == 1
    assert all(status == 200 and body["n"] == 1 for status, _, body in results)
    statuses = [headers["Cache-Status"] for _, headers, _ in results]
    assert statuses.count("Projectionist; fwd=uri-miss; fwd-status=200; stored; ttl=1") == 1
    assert statuses.count("Projectionist; fwd=uri-miss; fwd-status=200; collapsed; ttl=1") == 99


async def test_the_fetch_outlives_a_leader_that_disconnects(tmp_path, upstream):
    """Origin at 1 s; the first client gives up at 0.4 s; 100 identical requests meanwhile: still
    one upstream request, every follower answered from it, and the answer stored."""
    def slow_origin(rules: dict) -> None:
        long_ttls(rules)
        rules["proxy"]["upstream_timeout"] = 5
    proxy = await start_embedded_proxy(tmp_path, [f"tmdb={upstream.url}"], slow_origin)
    client = Client(proxy)
    try:
        await _leader_disconnects(client, upstream)
    finally:
        await client.close()
        await proxy.stop()


async def _leader_disconnects(client: Client, upstream: Upstream) -> None:
    upstream.delay = 1.0
    leader = asyncio.ensure_future(client.get(TMDB_PATH))
    await asyncio.sleep(0.1)
    followers = [asyncio.ensure_future(client.get(TMDB_PATH)) for _ in range(100)]
    await asyncio.sleep(0.3)
    leader.cancel()  # the connection closes: the proxy sees its client go away
    results = await asyncio.gather(*followers)
    assert upstream.calls[TMDB_PATH] == 1
    # On a loaded machine a few followers arrive after the answer was stored: hits, not collapsed.
    assert all(status == 200 and body["n"] == 1 and ("collapsed" in headers["Cache-Status"] or
                                                     headers["Cache-Status"].startswith("Projectionist; hit"))
               for status, headers, body in results)
    assert sum("collapsed" in headers["Cache-Status"] for _, headers, _ in results) >= 50
    _, headers, _ = await client.get(TMDB_PATH)
    assert headers["Cache-Status"].startswith("Projectionist; hit") and upstream.calls[TMDB_PATH] == 1


async def test_device_identity_never_splits_a_key(client, upstream):
    await client.get(f"{TMDB_PATH}?X-Plex-Client-Identifier=browser-1&X-Plex-Product=Player")
    _, headers, _ = await client.get(f"{TMDB_PATH}?X-Plex-Client-Identifier=browser-2&X-Plex-Session-Identifier=s2",
                                     **{"X-Plex-Client-Identifier": "browser-2"})
    assert "hit" in headers["Cache-Status"] and upstream.calls[TMDB_PATH] == 1
    _, headers, _ = await client.get(f"{TMDB_PATH}?language=de")  # what is asked for still does
    assert "fwd=uri-miss" in headers["Cache-Status"]


async def test_every_miss_says_why_in_cache_status_and_usage(proxy, client, upstream):
    statuses = []
    for path, setup in [("/3/movie/1", None), ("/3/movie/1", "expire"),
                        ("/3/movie/2", "no-store"), ("/3/movie/2", None),
                        ("/3/movie/3", "500"), ("/3/movie/3", None),
                        ("/3/movie/4", None), ("/3/movie/4", "no-cache"),
                        ("/3/account", None)]:
        headers = {}
        upstream.cache_control, upstream.status = None, 200
        if setup == "expire":
            await asyncio.sleep(3.1)  # past ttl + stale-while-revalidate
        elif setup == "no-store":
            upstream.cache_control = "no-store"
        elif setup == "500":
            upstream.status = 500
        elif setup == "no-cache":
            headers["Cache-Control"] = "no-cache"
        _, response_headers, _ = await client.get(path, **headers)
        statuses.append(response_headers["Cache-Status"])
        await asyncio.sleep(0.5)  # inside TMDB's default-key budget (2/s): no limiter in the way
    expected = [
        "Projectionist; fwd=uri-miss; fwd-status=200; stored; ttl=1",
        "Projectionist; fwd=stale; fwd-status=200; stored; ttl=1; detail=expired",
        "Projectionist; fwd=uri-miss; fwd-status=200",
        "Projectionist; fwd=uri-miss; fwd-status=200; stored; ttl=1; detail=no-store",
        "Projectionist; fwd=uri-miss; fwd-status=500",
        "Projectionist; fwd=uri-miss; fwd-status=200; stored; ttl=1; detail=uncacheable-status",
        "Projectionist; fwd=uri-miss; fwd-status=200; stored; ttl=1",
        "Projectionist; fwd=request; fwd-status=200; stored; ttl=1",
        "Projectionist; fwd=bypass; fwd-status=200; detail=no-rule",
    ]
    assert statuses == expected
    db = tmp_db(proxy)
    for _ in range(100):
        rows = db.execute("SELECT route, cache_reason FROM usage_events ORDER BY id").fetchall()
        if len(rows) == len(expected):
            break
        await asyncio.sleep(0.05)
    assert [reason for _, reason in rows] == [
        "uri-miss", "stale:expired", "uri-miss", "uri-miss:no-store", "uri-miss",
        "uri-miss:uncacheable-status", "uri-miss", "request", "bypass:no-rule"]
    hourly = dict(db.execute("SELECT reason, sum(requests) FROM cache_reason_hourly GROUP BY reason").fetchall())
    assert hourly["uri-miss"] == 4 and hourly["stale:expired"] == 1 and hourly["bypass:no-rule"] == 1


def tmp_db(proxy: EmbeddedProxy) -> sqlite3.Connection:
    return sqlite3.connect(proxy.config.db_path)


async def test_stale_while_revalidate_answers_at_once_and_refreshes_once(client, upstream):
    await client.get(TMDB_PATH)
    await asyncio.sleep(1.1)  # past the 1 s ttl, inside the 2 s stale window
    upstream.delay = 0.5
    started = time.monotonic()
    results = await asyncio.gather(*(client.get(TMDB_PATH) for _ in range(10)))
    assert time.monotonic() - started < 0.4  # nobody waited for the 0.5 s upstream
    assert all("fwd=stale" in headers["Cache-Status"] and body["n"] == 1 for _, headers, body in results)
    await asyncio.sleep(0.8)
    assert upstream.calls[TMDB_PATH] == 2  # exactly one background refresh
    _, headers, body = await client.get(TMDB_PATH)
    assert "hit" in headers["Cache-Status"] and body["n"] == 2


@pytest.mark.parametrize("failure", ["down", "timeout", "500", "429"])
async def test_stale_if_error(client, upstream, failure):
    path = "/3/search/movie?query=matrix"
    await client.get(path)
    await asyncio.sleep(1.1)  # stale (no stale-while-revalidate on search)
    if failure == "down":
        await upstream.stop()
    elif failure == "timeout":
        upstream.delay = 5
    else:
        upstream.status = int(failure)
    started = time.monotonic()
    status, headers, body = await client.get(path)
    assert status == 200 and body["n"] == 1
    assert "fwd=stale" in headers["Cache-Status"] and "stale-if-error" in headers["Cache-Status"]
    assert time.monotonic() - started < 2  # the 1 s upstream deadline, not a hang
    if failure == "down":
        await upstream.start()


async def test_dead_upstream_without_stale_is_a_quick_clean_error(client, upstream):
    upstream.delay = 5
    started = time.monotonic()
    status, headers, _ = await client.get("/3/movie/550")
    assert status == 504 and time.monotonic() - started < 2
    await upstream.stop()
    status, _, _ = await client.get("/3/movie/551")
    assert status == 502
    await upstream.start()


async def test_no_store_and_errors_are_not_cached_but_404_briefly_is(client, upstream):
    upstream.cache_control = "private, max-age=0"
    await client.get("/3/movie/1")
    await client.get("/3/movie/1")
    assert upstream.calls["/3/movie/1"] == 2
    upstream.cache_control, upstream.status = None, 500
    await client.get("/3/movie/2")
    await client.get("/3/movie/2")
    assert upstream.calls["/3/movie/2"] == 2
    upstream.status = 404
    await client.get("/3/movie/3")
    status, headers, _ = await client.get("/3/movie/3")
    assert status == 404 and "hit" in headers["Cache-Status"] and upstream.calls["/3/movie/3"] == 1


async def test_hits_carry_cors_for_the_requesting_origin(client, upstream):
    await client.get(TMDB_PATH)  # stored from a request without Origin
    _, headers, _ = await client.get(TMDB_PATH, Origin="http://player.example")
    assert "hit" in headers["Cache-Status"] and headers["Access-Control-Allow-Origin"] == "*"


async def test_entries_survive_a_restart_and_are_mirrored_without_urls(tmp_path, upstream):
    async def start_proxy(tmp_path, upstream):  # fresh across a (slow) restart
        return await start_embedded_proxy(tmp_path, [f"tmdb={upstream.url}"], long_ttls)
    proxy = await start_proxy(tmp_path, upstream)
    client = Client(proxy)
    await client.get(f"{TMDB_PATH}?api_key=secret-looking-value")
    await client.close()
    await proxy.stop()
    proxy = await start_proxy(tmp_path, upstream)  # a new process would do the same: memory is empty
    client = Client(proxy)
    try:
        for _ in range(50):  # the key index is reloaded in the background at start-up
            _, headers, _ = await client.get(TMDB_PATH)
            if "hit" in headers["Cache-Status"]:
                break
            await asyncio.sleep(0.05)
        assert "hit" in headers["Cache-Status"] and upstream.calls[TMDB_PATH] == 1
    finally:
        await client.close()
        await proxy.stop()
    rows = sqlite3.connect(tmp_path / "projectionist.db").execute(
        "SELECT key_hash, bucket, route, scope, partition, size, hits FROM cache_entries").fetchall()
    assert len(rows) == 1
    key_hash, bucket, route, scope, partition, size, hits = rows[0]
    assert (bucket, route, scope, partition) == ("api", "tmdb.details", "shared", "shared")
    assert len(key_hash) == 64 and size > 0 and hits >= 1
    db_bytes = (tmp_path / "projectionist.db").read_bytes()
    assert b"secret-looking-value" not in db_bytes and b"/3/movie" not in db_bytes


@pytest.mark.parametrize("stored", [
    [],
    [(b"Content-Type", b"application/json")],
    [(b"content-type", b"application/json"), (b"Access-Control-Allow-Origin", b"https://app.plex.tv"),
     (b"Vary", b"Accept-Encoding"), (b"age", b"7"), (b"X-Plex-Protocol", b"1.0"), (b"vary", b"Accept"),
     (b"Cache-Status", b"upstream; hit"), (b"ACCESS-CONTROL-EXPOSE-HEADERS", b"X-Total"), (b"Age", b"8")],
    [(b"Vary", b""), (b"Set-Cookie", b"a=1"), (b"Set-Cookie", b"b=2")],
    [(b"vary", b""), (b"Vary", b"Accept")],
])
@pytest.mark.parametrize("settings", [
    {"Cache-Status": "Projectionist; hit; ttl=3"},
    {"Access-Control-Allow-Origin": "*", "Age": "3", "Cache-Status": "Projectionist; hit; ttl=3"},
    {"Access-Control-Allow-Origin": "https://app.plex.tv", "Vary": "Origin", "Access-Control-Expose-Headers": "*",
     "Age": "0", "Cache-Status": "Projectionist; fwd=uri-miss"},
])
def test_answer_fields_set_headers_as_mitmproxys_headers_would(stored, settings):
    from mitmproxy import http

    from proxy_addons.response_cache import answer_fields

    expected = http.Headers([(k, v) for k, v in stored if k.lower() != b"access-control-allow-origin"])
    for name, value in settings.items():
        if name == "Vary":
            value = ", ".join(filter(None, [expected.get("Vary"), value]))
        expected[name] = value
    assert answer_fields(stored, settings) == list(expected.fields)
