"""Issue 16, the last gap: what mitmproxy forwards itself (streamed routes, requests to no route)
has connect and first-byte timeouts too (proxy_addons/header_timeouts.py).

Through the embedded proxy's real reverse listener and explicit proxy, against an aiohttp origin
that hangs on command: a media part or an unrouted request to a hung origin gets a 504 in the
upstream's format within the first-byte timeout; an origin that accepts no connection gets one
within the connect timeout; a stream whose headers came is never cut, however long its body
pauses (a slow media part, Plex's event stream)."""

from __future__ import annotations

import socket
import time

import aiohttp
import pytest
from aiohttp import web

from support import HangingUpstream, UnknownTokenPlexTv, free_port, start_embedded_proxy, timed_get

TOKEN = "X-Plex-Token=t-old-client"
PART = f"/library/parts/12/1700000000/file.mkv?{TOKEN}"
GAP = 2.5  # between two body chunks: longer than every timeout below


class Origin(HangingUpstream):

    async def handle(self, request: web.Request) -> web.StreamResponse:
        await self.hang(self.delay)
        if request.path == "/:/eventsource/notifications":  # headers at once, then an event now and then
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            for n in range(2):
                await self.hang(GAP)
                await response.write(f"event: ping\ndata: {n}\n\n".encode())
            return response
        if request.path.startswith("/library/parts/"):  # a slow but alive media part
            response = web.StreamResponse(headers={"Content-Type": "video/x-matroska"})
            response.content_length = 3 * 1000
            await response.prepare(request)
            for _ in range(3):
                await response.write(b"m" * 1000)
                await self.hang(GAP)
            return response
        if request.path.startswith("/3/"):
            return web.json_response({"unrouted": True})
        return web.Response(text="<MediaContainer/>", content_type="application/xml")


def timeouts_edit(rules: dict) -> None:
    rules["upstreams"]["plex"]["timeouts"] = {"connect": 1, "first_byte": 2, "idle": 1}
    rules["upstreams"]["tmdb"]["timeouts"] = {"first_byte": 2, "idle": 1}


@pytest.fixture
async def setup(tmp_path):
    async with Origin() as origin, UnknownTokenPlexTv() as plextv:
        port = free_port()
        proxy = await start_embedded_proxy(tmp_path, [f"plex={origin.url}", f"plextv={plextv.url}",
                                                      f"tmdb={origin.url}"], timeouts_edit, plex_listen=port)
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as client:
                yield origin, f"http://127.0.0.1:{port}", f"http://127.0.0.1:{proxy.ports['regular']}", client
        finally:
            origin.released.set()
            await proxy.stop()


async def test_a_media_part_from_a_hung_origin_gets_a_504_within_the_first_byte_timeout(setup):
    origin, base, _, client = setup
    origin.delay = 90
    status, body, headers, took = await timed_get(client, f"{base}{PART}")
    assert status == 504 and 1.8 < took < 4, (status, took)  # plex's first_byte: 2 s
    assert headers["Content-Type"].startswith("text/html") and b"504 Gateway Timeout" in body
    # The connection that timed out is not reused half-answered: the next exchange is a clean one.
    origin.delay = 0
    status, body, _, _ = await timed_get(client, f"{base}/projectionist/unrouted?{TOKEN}")
    assert status == 200 and body == b"<MediaContainer/>"


async def test_a_transcode_segment_from_a_hung_origin_gets_a_504(setup):
    origin, base, _, client = setup
    origin.delay = 90
    status, _, _, took = await timed_get(client, f"{base}/video/:/transcode/universal/session/s1/0/1.ts?{TOKEN}")
    assert status == 504 and took < 4, (status, took)


async def test_an_unrouted_request_to_a_hung_origin_gets_a_504_within_its_timeout(setup):
    origin, base, _, client = setup
    origin.delay = 90
    status, body, headers, took = await timed_get(client, f"{base}/projectionist/unrouted?{TOKEN}")
    assert status == 504 and 1.8 < took < 4, (status, took)
    assert b"504 Gateway Timeout" in body


async def test_an_unrouted_tmdb_request_through_the_explicit_proxy_gets_a_504_in_tmdb_format(setup):
    origin, _, proxy_url, client = setup
    status, body, _, _ = await timed_get(client, "http://api.themoviedb.org/3/unrouted/thing", proxy=proxy_url)
    assert status == 200 and b"unrouted" in body
    origin.delay = 90
    started = time.monotonic()
    async with client.get("http://api.themoviedb.org/3/unrouted/thing", proxy=proxy_url) as r:
        answer = await r.json(content_type=None)
    took = time.monotonic() - started
    assert r.status == 504 and took < 4, (r.status, took)
    assert answer["status_code"] == 24 and answer["success"] is False  # TMDB's "backend server timed out"


async def test_a_slow_but_alive_media_part_is_not_cut(setup):
    """Headers at once, then pauses longer than first_byte and idle: a paused player's stream."""
    _, base, _, client = setup
    status, body, _, took = await timed_get(client, f"{base}{PART}")
    assert status == 200 and body == b"m" * 3000 and took > 2 * GAP, (status, len(body), took)


async def test_the_event_stream_is_not_cut(setup):
    _, base, _, client = setup
    status, body, headers, took = await timed_get(client, f"{base}/:/eventsource/notifications?{TOKEN}")
    assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
    assert body == b"event: ping\ndata: 0\n\nevent: ping\ndata: 1\n\n" and took > 2 * GAP, (body, took)


@pytest.fixture
async def unreachable(tmp_path):
    """An origin whose accept queue is full: a new connection's SYN goes unanswered, as a host
    behind a dropping firewall."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    filler = socket.create_connection(("127.0.0.1", port))
    async with UnknownTokenPlexTv() as plextv:
        plex_port = free_port()
        proxy = await start_embedded_proxy(tmp_path, [f"plex=http://127.0.0.1:{port}", f"plextv={plextv.url}"],
                                           timeouts_edit, plex_listen=plex_port)
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as client:
                yield f"http://127.0.0.1:{plex_port}", client
        finally:
            await proxy.stop()
            filler.close()
            listener.close()


async def test_an_origin_that_accepts_no_connection_gets_a_504_within_the_connect_timeout(unreachable):
    base, client = unreachable
    status, body, _, took = await timed_get(client, f"{base}{PART}")
    assert status == 504 and 0.8 < took < 3, (status, took)  # plex's connect: 1 s
    assert b"504 Gateway Timeout" in body
