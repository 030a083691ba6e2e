"""Issue 16 case 3: request bodies over the route's limit are refused from Content-Length before
they are read (10 concurrent 100 MB POSTs move RSS by < 20 MB), chunked ones are cut off at the
limit; bodies under it still reach the upstream. Through the real reverse listener."""

from __future__ import annotations

import asyncio

import aiohttp
import psutil
import pytest
from aiohttp import web

from support import LocalUpstream, free_port, start_embedded_proxy

MB = 1_000_000


class Plex(LocalUpstream):
    def __init__(self) -> None:
        super().__init__()
        self.received: list[int] = []

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.received.append(len(body))
        return web.Response(text="<MediaContainer/>", content_type="application/xml")


def limits(rules: dict) -> None:
    rules["proxy"]["max_request_body"] = "1MB"
    for route in rules["routes"]:
        if route["name"] == "plex.play-queues":
            route["max_body"] = "64KB"
            route["credentials"] = "none"  # the test has no Plex token


@pytest.fixture
async def setup(tmp_path):
    async with Plex() as up:
        port = free_port()
        proxy = await start_embedded_proxy(tmp_path, [f"plex={up.url}", f"plextv={up.url}"], limits, plex_listen=port)
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as client:
                yield up, f"http://127.0.0.1:{port}", client
        finally:
            await proxy.stop()


async def zeros(total: int, chunk: int = 256 * 1024):
    block = bytes(chunk)
    sent = 0
    while sent < total:
        yield block[: min(chunk, total - sent)]
        sent += chunk


async def post(client, url: str, size: int, chunked: bool = False) -> int | str:
    headers = {} if chunked else {"Content-Length": str(size)}
    try:
        async with client.post(url, data=zeros(size), headers=headers) as r:
            await r.read()
            return r.status
    except aiohttp.ClientError as exc:
        return type(exc).__name__


async def test_ten_100_mb_posts_are_refused_from_content_length(setup):
    up, base, client = setup
    rss = psutil.Process().memory_info().rss
    results = await asyncio.gather(*(post(client, f"{base}/identity", 100 * MB) for _ in range(10)))
    grew = (psutil.Process().memory_info().rss - rss) / MB
    print(f"10 x 100 MB POSTs: {results}, RSS +{grew:.1f} MB")
    assert all(r == 413 or r in ("ClientOSError", "ServerDisconnectedError") for r in results), results
    assert results.count(413) >= 1, results
    assert grew < 20, grew
    assert up.received == []  # nothing reached the upstream


async def test_route_limit_and_a_body_under_it(setup):
    up, base, client = setup
    assert await post(client, f"{base}/playQueues?type=video", 100_000) in (413, "ClientOSError")
    assert await post(client, f"{base}/playQueues?type=video", 10_000) == 200
    assert up.received == [10_000]


async def test_chunked_body_is_cut_off_at_the_limit(setup):
    up, base, client = setup
    result = await asyncio.wait_for(post(client, f"{base}/identity", 20 * MB, chunked=True), 30)
    assert result != 200, result
    await asyncio.sleep(0.5)
    assert up.received == [], up.received  # the upstream saw an aborted request, never a whole one
    assert await post(client, f"{base}/identity", 500_000, chunked=True) == 200  # under the limit
    assert up.received == [500_000]
