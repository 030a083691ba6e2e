"""The image cache through the real proxy (embedded, as `projectionist proxy` runs it) against the
fake upstreams in this event loop: real JPEG/PNG bytes from fake image.tmdb.org and the fake PMS,
the decompression bomb, the HTML body labelled image/jpeg, the photo transcoder's `url=`."""

from __future__ import annotations

import asyncio
import io
import os
import signal
import sqlite3
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass

import aiohttp
import yarl
from PIL import Image

from control.cache_api import cache_stats
from fake_upstreams import FakeUpstreams
from fake_upstreams.data import PLEX_ACCOUNT_TOKEN, PLEX_SERVER_TOKEN, PLEX_SERVER_TOKEN_2
from projectionist.config import Config
from projectionist.store import connect
from proxy_addons.image_cache import ImageCache
from proxy_addons.runner import EmbeddedProxy

from support import FAKE_TO_RULES, free_port, write_test_rules

WEBP = "image/webp,*/*"
JPEG = "image/jpeg"


@dataclass
class Env:
    fakes: FakeUpstreams
    proxy: EmbeddedProxy
    session: aiohttp.ClientSession
    home: object

    @property
    def cache(self) -> ImageCache:
        return next(a for a in self.proxy.addons if isinstance(a, ImageCache))

    @property
    def plex_port(self) -> int:
        return next(port for mode, port in self.proxy.ports.items() if mode.startswith("reverse:"))

    async def get(self, url: str, accept: str = WEBP, **headers) -> tuple[int, dict, bytes]:
        kwargs = {"proxy": f"http://127.0.0.1:{self.proxy.ports['regular']}"} if "127.0.0.1" not in url else {}
        async with self.session.get(url, headers={"Accept": accept, **headers}, **kwargs) as r:
            return r.status, r.headers.copy(), await r.read()

    async def tmdb(self, path: str, accept: str = WEBP, **headers):
        return await self.get(f"http://image.tmdb.org{path}", accept, **headers)

    async def plex(self, path: str, token: str = PLEX_SERVER_TOKEN, accept: str = WEBP, **headers):
        sep = "&" if "?" in path else "?"
        return await self.get(f"http://127.0.0.1:{self.plex_port}{path}{sep}X-Plex-Token={token}", accept, **headers)

    def upstream_calls(self, fake: str, path: str) -> int:
        return len([r for r in self.fakes.requests[fake] if r.path == path])

    def db(self) -> sqlite3.Connection:
        return connect(self.home / "projectionist.db")


@asynccontextmanager
async def image_proxy(tmp_path, edit=None):
    async with FakeUpstreams() as fakes, aiohttp.ClientSession() as session:
        rules = write_test_rules(tmp_path / "rules.yaml", free_port(), edit)
        config = Config(home=tmp_path, rules_path=rules, datasette_metadata=tmp_path / "unused.yml", proxy_port=0,
                        upstream_overrides=tuple(f"{FAKE_TO_RULES[n]}={u}" for n, u in fakes.urls.items()))
        proxy = await EmbeddedProxy(config).start()
        try:
            yield Env(fakes, proxy, session, tmp_path)
        finally:
            await proxy.stop()


async def eventually(predicate, what: str, timeout: float = 10.0):
    """Poll without blocking the event loop (the proxy under test runs in it)."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.05)
    return value


def image(body: bytes) -> Image.Image:
    im = Image.open(io.BytesIO(body))
    im.load()
    return im


def route(name: str, **image_rule):
    def edit(rules: dict) -> None:
        for r in rules["routes"]:
            if r["name"] == name:
                r["image"] = image_rule
    return edit


async def test_miss_hit_revalidation_and_variants_by_accept(tmp_path):
    path = "/t/p/w342/proxy-variants.jpg"
    async with image_proxy(tmp_path) as env:
        status, headers, webp = await env.tmdb(path)
        assert status == 200 and headers["Content-Type"] == "image/webp"
        assert headers["Cache-Status"] == "Projectionist; fwd=uri-miss; stored"
        assert headers["Cache-Control"] == "public, max-age=31536000, immutable" and headers["Vary"] == "Accept"
        status, again_headers, again = await env.tmdb(path)
        assert again == webp and again_headers["Cache-Status"].startswith("Projectionist; hit; ttl=")
        assert again_headers["ETag"] == headers["ETag"] and int(again_headers["Age"]) >= 0
        status, revalidated, body = await env.tmdb(path, **{"If-None-Match": headers["ETag"]})
        assert status == 304 and body == b"" and revalidated["ETag"] == headers["ETag"]

        status, jpeg_headers, jpeg = await env.tmdb(path, JPEG)
        assert env.upstream_calls("tmdb_images", path) == 2  # one fetch per variant, none for hits
        async with env.session.get(env.fakes.urls["tmdb_images"] + path) as r:
            original = await r.read()
        assert jpeg_headers["Content-Type"] == "image/jpeg" and jpeg == original  # the original, byte for byte
        assert jpeg_headers["ETag"] != headers["ETag"] and len(webp) < 0.75 * len(original)
        assert image(webp).size == image(original).size == (342, 513)
        _, cors, _ = await env.tmdb(path, Origin="http://player.example")
        assert cors["Access-Control-Allow-Origin"] == "*" and "hit" in cors["Cache-Status"]


async def test_original_posters_are_capped_to_the_declared_width(tmp_path):
    async with image_proxy(tmp_path) as env:
        for accept, content_type in ((WEBP, "image/webp"), (JPEG, "image/jpeg")):
            status, headers, body = await env.tmdb("/t/p/original/proxy-capped.jpg", accept)
            assert status == 200 and headers["Content-Type"] == content_type
            assert image(body).size == (1280, 1920)  # 2000x3000 at the source


async def test_concurrent_misses_share_one_fetch_and_one_transcode(tmp_path):
    path = "/t/p/w780/proxy-coalesced.jpg"
    async with image_proxy(tmp_path) as env:
        results = await asyncio.gather(*(env.tmdb(path) for _ in range(20)))
        assert env.upstream_calls("tmdb_images", path) == 1
        assert len({body for _, _, body in results}) == 1 and all(s == 200 for s, _, _ in results)
        statuses = [h["Cache-Status"] for _, h, _ in results]
        assert statuses.count("Projectionist; fwd=uri-miss; stored") == 1
        assert statuses.count("Projectionist; fwd=uri-miss; collapsed") == 19


async def test_bombs_are_refused_and_bodies_that_are_no_image_never_crash_a_worker(tmp_path):
    async with image_proxy(tmp_path) as env:
        for _ in range(2):
            status, headers, body = await env.tmdb("/t/p/original/bomb.png")
            assert status == 422 and b"30000x30000 pixels" in body and "source-too-large" in headers["Cache-Status"]
            status, headers, body = await env.tmdb("/t/p/w500/notanimage.jpg")
            assert status == 502 and b"could not be decoded" in body
        assert env.upstream_calls("tmdb_images", "/t/p/original/bomb.png") == 2  # refusals are not stored
        assert env.cache.pool.restarts == 0
        status, _, _ = await env.tmdb("/t/p/w185/after-the-bomb.jpg")
        assert status == 200


async def test_sources_over_the_byte_cap_are_refused(tmp_path):
    def small_cap(rules: dict) -> None:
        rules["images"]["source_max_bytes"] = 100_000

    async with image_proxy(tmp_path, small_cap) as env:
        status, _, body = await env.tmdb("/t/p/original/proxy-heavy.jpg")
        assert status == 422 and b"over 100000 bytes" in body
        assert (await env.tmdb("/t/p/w185/proxy-light.jpg"))[0] == 200


async def test_plex_images_are_kept_per_user_and_never_keyed_on_tokens(tmp_path):
    path = "/library/metadata/1001/thumb/1731000000"
    async with image_proxy(tmp_path) as env:
        _, first, body = await env.plex(path, PLEX_SERVER_TOKEN)
        assert first["Content-Type"] == "image/webp" and "fwd=uri-miss" in first["Cache-Status"]
        assert first["Cache-Control"].startswith("private, max-age=")
        _, other_user, _ = await env.plex(path, PLEX_SERVER_TOKEN_2)
        assert "fwd=uri-miss" in other_user["Cache-Status"]  # same URL, another account: never shared
        _, same_user, again = await env.plex(path, PLEX_ACCOUNT_TOKEN)  # another token of the first account
        assert "hit" in same_user["Cache-Status"] and again == body
        assert env.upstream_calls("plex", path) == 2
        status, cors, _ = await env.plex(path, Origin="http://player.example")
        assert cors["Access-Control-Allow-Origin"] == "http://player.example" and cors["Vary"] == "Accept, Origin"
    rows = sqlite3.connect(tmp_path / "projectionist.db").execute(
        "SELECT bucket, route, scope, partition FROM cache_entries").fetchall()
    assert {r[:3] for r in rows} == {("images", "plex.image", "user")} and len({r[3] for r in rows}) == 2
    db_bytes = (tmp_path / "projectionist.db").read_bytes()
    assert PLEX_SERVER_TOKEN.encode() not in db_bytes and b"/library/metadata" not in db_bytes


async def test_photo_transcode_refuses_ssrf_targets_without_contacting_the_server(tmp_path):
    async with image_proxy(tmp_path) as env:
        plex_fake = env.fakes.urls["plex"]
        for target in (f"http://127.0.0.1:{free_port()}/", "http://169.254.169.254/latest/meta-data/",
                       "http%3A%2F%2F127.0.0.1%3A22%2F", "http://metadata.google.internal/"):
            status, headers, body = await env.plex(f"/photo/:/transcode?width=320&height=180&url={target}")
            assert status == 403 and b"Forbidden" in body, target
        for path in ("/photo/%3A/transcode", "/photo/:/transcode/", "//photo/:/transcode"):  # same endpoint to a server
            url = f"http://127.0.0.1:{env.plex_port}{path}?width=1&height=1&URL=http://127.0.0.1:22/&X-Plex-Token={PLEX_SERVER_TOKEN}"
            async with env.session.get(yarl.URL(url, encoded=True)) as r:
                assert r.status == 403, path
        assert not [r for r in env.fakes.requests["plex"] if "photo" in r.path]
        # The declared Plex server itself and server-local paths are the transcoder's business.
        status, _, _ = await env.plex(f"/photo/:/transcode?width=320&height=180&url={plex_fake}/library/metadata/1001/thumb")
        assert status == 400  # the fake PMS never fetches remote URLs, but it was asked
        status, headers, body = await env.plex(
            "/photo/:/transcode?width=320&height=180&minSize=1&upscale=1&url=%2Flibrary%2Fmetadata%2F1001%2Fthumb")
        assert status == 200 and headers["Content-Type"] == "image/webp" and image(body).size == (320, 180)
        _, headers, _ = await env.plex(
            "/photo/:/transcode?width=320&height=180&minSize=1&upscale=1&url=%2Flibrary%2Fmetadata%2F1001%2Fthumb")
        assert "hit" in headers["Cache-Status"]


async def test_stale_while_revalidate_answers_at_once_and_refreshes_once(tmp_path):
    path = "/library/metadata/1001/art/1731000000"
    async with image_proxy(tmp_path, route("plex.image", ttl=1, stale_while_revalidate=30)) as env:
        _, _, first = await env.plex(path)
        await asyncio.sleep(1.1)
        results = await asyncio.gather(*(env.plex(path) for _ in range(5)))
        assert all("fwd=stale" in h["Cache-Status"] and body == first for _, h, body in results)
        # The refresh is fetched, re-encoded by a low-priority worker, then stored; on a busy
        # machine that can take a while, so poll for it (a request meanwhile is still stale and
        # must not start a second refresh).
        statuses = []
        for _ in range(200):
            _, headers, _ = await env.plex(path)
            statuses.append(headers["Cache-Status"])
            if "hit" in statuses[-1]:
                break
            await asyncio.sleep(0.05)
        assert "hit" in statuses[-1], statuses[-3:]
        assert env.upstream_calls("plex", path) == 2  # exactly one background refresh


async def test_eviction_at_the_cap_and_stats(tmp_path):
    def small(rules: dict) -> None:
        rules["images"]["max_bytes"] = 120_000  # room for about three w500 WebP posters
        rules["images"]["memory_max_bytes"] = 60_000

    async with image_proxy(tmp_path, small) as env:
        paths = [f"/t/p/w500/proxy-evict-{n}.jpg" for n in range(6)]
        for path in paths:
            assert (await env.tmdb(path))[0] == 200
        await asyncio.sleep(0.3)  # disk writes and evictions happen off the event loop
        assert env.cache.store.bytes <= 120_000 and env.cache.store.evictions >= 2
        _, headers, _ = await env.tmdb(paths[-1])
        assert "hit" in headers["Cache-Status"]
        _, headers, _ = await env.tmdb(paths[0])  # least recently used: gone
        assert "fwd=uri-miss" in headers["Cache-Status"]
        conn = env.db()

        def images_bucket():
            stats = cache_stats(conn, 1)
            bucket = next(b for b in stats.buckets if b.bucket == "images")
            settled = (bucket.evictions >= 3 and bucket.hits >= 1 and bucket.misses >= 7 and bucket.bytes_saved > 0
                       and 0 < bucket.bytes <= 120_000)
            return bucket if settled else None

        bucket = await eventually(images_bucket, "the mirror and usage rows")
        assert bucket.keys >= 2
        route_row = next(r for r in cache_stats(conn, 1).routes if r.route == "tmdb.image")
        assert route_row.bucket == "images" and route_row.bytes_saved == bucket.bytes_saved
        saved = conn.execute("SELECT sum(responses), sum(source_bytes), sum(bytes_sent), sum(bytes_saved) "
                             "FROM cache_savings_hourly WHERE route = 'tmdb.image'").fetchone()
        assert saved[0] >= 8 and saved[1] - saved[2] == saved[3] > 0
        conn.close()


async def test_cleanup_removes_expired_entries_and_reports_what_it_freed(tmp_path):
    async with image_proxy(tmp_path, route("plex.image", ttl=0.5)) as env:
        await env.plex("/library/metadata/1001/thumb/1")
        await env.tmdb("/t/p/w185/proxy-immutable.jpg")
        await asyncio.sleep(0.8)
        report = await env.cache.cleanup()
        assert report["removed"] == 1 and report["freed_bytes"] > 1000 and report["entries"] == 1
        conn = env.db()
        await eventually(lambda: conn.execute("SELECT count(*) FROM cache_entries WHERE route = 'plex.image'")
                         .fetchone()[0] == 0, "the mirror to drop the expired entry")
        conn.close()


async def test_a_killed_worker_is_replaced(tmp_path):
    async with image_proxy(tmp_path) as env:
        assert (await env.tmdb("/t/p/w185/proxy-before-kill.jpg"))[0] == 200
        for pid in env.cache.pool.pids():
            os.kill(pid, signal.SIGKILL)
        await asyncio.sleep(0.2)
        status, headers, _ = await env.tmdb("/t/p/w185/proxy-after-kill.jpg")
        assert status == 200 and headers["Content-Type"] == "image/webp"
        assert env.cache.pool.restarts == 1


async def test_flushing_the_images_bucket(tmp_path):
    path = "/t/p/w185/proxy-flushed.jpg"
    async with image_proxy(tmp_path) as env:
        await env.tmdb(path)
        conn = env.db()
        request_id = conn.execute("INSERT INTO cache_flush_requests (target, value, requested_at) "
                                  "VALUES ('bucket', 'images', datetime('now'))").lastrowid
        flushed = await eventually(lambda: conn.execute("SELECT flushed FROM cache_flush_requests WHERE id = ? AND "
                                                        "applied_at IS NOT NULL", (request_id,)).fetchone(),
                                   "the flush to be applied")
        assert flushed[0] == 1  # applied means applied by the image cache too
        conn.close()
        _, headers, _ = await env.tmdb(path)
        assert "fwd=uri-miss" in headers["Cache-Status"]


async def test_misses_wait_for_the_upstreams_rate_limit_and_hits_never_count(tmp_path):
    def limited(rules: dict) -> None:
        rules.setdefault("limits", {})["images-test"] = {"rate": "1/10s", "burst": 1, "per": "upstream",
                                                          "max_wait": 0}
        rules["upstreams"]["tmdb-images"]["limits"] = ["images-test"]

    async with image_proxy(tmp_path, limited) as env:
        assert (await env.tmdb("/t/p/w185/proxy-limited-1.jpg"))[0] == 200  # the one slot
        for _ in range(3):
            status, headers, _ = await env.tmdb("/t/p/w185/proxy-limited-1.jpg")
            assert status == 200 and "hit" in headers["Cache-Status"]  # hits take no slot
        status, headers, _ = await env.tmdb("/t/p/w185/proxy-limited-2.jpg")
        assert status == 429 and "Retry-After" in headers
        assert env.upstream_calls("tmdb_images", "/t/p/w185/proxy-limited-2.jpg") == 0


def saturating(rules: dict) -> None:
    """One encoder, and no rate limit in the way of the throughput compared."""
    rules.setdefault("images", {})["workers"] = 1
    for upstream in rules["upstreams"].values():
        upstream["limits"] = []


async def _throughput(urls, get, concurrency: int = 50) -> tuple[float, list]:
    queue = list(urls)
    results = []

    async def worker():
        while queue:
            results.append(await get(queue.pop()))
    started = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return len(results) / (time.monotonic() - started), results


async def test_a_saturated_encoder_pool_answers_with_the_original_and_encodes_later(tmp_path):
    """500 distinct image misses at 0.5 s origin latency with one encoder: no errors, the
    originals' own Content-Type, and at least 70% of the same run's Plex-miss throughput."""
    async with image_proxy(tmp_path, saturating) as env:
        env.fakes.plex.latency = env.fakes.tmdb_images.latency = 0.5
        n = 500
        plex_rate, plex = await _throughput(
            [f"/library/sections?saturation={i}" for i in range(n)],
            lambda path: env.plex(path, accept="application/json"))
        image_rate, images = await _throughput(
            [f"/t/p/w92/saturation-{i}.jpg" for i in range(n)], env.tmdb)
        assert [s for s, _, _ in plex] == [200] * n
        assert [s for s, _, _ in images] == [200] * n, sorted({(s, h.get("Cache-Status")) for s, h, _ in images if s != 200})
        assert all(h["Content-Type"] in ("image/jpeg", "image/webp") for _, h, _ in images)
        originals = [h for _, h, _ in images if "detail=encoder-busy" in h["Cache-Status"]]
        assert originals and all(h["Content-Type"] == "image/jpeg" for h in originals)
        ratio = image_rate / plex_rate
        print(f"image misses {image_rate:.0f}/s, Plex misses {plex_rate:.0f}/s: x{ratio:.2f}; "
              f"{len(originals)} answered with the original")
        assert ratio >= 0.7
        assert env.upstream_calls("tmdb_images", "/t/p/w92/saturation-0.jpg") == 1
        # Encoded later: the stored original is replaced by the WebP variant, without a refetch.
        async def encoded():
            _, headers, _ = await env.tmdb("/t/p/w92/saturation-0.jpg")
            return headers["Content-Type"] == "image/webp" and "hit" in headers["Cache-Status"]
        deadline = time.monotonic() + 120
        while not await encoded():
            assert time.monotonic() < deadline, "the deferred encodes never replaced the originals"
            await asyncio.sleep(0.5)
        assert env.upstream_calls("tmdb_images", "/t/p/w92/saturation-0.jpg") == 1
