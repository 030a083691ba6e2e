"""Issue 16 case 7: memory stays flat under unique misses once the memory cache is at its bound.

Through the embedded proxy's explicit listener with a 200 KB memory bound: a warm-up fills it,
then Python's traced memory (tracemalloc, the whole process) is measured across 1,500 more unique
misses. Per-key bookkeeping that grows with the disk (the old in-memory index held ~0.6 KB per
key, ~0.9 MB here) fails the bound; the bounded miss-reason tables and the hit path's memos (request lines, routes, keys) are made
small so that they are at their bound before the measurement too."""

from __future__ import annotations

import asyncio
import functools
import gc
import inspect
import tracemalloc

import aiohttp
from aiohttp import web

from mitmproxy.net.http.http1 import read as http1_read

import projectionist.rules
from proxy_addons import response_cache
from support import LocalUpstream, start_embedded_proxy

WARMUP, MEASURED = 600, 1500


class Tmdb(LocalUpstream):
    async def handle(self, request: web.Request) -> web.StreamResponse:
        return web.json_response({"id": request.path.rsplit("/", 1)[-1], "title": "x" * 1000})


async def test_unique_misses_after_the_memory_bound_keep_memory_flat(tmp_path, monkeypatch):
    monkeypatch.setattr(response_cache, "_KNOWN_URIS_MAX", 200)
    monkeypatch.setattr(response_cache, "_GONE_MAX", 200)
    monkeypatch.setattr(projectionist.rules, "MEMO_ENTRIES", 200)
    monkeypatch.setattr(response_cache, "_target_key", functools.lru_cache(200)(response_cache._target_key.__wrapped__))
    monkeypatch.setattr(projectionist.rules, "_user_specific_target",
                        functools.lru_cache(200)(projectionist.rules._user_specific_target.__wrapped__))

    def edit(rules: dict) -> None:
        rules["limits"] = {}
        for upstream in rules["upstreams"].values():
            upstream.pop("limits", None)
        rules["cache"]["memory_max_bytes"] = 200_000

    async with Tmdb() as tmdb:
        proxy = await start_embedded_proxy(tmp_path, [f"tmdb={tmdb.url}"], edit)
        monkeypatch.setattr(http1_read, "_read_request_line",  # memoized by dispatch.choose_dispatch
                            functools.lru_cache(200)(inspect.unwrap(http1_read._read_request_line)))
        proxy_url = f"http://127.0.0.1:{proxy.ports['regular']}"
        counter = iter(range(1, 10**9))
        try:
            async with aiohttp.ClientSession() as session:
                async def misses(count: int) -> None:
                    async def client(n: int) -> None:
                        for _ in range(n):
                            url = f"http://api.themoviedb.org/3/movie/{next(counter)}"
                            async with session.get(url, proxy=proxy_url) as r:
                                await r.read()
                                assert r.status == 200 and "fwd=uri-miss" in r.headers["Cache-Status"]
                    await asyncio.gather(*(client(count // 4) for _ in range(4)))
                    await asyncio.sleep(0.5)  # usage and mirror batches written
                    gc.collect()

                await misses(WARMUP)
                tracemalloc.start(1)
                try:
                    await misses(200)  # tracemalloc's own first allocations out of the way
                    before = tracemalloc.get_traced_memory()[0]
                    await misses(MEASURED)
                    growth = tracemalloc.get_traced_memory()[0] - before
                finally:
                    tracemalloc.stop()
        finally:
            await proxy.stop()
    assert growth < 300_000, f"{growth} bytes retained over {MEASURED} unique misses"
