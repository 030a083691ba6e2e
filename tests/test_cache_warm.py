"""The cache warmer through the real proxy: asked as the cache-warm job asks (a flush request with
target "warm"), it fetches TMDB lists, details and posters through the proxy's own listener, so
that a person's first Home is answered from the cache; its requests are recorded as "warm"."""

from __future__ import annotations

import asyncio
import sqlite3

import aiohttp

from fake_upstreams import FakeUpstreams
from proxy_addons.cache_warmer import IMAGE_ACCEPT

from support import FAKE_TO_RULES, free_port, start_embedded_proxy


def small_warm(rules: dict) -> None:
    rules["warming"] = {"tmdb_lists": ["/3/trending/movie/week"], "details": 2,
                        "detail_parts": ["", "/credits"], "poster_size": "w342", "plex_paths": []}


def plex_warm(rules: dict) -> None:
    rules["warming"] = {"plex_paths": ["/library/onDeck",
                                       "/library/sections/{section}/all?sort=titleSort&X-Plex-Container-Start=0"]}


async def applied(db, request_id: int, timeout: float = 60) -> int:
    for _ in range(int(timeout / 0.1)):
        row = db.execute("SELECT flushed FROM cache_flush_requests WHERE id = ? AND applied_at IS NOT NULL",
                         (request_id,)).fetchone()
        if row:
            return row[0]
        await asyncio.sleep(0.1)
    raise AssertionError("the proxy never carried out the warm request")


async def test_a_warm_run_makes_the_first_home_a_hit(tmp_path):
    async with FakeUpstreams() as fakes, aiohttp.ClientSession() as session:
        proxy = await start_embedded_proxy(tmp_path, [f"{FAKE_TO_RULES[n]}={u}" for n, u in fakes.urls.items()],
                                           small_warm)
        try:
            db = sqlite3.connect(tmp_path / "projectionist.db", isolation_level=None)
            request_id = db.execute("INSERT INTO cache_flush_requests (target, value, requested_at) "
                                    "VALUES ('warm', 'test', datetime('now'))").lastrowid
            made = await applied(db, request_id)
            trending = [r for r in fakes.requests["tmdb"] if r.path == "/3/trending/movie/week"]
            assert made >= 1 + 2 * 2 and len(trending) == 1
            assert all(WARM not in r.headers for r in fakes.requests["tmdb"])  # never forwarded
            proxy_url = f"http://127.0.0.1:{proxy.ports['regular']}"
            async with session.get("http://api.themoviedb.org/3/trending/movie/week", proxy=proxy_url,
                                   headers={"Authorization": "Bearer placeholder"}) as r:
                assert r.status == 200 and r.headers["Cache-Status"].startswith("Projectionist; hit")
                first = (await r.json())["results"][0]
            async with session.get(f"http://api.themoviedb.org/3/movie/{first['id']}/credits", proxy=proxy_url) as r:
                assert r.headers["Cache-Status"].startswith("Projectionist; hit")
            async with session.get(f"http://image.tmdb.org/t/p/w342{first['poster_path']}", proxy=proxy_url,
                                   headers={"Accept": IMAGE_ACCEPT}) as r:  # Chromium's, as the warmer's
                assert r.status == 200 and "hit" in r.headers["Cache-Status"]
            assert len([r for r in fakes.requests["tmdb"] if r.path == "/3/trending/movie/week"]) == 1
            for _ in range(50):
                warm = db.execute("SELECT count(*) FROM usage_events WHERE listener = 'warm'").fetchone()[0]
                if warm >= made:
                    break
                await asyncio.sleep(0.1)
            assert warm == made
        finally:
            await proxy.stop()


WARM = "X-Projectionist-Warm"


async def signed_in(session: aiohttp.ClientSession, proxy) -> tuple[str, str]:
    """The player's plex.tv resources call after its sign-in (which starts the Plex warm): the
    server's URI and the surrogate token the player is handed."""
    from fake_upstreams.data import PLEX_ACCOUNT_TOKEN

    async with session.get("http://plex.tv/api/v2/resources?includeHttps=1&includeRelay=1",
                           proxy=f"http://127.0.0.1:{proxy.ports['regular']}",
                           headers={"X-Plex-Token": PLEX_ACCOUNT_TOKEN, "Accept": "application/json",
                                    "X-Plex-Client-Identifier": "warm-test"}) as r:
        server = next(s for s in await r.json() if "server" in s["provides"])
    return server["connections"][0]["uri"], server["accessToken"]


async def test_a_sign_in_warms_that_accounts_plex_home_and_library(tmp_path):
    async with FakeUpstreams() as fakes, aiohttp.ClientSession() as session:
        plex_port = free_port()
        proxy = await start_embedded_proxy(tmp_path, [f"{FAKE_TO_RULES[n]}={u}" for n, u in fakes.urls.items()],
                                           plex_warm, plex_listen=plex_port)
        try:
            base, token = await signed_in(session, proxy)
            assert token.startswith("pj_")
            browsed = ("/library/onDeck", "/library/sections/1/all")

            def reached() -> int:  # the warm's thumbnails may still be arriving: count only the browsed pages
                return sum(r.path in browsed for r in fakes.requests["plex"])

            for _ in range(100):  # the warm runs in the background of the sign-in
                plex_paths = {r.path for r in fakes.requests["plex"]}
                if set(browsed) <= plex_paths and any("/thumb/" in p for p in plex_paths):
                    break
                await asyncio.sleep(0.1)
            await asyncio.sleep(0.5)  # the warm stores what it fetched
            calls = reached()
            for path in ("/library/onDeck", "/library/sections/1/all?sort=titleSort&X-Plex-Container-Start=0"):
                sep = "&" if "?" in path else "?"
                async with session.get(f"{base}{path}{sep}X-Plex-Token={token}&X-Plex-Client-Identifier=browser",
                                       headers={"Accept": "application/json"}) as r:
                    assert r.status == 200 and r.headers["Cache-Status"].startswith("Projectionist; hit"), path
            assert reached() == calls
            assert all(WARM not in r.headers for r in fakes.requests["plex"])
        finally:
            await proxy.stop()


async def test_a_library_change_refreshes_the_signed_in_accounts_cached_lists(tmp_path):
    """The library-sync job saw the server's library change and filed a "library-change" warm (as
    control/library.py does, through control.warming.request_warm): the proxy fetches the lists of
    the account that signed in afresh, so the player's next page is a hit with the new title, where
    it would have shown the old one for the route's TTL."""
    from control.warming import request_warm
    from fake_upstreams.data import PLEX_SERVER_TOKEN
    from projectionist.store import WARM_AFTER_LIBRARY_CHANGE

    async with FakeUpstreams() as fakes, aiohttp.ClientSession() as session:
        proxy = await start_embedded_proxy(tmp_path, [f"{FAKE_TO_RULES[n]}={u}" for n, u in fakes.urls.items()],
                                           plex_warm, plex_listen=free_port())
        try:
            base, token = await signed_in(session, proxy)
            page = f"{base}/library/sections/1/all?sort=titleSort&X-Plex-Container-Start=0&X-Plex-Token={token}"

            async def titles() -> tuple[str, list[str]]:
                async with session.get(page, headers={"Accept": "application/json"}) as r:
                    assert r.status == 200
                    return r.headers["Cache-Status"], [m["title"] for m in (await r.json())["MediaContainer"]["Metadata"]]

            for _ in range(100):  # the sign-in's own warm stores the page
                if any(r.path == "/library/sections/1/all" for r in fakes.requests["plex"]):
                    break
                await asyncio.sleep(0.1)
            await asyncio.sleep(0.5)
            status, before = await titles()
            assert status.startswith("Projectionist; hit") and "The Matrix" in before, status

            matrix = next(key for key, item in plex_items().items() if item.type == "movie" and item.title == "The Matrix")
            fakes.plex.retitle(matrix, "The Matrix (Projectionist Cut)")
            fakes.clear()
            assert "The Matrix (Projectionist Cut)" not in (await titles())[1]  # the cache cannot know yet

            db = sqlite3.connect(tmp_path / "projectionist.db", isolation_level=None)
            made = await applied(db, request_warm(db, WARM_AFTER_LIBRARY_CHANGE))
            refetched = [r for r in fakes.requests["plex"] if r.path == "/library/sections/1/all"]
            assert made >= len(plex_warm_paths()) and refetched, made
            assert all(r.query["X-Plex-Token"] == [PLEX_SERVER_TOKEN] for r in refetched)  # that account's server token
            assert all(WARM not in r.headers for r in refetched)
            status, after = await titles()
            assert status.startswith("Projectionist; hit"), status
            assert "The Matrix (Projectionist Cut)" in after and "The Matrix" not in after
        finally:
            await proxy.stop()


def plex_items() -> dict:
    from fake_upstreams.plex_model import ITEMS
    return ITEMS


def plex_warm_paths() -> list[str]:
    rules: dict = {}
    plex_warm(rules)
    return rules["warming"]["plex_paths"]
