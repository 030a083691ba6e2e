"""A client from before Projectionist sends a real Plex token: plex.tv is asked whose it is once.

In-process proxy, a local Plex + plex.tv upstream that counts the account look-ups, real SQLite.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3

import aiohttp
import pytest
from aiohttp import web

from support import LocalUpstream, free_port, start_embedded_proxy

REAL_TOKEN = "real-plex-token-from-an-old-client"


class PlexAndPlexTv(LocalUpstream):
    """`/library/sections` (Plex) and `/api/v2/user` (plex.tv) answering `account` after `delay`."""

    def __init__(self) -> None:
        super().__init__()
        self.account: object = {"id": 4242, "uuid": "u-4242", "username": "alice", "email": "a@example.org"}
        self.lookups = 0
        self.delay = 0.2  # long enough for concurrent first requests to overlap

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if request.path == "/api/v2/user":
            self.lookups += 1
            await asyncio.sleep(self.delay)
            return web.json_response(self.account)
        return web.json_response({"MediaContainer": {"size": 0, "token_seen": request.query.get("X-Plex-Token")}})


@pytest.fixture
async def upstream():
    async with PlexAndPlexTv() as up:
        yield up


@pytest.fixture
async def proxy(tmp_path, upstream):
    port = free_port()
    p = await start_embedded_proxy(tmp_path, [f"plex={upstream.url}", f"plextv={upstream.url}"], plex_listen=port)
    p.plex_url = f"http://127.0.0.1:{port}"
    yield p
    await p.stop()


async def sections(proxy, n: int) -> list[tuple[int, dict]]:
    async with aiohttp.ClientSession() as session:
        async def one():
            async with session.get(f"{proxy.plex_url}/library/sections", params={"X-Plex-Token": REAL_TOKEN},
                                   headers={"Accept": "application/json"}) as r:
                return r.status, await r.json()
        return await asyncio.gather(*(one() for _ in range(n)))


def vault_rows(tmp_path) -> list[tuple]:
    with sqlite3.connect(tmp_path / "projectionist.db") as db:
        return db.execute("SELECT kind, user_id FROM vault_tokens").fetchall()


async def test_concurrent_first_requests_share_one_lookup_and_one_vault_entry(proxy, upstream, tmp_path):
    answers = await sections(proxy, 10)
    assert [status for status, _ in answers] == [200] * 10
    assert all(body["MediaContainer"]["token_seen"] == REAL_TOKEN for _, body in answers)
    assert upstream.lookups == 1
    rows = vault_rows(tmp_path)
    assert len(rows) == 1 and rows[0][0] == "plex" and rows[0][1] is not None  # bound to alice
    await sections(proxy, 3)
    assert upstream.lookups == 1, "a vaulted token is not looked up again"


@pytest.mark.parametrize("answer", [{}, {"errors": [{"code": 1001}]}, [], "not json at all", {"id": None}])
async def test_an_answer_that_names_no_account_vaults_the_token_for_no_user(proxy, upstream, tmp_path, caplog,
                                                                            answer):
    upstream.account = answer
    with caplog.at_level(logging.WARNING):
        answers = await sections(proxy, 4)
        answers += await sections(proxy, 4)
    assert [status for status, _ in answers] == [200] * 8
    assert upstream.lookups == 1, "an unusable answer must not make every request ask plex.tv again"
    assert vault_rows(tmp_path) == [("plex", None)]
    assert not [r for r in caplog.records if r.getMessage().startswith("Addon error")]
    assert REAL_TOKEN not in caplog.text
