"""Issue 16 case 4, for the SQLite file: while the database cannot be written (here another
process holds its write lock far past the busy timeout, as a stuck backup or a full disk would
fail every commit), every request through the real proxy is still answered at once, the usage
rows wait in memory up to their bound and the rest are counted in
projectionist_usage_rows_dropped (never a crash, one warning a minute at most), and once the
database can be written again the rows kept in memory are committed by themselves."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time

import aiohttp
from aiohttp import web
from prometheus_client import REGISTRY

from proxy_addons.usage import UsageRecorder
from support import LocalUpstream, start_embedded_proxy

KEPT = 30  # the writer's in-memory bound, made small for the test (100,000 in production)
SENT = 80


class Tmdb(LocalUpstream):
    async def handle(self, request: web.Request) -> web.StreamResponse:
        return web.json_response({"id": request.path.rsplit("/", 1)[-1]})


def no_limits(rules: dict) -> None:
    rules["limits"] = {}
    for upstream in rules["upstreams"].values():
        upstream.pop("limits", None)


def dropped() -> float:
    return REGISTRY.get_sample_value("projectionist_usage_rows_dropped_total") or 0.0


def usage_rows(db_path) -> int:
    conn = sqlite3.connect(db_path, timeout=30)
    try:
        return conn.execute("SELECT count(*) FROM usage_events WHERE route = 'tmdb.details'").fetchone()[0]
    finally:
        conn.close()


async def test_a_locked_database_keeps_answers_flowing_and_rows_bounded_then_catches_up(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="projectionist.store")
    db_path = tmp_path / "projectionist.db"
    async with Tmdb() as up:
        proxy = await start_embedded_proxy(tmp_path, [f"tmdb={up.url}"], no_limits)
        try:
            writer = next(a for a in proxy.addons if isinstance(a, UsageRecorder)).writer
            writer.max_pending = KEPT
            before = dropped()
            blocker = sqlite3.connect(db_path, timeout=1, isolation_level=None)
            blocker.execute("BEGIN EXCLUSIVE")  # nobody else commits until this ends
            via = f"http://127.0.0.1:{proxy.ports['regular']}"
            try:
                async with aiohttp.ClientSession() as client:
                    started = time.monotonic()
                    for n in range(1, SENT + 1):  # uncached: every one a usage row
                        async with client.get(f"http://api.themoviedb.org/3/movie/{n}?nocache={n}", proxy=via,
                                              headers={"Cache-Control": "no-cache"}) as r:
                            assert r.status == 200
                    took = time.monotonic() - started
                deadline = time.monotonic() + 30
                while dropped() - before < SENT - KEPT:  # the writer trims when its next attempt fails
                    assert time.monotonic() < deadline, f"dropped {dropped() - before}, expected {SENT - KEPT}"
                    await asyncio.sleep(0.2)
            finally:
                blocker.execute("ROLLBACK")
                blocker.close()
            assert took < 10, f"{SENT} answers took {took:.1f} s while the database was locked"
            assert dropped() - before == SENT - KEPT
            deadline = time.monotonic() + 30
            while usage_rows(db_path) < KEPT:
                assert time.monotonic() < deadline, f"{usage_rows(db_path)} rows after the lock ended"
                await asyncio.sleep(0.2)
            await asyncio.sleep(0.5)
            assert usage_rows(db_path) == KEPT  # the newest rows: the bound kept those
            warnings = [r.getMessage() for r in caplog.records if "not written yet" in r.getMessage()]
            assert len(warnings) == 1, warnings
        finally:
            await proxy.stop()
