"""Issue 16 case 6: `kill -9` of the proxy loses at most the usage rows of the last 100 ms of
acknowledged requests; a clean stop loses none.

`projectionist proxy` as the user runs it, one client sending requests one after another through
the reverse listener (so the n-th usage row is the n-th request), the real SQLite file."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time

import aiohttp
import pytest
from aiohttp import web

from support import REPO, LocalUpstream, free_port, wait_for, write_test_rules

LOSS_BOUND = 0.1  # seconds of acknowledged requests


class Plex(LocalUpstream):
    async def handle(self, request: web.Request) -> web.StreamResponse:
        return web.Response(text='<MediaContainer machineIdentifier="x"/>', content_type="application/xml")


async def run_and_stop(tmp_path, how: signal.Signals, seconds: float = 3.0) -> dict:
    async with Plex() as up:
        listen = free_port()
        write_test_rules(tmp_path / "rules.yaml", listen)
        env = {k: v for k, v in os.environ.items() if not k.startswith("PROJECTIONIST_")}
        env.update(PROJECTIONIST_HOME=str(tmp_path), PROJECTIONIST_RULES=str(tmp_path / "rules.yaml"),
                   PROJECTIONIST_PROXY_PORT=str(free_port()), PROJECTIONIST_UPSTREAMS=f"plex={up.url},plextv={up.url}")
        proc = subprocess.Popen([sys.executable, "-m", "launcher", "proxy"], cwd=REPO, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_for(lambda: _listening(listen) or proc.poll() is not None, timeout=60, what="the proxy")
            assert proc.poll() is None
            acked: list[float] = []
            async with aiohttp.ClientSession() as client:
                deadline = time.monotonic() + seconds
                while time.monotonic() < deadline:
                    async with client.get(f"http://127.0.0.1:{listen}/identity") as r:
                        await r.read()
                        assert r.status == 200
                    acked.append(time.time())
            killed_at = time.time()
            os.kill(proc.pid, how)
            proc.wait(30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    rows = sqlite3.connect(tmp_path / "projectionist.db").execute(
        "SELECT count(*) FROM usage_events WHERE route = 'plex.identity'").fetchone()[0]
    lost = max(0, len(acked) - rows)
    # The lost rows are the last ones: how long before the kill was the first of them acknowledged?
    window = killed_at - acked[len(acked) - lost] if lost else 0.0
    report = {"acked": len(acked), "rows": rows, "lost": lost, "lost_window_s": round(window, 4)}
    print(f"{how.name}: {report}")
    return report


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


async def test_kill_9_loses_at_most_the_last_100_ms(tmp_path):
    report = await run_and_stop(tmp_path, signal.SIGKILL)
    assert report["acked"] > 10
    assert report["lost_window_s"] <= LOSS_BOUND, report


async def test_a_clean_stop_loses_nothing(tmp_path):
    report = await run_and_stop(tmp_path, signal.SIGTERM)
    assert report["acked"] > 10 and report["lost"] == 0, report
