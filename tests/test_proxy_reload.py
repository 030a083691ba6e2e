"""The embedded proxy picks up rules.yaml edits live, keeps in-flight requests, rejects bad edits."""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import time

import aiohttp
import pytest
from aiohttp import web

from support import LocalUpstream, free_port, start_embedded_proxy, write_test_rules


class PlexUpstream(LocalUpstream):
    async def handle(self, request: web.Request) -> web.StreamResponse:
        if request.path == "/library/metadata/slow":
            await asyncio.sleep(float(request.query.get("s", "1")))
            return web.Response(text="slow done")
        if request.path == "/library/sections":
            return web.json_response({"MediaContainer": {"size": 1, "Directory": [{"key": "1", "title": "Films"}]}})
        return web.Response(status=404)


@pytest.fixture
async def upstream():
    async with PlexUpstream() as up:
        yield up.url


@pytest.fixture
async def proxy(tmp_path, upstream):
    plex_port = free_port()
    # plex.tv too: the proxy asks it whose a newly seen real token is.
    proxy = await start_embedded_proxy(tmp_path, [f"plex={upstream}", f"plextv={upstream}"], plex_listen=plex_port)
    proxy.plex_port = plex_port
    yield proxy
    await proxy.stop()


def routes_recorded(db_path) -> list[str]:
    return [r[0] for r in sqlite3.connect(db_path).execute("SELECT route FROM usage_events ORDER BY id")]


async def wait_reloads(watcher, count: int, timeout: float = 3.0) -> float:
    started = time.monotonic()
    while watcher.reloads < count:
        assert time.monotonic() - started < timeout, "rules.yaml edit was not picked up"
        await asyncio.sleep(0.01)
    return time.monotonic() - started


def rename_route(rules: dict, old: str, new: str) -> None:
    for route in rules["routes"]:
        if route["name"] == old:
            route["name"] = new


async def test_valid_edit_applies_without_dropping_in_flight_requests(proxy, tmp_path):
    base = f"http://127.0.0.1:{proxy.plex_port}"
    rules_path = tmp_path / "rules.yaml"
    async with aiohttp.ClientSession() as client:
        async with client.get(f"{base}/library/sections?X-Plex-Token=real-token-of-an-old-client") as r:
            assert r.status == 200
        in_flight = asyncio.create_task(client.get(f"{base}/library/metadata/slow?s=1.5&X-Plex-Token=real-token-of-an-old-client"))
        await asyncio.sleep(0.2)
        # Editors save by writing a new file and renaming it over the old one.
        write_test_rules(rules_path, proxy.plex_port,
                         lambda rules: rename_route(rules, "plex.sections", "plex.libraries"))
        took = await wait_reloads(proxy.rules_watcher, 1)
        logging.getLogger(__name__).info("rules reload applied %.3f s after the rename", took)
        async with client.get(f"{base}/library/sections?X-Plex-Token=real-token-of-an-old-client") as r:
            assert r.status == 200
        response = await in_flight
        assert response.status == 200 and await response.text() == "slow done"
    await proxy.stop()
    assert routes_recorded(tmp_path / "projectionist.db") == ["plex.sections", "plex.libraries", "plex.metadata"]


async def test_invalid_edit_keeps_previous_rules_and_logs_where(proxy, tmp_path, caplog):
    rules_path = tmp_path / "rules.yaml"
    before = proxy.rules_watcher.rules
    good_text = rules_path.read_text()
    tmp = rules_path.with_suffix(".swp")
    tmp.write_text(good_text.replace("kind: tmdb\n", "kind: tmdbb\n", 1))
    with caplog.at_level(logging.ERROR):
        os.replace(tmp, rules_path)
        deadline = time.monotonic() + 3
        while "not reloaded" not in caplog.text:
            assert time.monotonic() < deadline, "the invalid edit was not reported"
            await asyncio.sleep(0.02)
    assert proxy.rules_watcher.rules is before
    assert proxy.rules_watcher.reloads == 0
    assert f"{rules_path}:" in caplog.text and "upstreams.tmdb.kind" in caplog.text
    async with aiohttp.ClientSession() as client:  # still serving with the old rules
        async with client.get(f"http://127.0.0.1:{proxy.plex_port}/library/sections?X-Plex-Token=real-token-of-an-old-client") as r:
            assert r.status == 200


async def test_reverse_listener_follows_rules(proxy, tmp_path):
    new_port = free_port()
    write_test_rules(tmp_path / "rules.yaml", new_port)
    await wait_reloads(proxy.rules_watcher, 1)
    async with aiohttp.ClientSession() as client:
        for _ in range(100):  # the listener set is updated asynchronously after the reload
            try:
                async with client.get(f"http://127.0.0.1:{new_port}/library/sections?X-Plex-Token=real-token-of-an-old-client") as r:
                    assert r.status == 200
                    break
            except aiohttp.ClientConnectionError:
                await asyncio.sleep(0.05)
        else:
            pytest.fail("the new reverse listener never answered")
        with pytest.raises(aiohttp.ClientConnectionError):
            async with client.get(f"http://127.0.0.1:{proxy.plex_port}/library/sections?X-Plex-Token=real-token-of-an-old-client"):
                pass
