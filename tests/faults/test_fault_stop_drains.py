"""A stop (SIGTERM) lets the requests under way finish: the listeners close at once, a new request
on a connection already open gets a quick 503 with `Connection: close`, the request in flight gets
its answer, and no addon meets a vault or cache already closed (the bench's replay once logged
"'NoneType' object has no attribute 'resolve'" from requests caught by the shutdown)."""

from __future__ import annotations

import asyncio
import signal
import time

import aiohttp
import pytest
from aiohttp import web

from _stack import ProxyProcess
from support import LocalUpstream

pytestmark = [pytest.mark.e2e]


class SlowTmdb(LocalUpstream):
    async def handle(self, request: web.Request) -> web.Response:
        if request.path.endswith("/slow"):
            await asyncio.sleep(1.5)
        return web.json_response({"id": 603, "path": request.path})


async def test_sigterm_answers_what_is_in_flight_and_refuses_new_requests_quickly():
    async with SlowTmdb() as upstream, aiohttp.ClientSession() as slow, aiohttp.ClientSession() as other:
        proxy = ProxyProcess({"tmdb": upstream.url}).start()
        try:
            def get(session, path):
                return session.get(f"http://api.themoviedb.org/3/movie/{path}", params={"api_key": "x"},
                                   proxy=proxy.proxy_url, timeout=aiohttp.ClientTimeout(total=20))
            async with get(other, "603/warm") as r:  # opens the connection the second request reuses
                assert r.status == 200
                await r.read()

            async def in_flight():
                async with get(slow, "603/slow") as r:
                    return r.status, await r.json()
            first = asyncio.ensure_future(in_flight())
            await asyncio.sleep(0.4)
            stopped_at = time.monotonic()
            proxy.proc.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.3)
            async with get(other, "604/new") as r:  # on the open connection, while draining
                refused = (r.status, r.headers.get("Connection"), r.headers.get("Retry-After"))
            assert refused == (503, "close", "1"), refused
            assert await first == (200, {"id": 603, "path": "/3/movie/603/slow"})
            assert await asyncio.to_thread(proxy.proc.wait, 15) == 0
            assert time.monotonic() - stopped_at < 6  # drained within DRAIN_SECONDS
            log = proxy.log_path.read_text()
            assert "Addon error" not in log and "Traceback" not in log, log[-3000:]
        finally:
            proxy.stop()
            proxy.cleanup()
