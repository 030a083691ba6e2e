"""Issue 16 case 4: a full (or read-only) cache disk. Through the embedded proxy's explicit listener
with diskcache's writes failing as a full disk fails them (ENOSPC injected into diskcache.Cache.set,
since a test cannot fill a real disk): every request is still answered, one warning at most per
minute, nothing stored meanwhile, and writes resume by themselves once the disk has room."""

from __future__ import annotations

import asyncio
import errno
import logging
import time

import aiohttp
import diskcache
from aiohttp import web

from proxy_addons.response_cache import ResponseCache
from support import LocalUpstream, start_embedded_proxy


class Tmdb(LocalUpstream):
    async def handle(self, request: web.Request) -> web.StreamResponse:
        return web.json_response({"id": request.path.rsplit("/", 1)[-1], "title": "x" * 500})


async def test_full_cache_disk_is_one_warning_answers_served_and_recovery(tmp_path, monkeypatch, caplog):
    full = {"on": False}
    real_set = diskcache.Cache.set

    def set_(self, *args, **kwargs):
        if full["on"]:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_set(self, *args, **kwargs)

    monkeypatch.setattr(diskcache.Cache, "set", set_)
    caplog.set_level(logging.WARNING, logger="projectionist.disk_guard")

    def no_limits(rules: dict) -> None:
        rules["limits"] = {}
        for upstream in rules["upstreams"].values():
            upstream.pop("limits", None)

    async with Tmdb() as up:
        proxy = await start_embedded_proxy(tmp_path, [f"tmdb={up.url}"], no_limits)
        try:
            cache = next(a for a in proxy.addons if isinstance(a, ResponseCache))
            disk = cache.disk.cache
            via = f"http://127.0.0.1:{proxy.ports['regular']}"
            async with aiohttp.ClientSession() as client:
                async def get(n: int) -> int:
                    async with client.get(f"http://api.themoviedb.org/3/movie/{n}", proxy=via) as r:
                        await r.read()
                        return r.status

                full["on"] = True
                statuses = [await get(n) for n in range(1, 41)]
                await asyncio.sleep(0.3)  # the disk writes run in the cache's thread
                assert statuses == [200] * 40
                warnings = [r for r in caplog.records if "writes skipped" in r.getMessage()]
                assert len(warnings) == 1, [r.getMessage() for r in caplog.records]
                assert "No space left" in warnings[0].getMessage()
                stored_while_full = len(disk)

                full["on"] = False
                deadline = time.monotonic() + 15
                n = 100
                while not any("writes work again" in r.getMessage() for r in caplog.records):
                    assert time.monotonic() < deadline, "writes never resumed"
                    n += 1
                    assert await get(n) == 200
                    await asyncio.sleep(0.5)
                assert len(disk) > stored_while_full
        finally:
            await proxy.stop()
