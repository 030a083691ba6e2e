"""The response cache's shared tier (projectionist/shared_tier.py), end to end: real proxy processes
(`python -m launcher proxy`, each with its own home) pointed at one real `redis-server`, a local
TMDB-shaped upstream that counts what reaches it, and clients through each proxy's explicit
listener. What one process fetched is a hit through another; 200 identical cold requests spread
over four processes reach the upstream once; an image variant is fetched and encoded once for all; a flush applied by one process reaches the others; a
leader killed mid-fetch is taken over; a dead Redis leaves every process serving on its own."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import io
import shutil
import signal
import sqlite3
import sys
import time

import aiohttp
import pytest
import redis
from aiohttp import web

from _stack import ProxyProcess, RedisServer
from support import LocalUpstream

pytestmark = [pytest.mark.e2e]

MOVIE = "http://api.themoviedb.org/3/movie/603"
BODY = b'{"id":603,"title":"The Matrix","release_date":"1999-03-30","runtime":136}'


def _poster() -> bytes:
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (342, 513), (20, 40, 60))
    draw = ImageDraw.Draw(image)
    for i in range(0, 513, 9):
        draw.line([(0, i), (342, 513 - i)], fill=(200, 120 + i % 100, 40), width=3)
    out = io.BytesIO()
    image.save(out, "JPEG", quality=92)
    return out.getvalue()


POSTER = _poster()


class CountingUpstream(LocalUpstream):
    """TMDB on 127.0.0.1: answers every /3/ path with a movie (`body`) after `delay`, and every
    image.tmdb.org path with a real JPEG poster, counting requests."""

    def __init__(self, body: bytes = BODY) -> None:
        super().__init__()
        self.paths: list[str] = []
        self.times: list[float] = []  # time.monotonic() of each request, beside `paths`
        self.delay = 0.0
        self.body = body

    async def handle(self, request: web.Request) -> web.Response:
        self.paths.append(request.path)
        self.times.append(time.monotonic())
        await asyncio.sleep(self.delay)
        if request.path.startswith("/t/p/"):  # image.tmdb.org: a real JPEG poster
            return web.Response(body=POSTER, content_type="image/jpeg")
        return web.Response(body=self.body, content_type="application/json")


@contextlib.contextmanager
def proxies(count: int, upstream: str, redis_url: str, log_level: str | None = None):
    """`count` proxy processes, TMDB sent to `upstream`, sharing `redis_url`."""
    def edit(rules: dict) -> None:
        rules["proxy"]["redis_url"] = redis_url
    started: list[ProxyProcess] = []
    try:
        for _ in range(count):
            started.append(ProxyProcess({"tmdb": upstream, "tmdb-images": upstream}, edit, log_level=log_level).start())
        yield started
    finally:
        for proxy in started:
            proxy.stop()
            proxy.cleanup()


async def get(session: aiohttp.ClientSession, proxy: ProxyProcess, url: str = MOVIE) -> tuple[int, str, bytes]:
    async with session.get(url, params={"api_key": "x"}, proxy=proxy.proxy_url,
                           timeout=aiohttp.ClientTimeout(total=30)) as r:
        return r.status, r.headers.get("Cache-Status", ""), await r.read()


def flush_requested(proxy: ProxyProcess, target: str, value: str | None) -> int:
    """A flush as the control plane asks it: a row in the proxy's cache_flush_requests."""
    with contextlib.closing(sqlite3.connect(proxy.db_path, timeout=10)) as conn, conn:
        return conn.execute("INSERT INTO cache_flush_requests (target, value, requested_at) VALUES (?, ?, ?)",
                            (target, value, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))).lastrowid


def wait_applied(proxy: ProxyProcess, request_id: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    with contextlib.closing(sqlite3.connect(proxy.db_path, timeout=10)) as conn:
        while conn.execute("SELECT applied_at FROM cache_flush_requests WHERE id = ?", (request_id,)).fetchone()[0] is None:
            assert time.monotonic() < deadline, "the flush request was not applied"
            time.sleep(0.1)


async def test_what_one_process_fetched_is_a_hit_through_another_and_a_flush_reaches_both(redis_server):
    redis.Redis.from_url(redis_server.url).flushdb()
    async with CountingUpstream() as upstream, aiohttp.ClientSession() as session:
        with proxies(2, upstream.url, redis_server.url) as (a, b):
            status, cache_status, body = await get(session, a)
            assert (status, body) == (200, BODY) and "fwd=uri-miss" in cache_status and "stored" in cache_status
            for _ in range(3):  # B never fetched it: Redis has it
                status, cache_status, body = await get(session, b)
                assert (status, body) == (200, BODY) and "; hit;" in cache_status, cache_status
            assert upstream.paths == ["/3/movie/603"]
            assert redis.Redis.from_url(redis_server.url).keys("projectionist:cache:e:tmdb.details|shared|*")

            # The flush is asked of A (its control plane); B drops its own copy too.
            wait_applied(a, flush_requested(a, "route", "tmdb.details"))
            await asyncio.sleep(0.5)  # the published flush reaches B
            assert not redis.Redis.from_url(redis_server.url).keys("projectionist:cache:e:tmdb.details|*")
            status, cache_status, _ = await get(session, b)
            assert status == 200 and "fwd=uri-miss" in cache_status and "detail=flushed" in cache_status, cache_status
            assert len(upstream.paths) == 2
            assert not a.logged_errors() and not b.logged_errors()


async def test_a_stale_entry_is_refreshed_by_one_process_for_all(redis_server):
    """Stale-while-revalidate across processes: both serve the stale entry at once, one of them
    refreshes it upstream, and the other then answers the refreshed entry without asking again."""
    redis.Redis.from_url(redis_server.url).flushdb()

    def short_ttl(rules: dict) -> None:
        rules["proxy"]["redis_url"] = redis_server.url
        for route in rules["routes"]:
            if route["name"] == "tmdb.details":
                route["cache"] = {**route["cache"], "ttl": 2, "stale_while_revalidate": 120}
    async with CountingUpstream() as upstream, aiohttp.ClientSession() as session:
        with contextlib.ExitStack() as stack:
            a, b = (stack.enter_context(ProxyProcess({"tmdb": upstream.url}, short_ttl)) for _ in range(2))
            assert (await get(session, a))[0] == 200 and "; hit;" in (await get(session, b))[1]
            await asyncio.sleep(2.3)  # stale now, inside stale_while_revalidate
            stale = await asyncio.gather(get(session, a), get(session, b))
            assert all(status == 200 and "fwd=stale" in cs for status, cs, _ in stale), (stale, upstream.paths, [p.log_tail(15) for p in (a, b)])
            await asyncio.sleep(0.5)  # the refresh lands
            fresh = await asyncio.gather(get(session, a), get(session, b))
            assert all(status == 200 and "; hit;" in cs for status, cs, _ in fresh), fresh
            assert len(upstream.paths) == 2, upstream.paths  # the first fetch and one refresh


def _explain_fetches(cluster: list[ProxyProcess], upstream: CountingUpstream, sent: float, answers) -> None:
    """On stderr (pytest shows it whole with the failure): when each upstream fetch came, every
    process's Cache-Status tally and its log lines about the cache, Redis and errors."""
    print("upstream fetches at", [round(t - sent, 3) for t in upstream.times], file=sys.stderr)
    for index, proxy in enumerate(cluster):
        mine = [_outcome(a[1]) for i, a in enumerate(answers) if i % len(cluster) == index]
        print(f"--- process {index}: {collections.Counter(mine)}", file=sys.stderr)
        for line in proxy.log_tail(100_000).splitlines():
            if any(word in line for word in ("shared", "redis", "Redis", '"warning"', '"error"', "cache")) and (
                    "MAINT_NOTIFICATIONS" not in line):  # redis-py's handshake with a Redis older than 8
                print(line[:400], file=sys.stderr)


def _outcome(cache_status: str) -> str:
    return ("stored" if "stored" in cache_status else "collapsed" if "collapsed" in cache_status
            else "hit" if "; hit" in cache_status else cache_status)


async def test_200_identical_cold_requests_over_four_processes_reach_the_upstream_once(redis_server):
    redis.Redis.from_url(redis_server.url).flushdb()
    async with CountingUpstream() as upstream, aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0)) as session:
        upstream.delay = 0.5
        # DEBUG: a failure shows each process's dealings with Redis (a late reply, a PING).
        with proxies(4, upstream.url, redis_server.url, log_level="DEBUG") as cluster:
            sent = time.monotonic()
            answers = await asyncio.gather(*(get(session, cluster[i % 4]) for i in range(200)))
            assert [a[0] for a in answers] == [200] * 200 and all(a[2] == BODY for a in answers)
            if upstream.paths != ["/3/movie/603"]:
                _explain_fetches(cluster, upstream, sent, answers)
            assert upstream.paths == ["/3/movie/603"], [t - sent for t in upstream.times]
            # One answer is the leader's fetch; every other one waited for it (collapsed) or, once
            # it was stored, found the entry (a hit, when a request came late on a slow machine).
            outcomes = [_outcome(a[1]) for a in answers]
            assert outcomes.count("stored") == 1, outcomes
            assert outcomes.count("collapsed") + outcomes.count("hit") == 199, outcomes
            assert outcomes.count("collapsed") >= 100, outcomes
            for proxy in cluster:
                assert not proxy.logged_errors()


async def test_image_variants_are_encoded_once_for_every_process(redis_server):
    """A poster asked through both processes at once is fetched and re-encoded once; what B serves
    is A's WebP, byte for byte; a flush of the images bucket asked of B empties A too."""
    redis.Redis.from_url(redis_server.url).flushdb()
    async with CountingUpstream() as upstream, aiohttp.ClientSession() as session:
        upstream.delay = 0.3

        async def poster(proxy: ProxyProcess, path: str) -> tuple[int, str, str, bytes]:
            async with session.get(f"http://image.tmdb.org{path}", proxy=proxy.proxy_url,
                                   headers={"Accept": "image/avif,image/webp,image/*,*/*;q=0.8"},
                                   timeout=aiohttp.ClientTimeout(total=30)) as r:
                return r.status, r.headers.get("Content-Type", ""), r.headers.get("Cache-Status", ""), await r.read()

        with proxies(2, upstream.url, redis_server.url) as (a, b):
            path = "/t/p/w342/pB8BM7pdSp6B6Ih7QZ4DrQ3PmJK.jpg"
            answers = await asyncio.gather(*(poster((a, b)[i % 2], path) for i in range(20)))
            assert {(status, kind) for status, kind, _, _ in answers} <= {(200, "image/webp"), (200, "image/avif")}, \
                {(status, kind, cs) for status, kind, cs, _ in answers}
            assert len({body for *_, body in answers}) == 1 and len(answers[0][3]) < len(POSTER)
            assert upstream.paths == [path]
            status, _, cache_status, body = await poster(b, path)
            assert status == 200 and "; hit;" in cache_status and body == answers[0][3], cache_status

            wait_applied(b, flush_requested(b, "bucket", "images"))
            await asyncio.sleep(0.5)
            assert not redis.Redis.from_url(redis_server.url).keys("projectionist:images:e:*")
            status, _, cache_status, _ = await poster(a, path)
            assert status == 200 and "fwd=uri-miss" in cache_status, cache_status
            assert upstream.paths == [path, path]
            assert not a.logged_errors() and not b.logged_errors()


async def test_a_leader_killed_mid_fetch_is_taken_over(redis_server):
    redis.Redis.from_url(redis_server.url).flushdb()
    async with CountingUpstream() as upstream, aiohttp.ClientSession() as session:
        upstream.delay = 2.0
        with proxies(2, upstream.url, redis_server.url) as (a, b):
            leader = asyncio.ensure_future(get(session, a))
            while not upstream.paths:
                await asyncio.sleep(0.02)
            started = time.monotonic()
            follower = asyncio.ensure_future(get(session, b))
            await asyncio.sleep(0.3)
            a.proc.send_signal(signal.SIGKILL)  # the leader's process dies mid-fetch
            status, cache_status, body = await follower
            took = time.monotonic() - started
            assert (status, body) == (200, BODY), cache_status
            assert len(upstream.paths) == 2  # B fetched it once A's lock lapsed
            assert took < 3.0 + 2.0 + 2.0, took  # lock lapse + the fetch, with slack for a busy machine
            with contextlib.suppress(aiohttp.ClientError):
                await leader


async def test_a_dead_redis_leaves_each_process_its_own_cache_and_sharing_resumes(tmp_path):
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (.ci/run installs it)")
    server = RedisServer().__enter__()
    try:
        async with CountingUpstream() as upstream, aiohttp.ClientSession() as session:
            with proxies(2, upstream.url, server.url) as (a, b):
                assert (await get(session, a, MOVIE))[0] == 200
                server.__exit__()  # Redis dies
                other = "http://api.themoviedb.org/3/movie/604"
                first = await asyncio.wait_for(get(session, a, other), 10)
                again = await asyncio.wait_for(get(session, a, other), 10)
                through_b = await asyncio.wait_for(get(session, b, other), 10)
                assert [first[0], again[0], through_b[0]] == [200, 200, 200]
                assert "; hit;" in again[1] and "fwd=uri-miss" in through_b[1]  # A's own cache; B on its own
                assert upstream.paths.count("/3/movie/604") == 2
                warnings = [line for line in a.log_path.read_text().splitlines() if "shared cache (Redis) failed" in line]
                assert 1 <= len(warnings) <= 2, warnings  # said once (per 30 s), not per request

                server.__enter__()  # Redis is back, empty, at the same address
                await asyncio.sleep(5.5)  # past shared_tier.RETRY_AFTER
                third = "http://api.themoviedb.org/3/movie/605"
                assert (await get(session, a, third))[0] == 200
                await asyncio.sleep(0.3)
                status, cache_status, _ = await get(session, b, third)
                assert status == 200 and "; hit;" in cache_status, cache_status
                assert upstream.paths.count("/3/movie/605") == 1
    finally:
        server.__exit__()


async def test_a_users_entries_are_shared_only_by_processes_of_the_same_database(redis_server):
    """Users are numbered per database: user 3 of one is not user 3 of another, so only processes
    sharing a database share a user's entries; "shared" entries are everyone's. The codec keeps
    every field (the image cache's subclass included)."""
    from projectionist.cache_store import Entry
    from projectionist.images import ImageEntry
    from projectionist.shared_tier import SharedTier

    redis.Redis.from_url(redis_server.url).flushdb()
    here, same_db, other_db = (SharedTier(redis_server.url, 1_000_000, db) for db in ("db-a", "db-a", "db-b"))
    try:
        mine = Entry(status=200, headers=[(b"content-type", b"application/json")], body=b'{"MediaContainer":{}}',
                     stored_at=time.time(), ttl=60, stale_while_revalidate=0, stale_if_error=600,
                     route="plex.library.all", partition="u3", uri="f" * 64)
        public = Entry(**{**mine.__dict__, "partition": "shared", "route": "tmdb.details"})
        assert await here.put("k1", mine) and await here.put("k2", public)
        assert await same_db.get("k1", mine.route, "u3", mine.uri) == mine
        assert await other_db.get("k1", mine.route, "u3", mine.uri) is None
        assert await other_db.get("k2", public.route, "shared", public.uri) == public
        assert await other_db.delete_where(partition="u3") == 0  # another database's user 3: not this one
        assert await here.delete_where(partition="u3") == 1 and await same_db.get("k1", mine.route, "u3", mine.uri) is None

        variant = ImageEntry(status=200, headers=[("Content-Type", "image/webp")], body=b"RIFF....WEBP",
                             stored_at=time.time(), ttl=3600, stale_while_revalidate=0, stale_if_error=0,
                             route="tmdb.image", partition="shared", content_type="image/webp", etag='"abc"',
                             source_size=9000, width=342, height=513, body_size=12)
        assert await here.put("k3", variant)
        assert await other_db.get("k3", "tmdb.image", "shared", "", ImageEntry) == variant
        oversized = Entry(**{**public.__dict__, "body": b"x" * 1_000_001})
        assert not await here.put("k4", oversized)  # over shared_max_body_bytes: stays local
    finally:
        for tier in (here, same_db, other_db):
            await tier.close()


async def test_a_late_reply_from_a_redis_that_still_answers_is_no_outage(redis_server):
    """A reply later than the socket timeout from a Redis that answers a PING (Redis paused a
    moment, or, under load, this process's event loop busy past the timeout while the reply waits
    in the socket): that command fails, the shared tier stays. Were it dropped, every process
    would fetch a cold key on its own."""
    from projectionist.shared_tier import SharedTier

    tier = SharedTier(redis_server.url, 1 << 20, "db")
    try:
        assert await tier.call(tier.client.ping)  # connected
        # Longer than the command's two tries (its one retry included) of 0.5 s each.
        redis.Redis.from_url(redis_server.url).execute_command("CLIENT", "PAUSE", 1300, "ALL")
        assert await tier.call(lambda: tier.client.set("projectionist:test:late", "1"), failed="late") == "late"
        await asyncio.sleep(1.0)  # the PING that checks it, answered once the pause ends
        assert tier.available()
        assert await tier.lead("late-key") is True
    finally:
        await tier.close()


async def test_a_redis_that_stops_answering_takes_the_tier_away():
    """A Redis that accepts connections but answers nothing (a hung server): the late replies are
    confirmed by a PING that gets no answer either, and the process goes on alone."""
    from projectionist.shared_tier import CONFIRM_TIMEOUT, SharedTier

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1 << 16)
        await asyncio.sleep(60)
    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    tier = SharedTier(f"redis://127.0.0.1:{port}/0", 1 << 20, "db")
    try:
        assert await tier.lead("key") is False  # no reply in time: not this process's lock
        deadline = time.monotonic() + CONFIRM_TIMEOUT + 2
        while tier.available():
            assert time.monotonic() < deadline, "a Redis that answers nothing still counts as up"
            await asyncio.sleep(0.05)
        assert await tier.lead("key") is None  # Redis is down: fetch locally
    finally:
        await tier.close()
        server.close()


async def test_a_late_reply_to_the_flush_listener_is_no_outage_and_it_subscribes_again(redis_server):
    """The flush listener subscribes while Redis is paused (or while its process is too busy to
    read the reply: the last worker to start, as the first requests arrive): the tier stays, and
    the listener subscribes again in a moment, so another process's flushes still reach it."""
    from projectionist.shared_tier import SharedTier

    here, there = SharedTier(redis_server.url, 1 << 20, "db"), SharedTier(redis_server.url, 1 << 20, "db")
    applied: list[tuple[str, str | None]] = []

    async def apply(target: str, value: str | None) -> None:
        applied.append((target, value))
    try:
        redis.Redis.from_url(redis_server.url).execute_command("CLIENT", "PAUSE", 1300, "ALL")
        here.listen_for_flushes(apply)
        await asyncio.sleep(2.5)  # the pause ends; a PING checks the late reply; the listener subscribes
        assert here.available(), "a late reply to the listener took the shared tier away"
        deadline = time.monotonic() + 5
        while not applied:
            assert time.monotonic() < deadline, "the listener did not subscribe again"
            await there.publish_flush("route", "tmdb.details")
            await asyncio.sleep(0.1)
        assert applied[0] == ("route", "tmdb.details")
    finally:
        for tier in (here, there):
            await tier.close()
