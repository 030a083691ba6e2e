"""Issue 16 case 2: every upstream exchange of a route has connect, first-byte and idle timeouts.

Through the embedded proxy's real reverse listener, against an aiohttp origin that hangs on
command: forwarded uncached requests get a 504 in Plex's format within the timeout, a route
overrides its upstream's timeouts, a body that stalls midway is cut off by the idle timeout, and
with a stale entry usable the client gets it within `stale_timeout` while the fetch goes on for
the cache."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest
from aiohttp import web

from support import HangingUpstream, UnknownTokenPlexTv, free_port, start_embedded_proxy, timed_get

TOKEN = "X-Plex-Token=t-old-client"


class HangingOrigin(HangingUpstream):
    def __init__(self) -> None:
        super().__init__()
        self.body = "v1"

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if request.path == "/stall-body" or request.path.startswith("/library/metadata/stall"):
            response = web.StreamResponse(headers={"Content-Type": "application/xml"})
            response.content_length = 100
            await response.prepare(request)
            await response.write(b"<MediaContainer")
            await self.hang(60)
            return response
        await self.hang(self.delay)
        if request.path == "/identity":
            return web.Response(text='<MediaContainer machineIdentifier="x"/>', content_type="application/xml")
        if request.path == "/3/search/movie":
            return web.json_response({"page": 1, "results": [{"title": self.body}]})
        return web.Response(status=404)


def timeouts_edit(rules: dict) -> None:
    rules["proxy"]["stale_timeout"] = 0.5
    rules["upstreams"]["plex"]["timeouts"] = {"connect": 2, "first_byte": 3, "idle": 1}
    rules["upstreams"]["tmdb"]["timeouts"] = {"first_byte": 3}
    rules["upstreams"]["tmdb-images"]["timeouts"] = {"first_byte": 3}
    for route in rules["routes"]:
        if route["name"] == "plex.identity":
            route["timeouts"] = {"first_byte": 1}
        if route["name"] == "tmdb.search":
            route["cache"] = dict(route["cache"], ttl=1, stale_while_revalidate=0)


@pytest.fixture
async def setup(tmp_path):
    async with HangingOrigin() as origin, UnknownTokenPlexTv() as plextv:
        port = free_port()
        proxy = await start_embedded_proxy(tmp_path, [f"plex={origin.url}", f"plextv={plextv.url}",
                                                      f"tmdb={origin.url}", f"tmdb-images={origin.url}"],
                                           timeouts_edit, plex_listen=port)
        origin.proxy_url = f"http://127.0.0.1:{proxy.ports['regular']}"
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as client:
                yield origin, f"http://127.0.0.1:{port}", client
        finally:
            origin.released.set()
            await proxy.stop()


async def test_hung_origin_gets_a_504_in_plex_format_within_the_route_timeout(setup):
    origin, base, client = setup
    status, _, _, _ = await timed_get(client, f"{base}/identity")
    assert status == 200
    origin.delay = 90
    status, body, headers, took = await timed_get(client, f"{base}/identity")
    assert status == 504 and took < 4, (status, took)  # the route's first_byte: 1 s (the upstream says 3)
    assert headers["Content-Type"].startswith("text/html") and b"504 Gateway Timeout" in body
    # Another route of the same upstream: the upstream's 3 s.
    status, _, _, took = await timed_get(client, f"{base}/library/metadata/42/children?{TOKEN}")
    assert status == 504 and 2.5 < took < 8, (status, took)


async def test_a_body_that_stalls_is_cut_off_by_the_idle_timeout(setup):
    _, base, client = setup
    status, _, _, took = await timed_get(client, f"{base}/library/metadata/stall?{TOKEN}")
    assert status == 504 and took < 5, (status, took)


async def test_stale_within_stale_timeout_while_the_fetch_goes_on_for_the_cache(setup):
    origin, base, client = setup
    # TMDB search through the explicit proxy: shared answers, stale_if_error a day.
    url, via = "http://api.themoviedb.org/3/search/movie?query=matrix", {"proxy": origin.proxy_url}
    status, body, _, _ = await timed_get(client, url, **via)
    assert status == 200 and b"v1" in body
    await asyncio.sleep(1.3)  # past the 1 s ttl: stale, usable for stale_if_error
    origin.delay, origin.body = 2.0, "v2"  # slow, under the 3 s first-byte timeout
    status, body, headers, took = await timed_get(client, url, **via)
    assert status == 200 and b"v1" in body and took < 1.8, (status, took)
    assert "stale-timeout" in headers.get("Cache-Status", "")
    await asyncio.sleep(1.8)  # the background fetch has answered (at ~2 s) and been stored
    origin.delay = 90
    status, body, headers, took = await timed_get(client, url, **via)
    assert status == 200 and b"v2" in body and took < 1.8, (status, body, headers)


async def test_a_hung_tmdb_gets_a_504_in_tmdb_format(setup):
    origin, _, client = setup
    origin.delay = 90
    started = time.monotonic()
    async with client.get("http://api.themoviedb.org/3/movie/550", proxy=origin.proxy_url) as r:
        body = await r.json(content_type=None)
    took = time.monotonic() - started
    assert r.status == 504 and took < 8, (r.status, took)
    assert body["status_code"] == 24 and body["success"] is False  # TMDB's "backend server timed out"


async def test_a_hung_image_origin_gets_a_504_within_the_upstreams_timeout(setup):
    """The image cache fetches for itself: with the upstream's timeouts (first byte 3 s here), not
    the 15 s proxy.upstream_timeout it used to wait whatever the rules said."""
    origin, _, client = setup
    origin.delay = 90
    status, body, headers, took = await timed_get(client, "http://image.tmdb.org/t/p/w342/hung.jpg",
                                                  proxy=origin.proxy_url, headers={"Accept": "image/webp,*/*"})
    assert status == 504 and 2.5 < took < 8, (status, took, body)
    assert "fwd-status=504" in headers.get("Cache-Status", ""), headers


async def test_an_image_the_image_cache_leaves_alone_is_forwarded_with_the_timeouts(setup):
    """An image of an account the proxy does not know is not the image cache's to store: it is
    forwarded, within the upstream's timeouts (it used to wait as long as the origin liked)."""
    origin, base, client = setup
    origin.delay = 90
    status, body, headers, took = await timed_get(client, f"{base}/library/metadata/42/thumb/1700000000?{TOKEN}",
                                                  headers={"Accept": "image/webp,*/*"})
    assert status == 504 and 2.5 < took < 8, (status, took, body)
    assert headers["Cache-Status"] == "Projectionist; fwd=bypass; fwd-status=504; detail=unknown-user", headers
