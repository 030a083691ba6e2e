"""Issue 16 case 1: the rules watcher survives every failure of reading or parsing rules.yaml.

Through the embedded proxy's real reverse listener: random bytes, a directory, a deleted file, an
unreadable file and a half-written file each leave the running rules in place with one log line
naming the cause, and the next valid file applies."""

from __future__ import annotations

import asyncio
import logging
import os
import time

import aiohttp
import pytest
import yaml
from aiohttp import web

from support import REPO, LocalUpstream, free_port, start_embedded_proxy, write_test_rules

WATCH_LOG = "proxy_addons.rules_watch"


class PlexUpstream(LocalUpstream):
    async def handle(self, request: web.Request) -> web.StreamResponse:
        if request.path == "/library/sections":
            return web.json_response({"MediaContainer": {"size": 0}})
        return web.Response(status=404)


@pytest.fixture
async def proxy(tmp_path):
    async with PlexUpstream() as up:
        port = free_port()
        proxy = await start_embedded_proxy(tmp_path, [f"plex={up.url}", f"plextv={up.url}"], plex_listen=port)
        proxy.plex_port = port
        applied: list[int] = []  # route count of every rules set applied
        proxy.rules_watcher.subscribe(lambda rules: applied.append(len(rules.routes)))
        proxy.applied = applied
        yield proxy
        await proxy.stop()


async def served(proxy) -> int:
    async with aiohttp.ClientSession() as client:
        async with client.get(f"http://127.0.0.1:{proxy.plex_port}/library/sections?X-Plex-Token=t-old-client") as r:
            return r.status


async def wait_log(caplog, text: str, timeout: float = 5.0) -> logging.LogRecord:
    deadline = time.monotonic() + timeout
    while True:
        for record in caplog.records:
            if record.name == WATCH_LOG and text in record.getMessage():
                return record
        assert time.monotonic() < deadline, f"no log line with {text!r}: {caplog.text}"
        await asyncio.sleep(0.02)


async def wait_reloads(proxy, count: int, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while proxy.rules_watcher.reloads < count:
        assert time.monotonic() < deadline, "the valid file was not applied"
        await asyncio.sleep(0.02)


def rename_route(new: str):
    def edit(rules: dict) -> None:
        for route in rules["routes"]:
            if route["name"].startswith("plex.sections"):
                route["name"] = new
    return edit


async def assert_survives(proxy, caplog, cause: str, reloads_before: int) -> None:
    """The failure is logged in one line naming `cause`, the rules stay, the watch goes on."""
    before = proxy.rules_watcher.rules
    record = await wait_log(caplog, cause)
    assert "\n" not in record.getMessage() and "keeping the previous rules" in record.getMessage()
    assert proxy.rules_watcher.rules is before and proxy.rules_watcher.reloads == reloads_before
    assert not proxy.rules_watcher._task.done(), "the watch task ended"
    assert await served(proxy) == 200
    caplog.clear()


async def test_every_read_or_parse_failure_keeps_rules_and_the_next_valid_file_applies(proxy, tmp_path, caplog):
    rules_path = tmp_path / "rules.yaml"
    caplog.set_level(logging.INFO, logger=WATCH_LOG)
    reloads = 0

    # Random bytes (UnicodeDecodeError used to end the watch for good), saved by rename.
    tmp = tmp_path / "rules.yaml.tmp"
    tmp.write_bytes(b"version: 1\n\xff\xfe\x80" + os.urandom(1024))
    os.replace(tmp, rules_path)
    await assert_survives(proxy, caplog, "not UTF-8", reloads)
    write_test_rules(rules_path, proxy.plex_port, rename_route("plex.sections.a"))
    await wait_reloads(proxy, reloads := reloads + 1)

    # A directory where the file was.
    rules_path.unlink()
    rules_path.mkdir()
    await assert_survives(proxy, caplog, "not a regular file", reloads)
    rules_path.rmdir()
    write_test_rules(rules_path, proxy.plex_port, rename_route("plex.sections.b"))
    await wait_reloads(proxy, reloads := reloads + 1)

    # Deleted, then written again.
    rules_path.unlink()
    await assert_survives(proxy, caplog, "cannot read", reloads)
    write_test_rules(rules_path, proxy.plex_port, rename_route("plex.sections.c"))
    await wait_reloads(proxy, reloads := reloads + 1)

    # Not valid YAML, written in place (not renamed).
    rules_path.write_text("version: 1\nupstreams: [\n")
    await assert_survives(proxy, caplog, "not valid YAML", reloads)
    write_test_rules(rules_path, proxy.plex_port, rename_route("plex.sections.d"))
    await wait_reloads(proxy, reloads := reloads + 1)
    assert [r.name for r in proxy.rules_watcher.rules.model.routes if r.name.startswith("plex.sections")][0] \
        == "plex.sections.d"


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a mode-000 file")
async def test_unreadable_file_keeps_rules(proxy, tmp_path, caplog):
    rules_path = tmp_path / "rules.yaml"
    caplog.set_level(logging.INFO, logger=WATCH_LOG)
    write_test_rules(rules_path, proxy.plex_port, rename_route("plex.sections.x"))
    rules_path.chmod(0)
    await assert_survives(proxy, caplog, "Permission denied", 0)
    rules_path.chmod(0o644)
    write_test_rules(rules_path, proxy.plex_port, rename_route("plex.sections.y"))
    await wait_reloads(proxy, 1)


async def test_a_file_is_applied_only_once_it_stopped_changing(proxy, tmp_path):
    """Written in place in four pieces cut at line boundaries, 50 ms apart: every prefix from the
    second on is valid YAML with fewer routes; only the whole file may be applied."""
    rules_path = tmp_path / "rules.yaml"
    rules = yaml.safe_load((REPO / "rules.yaml").read_text())
    rules["upstreams"]["plex"]["listen"] = proxy.plex_port
    full = len(rules["routes"])
    text = yaml.safe_dump(rules, sort_keys=False)
    lines = text.splitlines(keepends=True)
    cuts = [len(lines) * i // 4 for i in range(5)]
    with open(rules_path, "w") as f:
        for start, end in zip(cuts, cuts[1:]):
            f.write("".join(lines[start:end]))
            f.flush()
            await asyncio.sleep(0.05)
    await wait_reloads(proxy, 1)
    await asyncio.sleep(0.6)  # any later reload of the same write has happened by now
    assert proxy.applied and set(proxy.applied) == {full}, f"applied route counts {proxy.applied}, file has {full}"
    assert await served(proxy) == 200

