"""Issue 15: never a self-inflicted 429 to a person browsing, with the SHIPPED limits.

Through the real (embedded) proxy, the shipped rules.yaml (`tmdb-default` 2/s burst 20 on the
server's key shared by everyone, `tmdb-default-client` 1/s burst 30 per browser with `over:
yield`), a local TMDB. Each "person" is a browser of its own: its own loopback address
(127.0.0.x), which is how the proxy tells browsers apart for TMDB (the player sends no client
identifier there). A person opens a details page (its ~6 TMDB requests at once), reads it, types a
search letter by letter, reads, and opens another details page: every request a distinct cache
miss, so what is measured is the limiter, not the cache.
"""

from __future__ import annotations

import asyncio
import itertools
import sqlite3
import time

import aiohttp
import pytest
import yaml
from aiohttp import web

from support import REPO, LocalUpstream, start_embedded_proxy

SHIPPED = yaml.safe_load((REPO / "rules.yaml").read_text())["limits"]
MAX_WAIT = SHIPPED["tmdb-default"]["max_wait"]
DETAILS_PARTS = ("", "/credits", "/recommendations", "/similar", "/videos", "/images?include_image_language=en%2Cnull")
THINK = 5.0  # seconds a person reads a page
FLOOD_SENDERS = 10  # concurrent requests of the flooding client, each sent as the last one returns


class Tmdb(LocalUpstream):
    def __init__(self) -> None:
        super().__init__()
        self.received: list[tuple[float, str]] = []

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.received.append((time.monotonic(), request.path))
        await asyncio.sleep(0.02)
        return web.json_response({"id": 1, "path": request.path})


class Browser:
    """One client identity: its own source address."""

    def __init__(self, address: str, proxy_port: int) -> None:
        self.proxy = f"http://127.0.0.1:{proxy_port}"
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=(address, 0), limit=50))
        self.results: list[tuple[int, float, dict]] = []  # status, seconds, headers

    async def get(self, path: str) -> int:
        started = time.monotonic()
        async with self.session.get(f"http://api.themoviedb.org{path}", proxy=self.proxy,
                                    headers={"Origin": "http://player.example", "Authorization": "Bearer x"}) as r:
            await r.read()
            self.results.append((r.status, time.monotonic() - started, dict(r.headers)))
            return r.status

    async def close(self) -> None:
        await self.session.close()


async def person(browser: Browser, n: int) -> None:
    async def details(movie: int) -> None:
        await asyncio.gather(*(browser.get(f"/3/movie/{movie}{part}") for part in DETAILS_PARTS))

    await details(1000 + 10 * n)
    await asyncio.sleep(THINK)
    word = ("matrix", "dune", "arrival")[n]
    for typed in range(1, 5):  # typed letter by letter: a request per keystroke
        await browser.get(f"/3/search/multi?query={word[:typed]}&page=1")
        await asyncio.sleep(0.3)
    await asyncio.sleep(THINK)
    await details(1001 + 10 * n)


async def flood(browser: Browser, stop: asyncio.Event) -> None:
    counter = itertools.count()

    async def sender() -> None:
        while not stop.is_set():
            if await browser.get(f"/3/movie/{90000 + next(counter)}") == 429:
                await asyncio.sleep(0.25)  # a flood ignores Retry-After (at ~40 req/s, not loopback speed)

    await asyncio.gather(*(sender() for _ in range(FLOOD_SENDERS)))


def rate_limit_events(home) -> dict[str, tuple[int, float]]:
    conn = sqlite3.connect(home / "projectionist.db")
    try:
        return {outcome: (n, waited) for outcome, n, waited in conn.execute(
            "SELECT outcome, count(*), max(waited_ms) FROM rate_limit_events GROUP BY outcome")}
    finally:
        conn.close()


async def start(tmp_path, tmdb: Tmdb):
    return await start_embedded_proxy(tmp_path, [f"tmdb={tmdb.url}"])


def assert_people_served(people: list[Browser]) -> None:
    for n, browser in enumerate(people):
        statuses = [status for status, *_ in browser.results]
        assert statuses == [200] * 16, (n, statuses)
        longest = max(seconds for _, seconds, _ in browser.results)
        assert longest < MAX_WAIT + 0.5, (n, longest)  # queued at most max_wait, plus the answer


async def wait_for_rows(home, outcome: str) -> dict:
    for _ in range(50):  # the writer commits every 50-100 ms
        events = rate_limit_events(home)
        if outcome in events:
            return events
        await asyncio.sleep(0.1)
    return rate_limit_events(home)


def test_shipped_limits_are_the_ones_described():
    assert SHIPPED["tmdb-default"]["burst"] >= 18  # three details pages at once go out at once
    assert SHIPPED["tmdb-default-client"].get("over") == "yield"


async def test_three_people_browsing_at_once_queue_briefly_and_are_never_refused(tmp_path):
    async with Tmdb() as tmdb:
        proxy = await start(tmp_path, tmdb)
        people = [Browser(f"127.0.0.{2 + n}", proxy.ports["regular"]) for n in range(3)]
        try:
            await asyncio.gather(*(person(b, n) for n, b in enumerate(people)))
            events = await wait_for_rows(tmp_path, "queued")
        finally:
            for b in people:
                await b.close()
            await proxy.stop()
    assert_people_served(people)
    assert len(tmdb.received) == 3 * 16  # distinct misses, each fetched once
    assert "refused" not in events, events
    assert events.get("queued", (0, 0))[1] < MAX_WAIT * 1000, events  # the longest queue wait
    print("three people:", events)


async def test_a_flooding_client_gets_429s_with_retry_after_while_people_get_200s(tmp_path):
    async with Tmdb() as tmdb:
        proxy = await start(tmp_path, tmdb)
        port = proxy.ports["regular"]
        flooder = Browser("127.0.0.9", port)
        people = [Browser(f"127.0.0.{2 + n}", port) for n in range(3)]
        stop = asyncio.Event()
        try:
            flooding = asyncio.create_task(flood(flooder, stop))
            # Its first 30 are a person's cold session as far as anyone can tell (its own burst):
            # they spend the shared key's burst and queue, as a person's would. Past them it yields.
            await asyncio.sleep(18)
            started = time.monotonic()
            sent_before = len(flooder.results)
            await asyncio.gather(*(person(b, n) for n, b in enumerate(people)))
            people_seconds = time.monotonic() - started
            stop.set()
            await flooding
            events = await wait_for_rows(tmp_path, "refused")
        finally:
            for b in (flooder, *people):
                await b.close()
            await proxy.stop()
    assert_people_served(people)
    during = flooder.results[sent_before:]
    flood_rate, person_rate = len(during) / people_seconds, 16 / people_seconds
    assert flood_rate >= 10 * person_rate, (flood_rate, person_rate)
    refused = [headers for status, _, headers in flooder.results if status == 429]
    assert refused and all(int(h["Retry-After"]) >= 1 for h in refused)
    assert all(status in (200, 429) for status, *_ in flooder.results)
    assert events["refused"][0] == len(refused)
    print(f"flood {flood_rate:.0f} req/s ({len(refused)} refused), a person {person_rate:.1f} req/s:", events)


pytestmark = pytest.mark.e2e
