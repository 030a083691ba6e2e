"""A local stand-in upstream for benchmarks: small, realistic Plex and TMDB JSON from memory.

Run it as its own process so the load generator cannot starve it (see `_stack.start_upstream`):

    python bench/_upstream.py [--port 0]     # prints "READY <port>" once bound; SIGTERM stops it

Routes (any method, bodies pre-encoded so the server costs as little as possible):
    /library/sections*   Plex MediaContainer with four library sections (~2 KB)
    /3/*                 TMDB v3 movie details (~2 KB); `?bench_delay_ms=N` answers N ms late,
                         `?bench_pad_kb=N` N KB bigger (a "padding" field)
    /_bench/requests     how many /3/ requests arrived, per path and query (JSON)
    anything else        {"path": ...}
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import signal
import sys
from collections import Counter

from aiohttp import web


def _plex_section(key: int, kind: str, title: str, agent: str, scanner: str, path: str, lang: str) -> dict:
    return {
        "allowSync": True, "art": f"/:/resources/{kind}-fanart.jpg", "composite": f"/library/sections/{key}/composite/1715000000",
        "filters": True, "refreshing": False, "thumb": f"/:/resources/{kind}.png", "key": str(key), "type": kind,
        "title": title, "agent": agent, "scanner": scanner, "language": lang,
        "uuid": f"0f6b2c2e-5a3d-4c1b-9e0a-{key:012d}", "updatedAt": 1715000000, "createdAt": 1690000000,
        "scannedAt": 1715000000, "content": True, "directory": True, "contentChangedAt": 123456 + key, "hidden": 0,
        "Location": [{"id": key, "path": path}],
    }


PLEX_SECTIONS = {
    "MediaContainer": {
        "size": 4, "allowSync": False, "title1": "Plex Library",
        "Directory": [
            _plex_section(1, "movie", "Movies", "tv.plex.agents.movie", "Plex Movie", "/data/movies", "en-US"),
            _plex_section(2, "show", "TV Shows", "tv.plex.agents.series", "Plex TV Series", "/data/tv", "en-US"),
            _plex_section(3, "artist", "Music", "tv.plex.agents.music", "Plex Music", "/data/music", "en-US"),
            _plex_section(4, "photo", "Photos", "com.plexapp.agents.none", "Plex Photo Scanner", "/data/photos", "xn"),
        ],
    }
}

TMDB_MOVIE = {
    "adult": False, "backdrop_path": "/fNG7i7RqMErkcqhohV2a6cV1Ehy.jpg",
    "belongs_to_collection": {"id": 2344, "name": "The Matrix Collection", "poster_path": "/bV9qTVHTVf0gkW0j7p7M0ILD4pG.jpg",
                              "backdrop_path": "/bRm2DEgUiYciDw3myHuYFInD7la.jpg"},
    "budget": 63000000, "genres": [{"id": 28, "name": "Action"}, {"id": 878, "name": "Science Fiction"}],
    "homepage": "http://www.warnerbros.com/matrix", "id": 603, "imdb_id": "tt0133093", "original_language": "en",
    "original_title": "The Matrix",
    "overview": ("Set in the 22nd century, The Matrix tells the story of a computer hacker who joins a group of "
                 "underground insurgents fighting the vast and powerful computers who now rule the earth."),
    "popularity": 95.123, "poster_path": "/f89U3ADr1oiB1s9GkdPOEpXUk5H.jpg",
    "production_companies": [
        {"id": 79, "logo_path": "/at4uYdwAAgNRKhZuuFX8ShKSybw.png", "name": "Village Roadshow Pictures", "origin_country": "US"},
        {"id": 372, "logo_path": None, "name": "Groucho II Film Partnership", "origin_country": ""},
        {"id": 1885, "logo_path": "/xlvoOZr4s1PygosrwZyolIFe5xs.png", "name": "Silver Pictures", "origin_country": "US"},
        {"id": 174, "logo_path": "/zhD3hhtKB5qyv7ZeL4uLpNxgMVU.png", "name": "Warner Bros. Pictures", "origin_country": "US"},
    ],
    "production_countries": [{"iso_3166_1": "US", "name": "United States of America"}],
    "release_date": "1999-03-31", "revenue": 463517383, "runtime": 136,
    "spoken_languages": [{"english_name": "English", "iso_639_1": "en", "name": "English"}],
    "status": "Released", "tagline": "Believe the unbelievable.", "title": "The Matrix", "video": False,
    "vote_average": 8.2, "vote_count": 25000,
    "external_ids": {"imdb_id": "tt0133093", "wikidata_id": "Q83495", "facebook_id": "TheMatrixMovie",
                     "instagram_id": None, "twitter_id": None},
    "release_dates": {"results": [
        {"iso_3166_1": "US", "release_dates": [{"certification": "R", "iso_639_1": "", "note": "",
                                                "release_date": "1999-03-31T00:00:00.000Z", "type": 3}]},
        {"iso_3166_1": "DE", "release_dates": [{"certification": "16", "iso_639_1": "", "note": "",
                                                "release_date": "1999-06-17T00:00:00.000Z", "type": 3}]},
    ]},
}

PLEX_SECTIONS_BODY = json.dumps(PLEX_SECTIONS, separators=(",", ":")).encode()
TMDB_MOVIE_BODY = json.dumps(TMDB_MOVIE, separators=(",", ":")).encode()


REQUESTS: Counter[str] = Counter()


def make_app() -> web.Application:
    async def plex_sections(_request: web.Request) -> web.Response:
        return web.Response(body=PLEX_SECTIONS_BODY, content_type="application/json",
                            headers={"X-Plex-Protocol": "1.0", "Cache-Control": "no-cache"})

    async def tmdb(request: web.Request) -> web.Response:
        REQUESTS[request.path_qs] += 1
        if delay := request.query.get("bench_delay_ms"):  # a slow origin, for one URL (bench/scale.py)
            await asyncio.sleep(min(float(delay), 10_000) / 1000)
        if pad := request.query.get("bench_pad_kb"):  # a big answer (bench/scale.py: kept off Redis)
            padded = dict(TMDB_MOVIE, padding="x" * (min(int(pad), 10_000) * 1000))
            return web.json_response(padded)
        return web.Response(body=TMDB_MOVIE_BODY, content_type="application/json")

    async def counts(_request: web.Request) -> web.Response:
        return web.json_response(REQUESTS)

    async def other(request: web.Request) -> web.Response:
        return web.json_response({"path": request.path_qs})

    app = web.Application()
    app.router.add_route("*", "/library/sections", plex_sections)
    app.router.add_route("*", "/3/{tail:.*}", tmdb)
    app.router.add_get("/_bench/requests", counts)
    app.router.add_route("*", "/{tail:.*}", other)
    return app


async def serve(port: int) -> None:
    runner = web.AppRunner(make_app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    bound = site._server.sockets[0].getsockname()[1]
    gc.freeze()  # keep start-up garbage out of the cyclic GC's way during the run
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"READY {bound}", flush=True)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    asyncio.run(serve(args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
