"""The image cache's building blocks (projectionist/images.py): the Pillow transcoder on real
JPEG/PNG bytes from the fakes, the process pool surviving dead workers, the disk store's byte cap,
Accept negotiation and the checks of source URLs an upstream would fetch."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time

import pytest
from PIL import Image

from fake_upstreams.images import NOT_AN_IMAGE_BODY, bomb_png, render
from projectionist.images import (
    NOT_IMAGE,
    OK,
    TOO_LARGE,
    ImageEntry,
    ImagePool,
    ImageStore,
    Job,
    WorkerCrashed,
    _crash_for_tests,
    capabilities,
    check_source_url,
    etag_matches,
    negotiate,
    transcode,
)
from projectionist.rules import load_rules

from support import REPO

CAP = 50_000_000


def decoded(body: bytes) -> Image.Image:
    im = Image.open(io.BytesIO(body))
    im.load()
    return im


# --- the transcoder (called in-process here; the proxy only ever calls it in a worker) --------------

def test_webp_is_smaller_and_the_source_format_is_kept_when_not_accepted():
    jpeg = render("test-images-poster", 500, 750)
    webp = transcode(Job(jpeg, "webp", None, CAP))
    assert webp.outcome == OK and webp.content_type == "image/webp" and webp.source_format == "JPEG"
    assert len(webp.body) < 0.75 * len(jpeg) and decoded(webp.body).size == (500, 750)
    kept = transcode(Job(jpeg, None, None, CAP))
    assert kept.outcome == OK and kept.body is None and kept.content_type == "image/jpeg"  # the original itself
    assert kept.digest != webp.digest


def test_the_width_cap_applies_whatever_the_format():
    jpeg = render("test-images-backdrop", 1600, 900)
    for target, content_type in ((None, "image/jpeg"), ("webp", "image/webp")):
        result = transcode(Job(jpeg, target, 1280, CAP))
        assert result.content_type == content_type and (result.width, result.height) == (1280, 720)
        assert decoded(result.body).size == (1280, 720)
    small = transcode(Job(render("test-images-small", 300, 450), None, 1280, CAP))
    assert small.body is None  # narrower than the cap: untouched


def test_png_keeps_its_alpha_channel():
    im = Image.new("RGBA", (300, 200), (200, 30, 30, 0))
    im.paste((10, 200, 10, 255), (50, 50, 250, 150))
    out = io.BytesIO()
    im.save(out, "PNG")
    result = transcode(Job(out.getvalue(), "webp", None, CAP))
    assert result.content_type == "image/webp" and decoded(result.body).mode == "RGBA"
    assert decoded(result.body).getpixel((10, 10))[3] == 0


def test_the_original_is_kept_when_reencoding_would_not_make_it_smaller():
    source = io.BytesIO()
    Image.open(io.BytesIO(render("test-images-grainy", 400, 600))).save(source, "JPEG", quality=15)
    result = transcode(Job(source.getvalue(), "webp", None, CAP, webp_quality=100))
    assert result.outcome == OK and result.body is None and result.content_type == "image/jpeg"


@pytest.mark.skipif(not capabilities()["avif"], reason="this Pillow cannot write AVIF")
def test_avif_when_pillow_supports_it():
    result = transcode(Job(render("test-images-avif", 780, 1170), "avif", None, CAP))
    assert result.content_type == "image/avif" and decoded(result.body).size == (780, 1170)


def test_bombs_and_bodies_that_are_no_image_are_results_not_crashes():
    bomb = transcode(Job(bomb_png(), "webp", None, CAP))
    assert bomb.outcome == TOO_LARGE and "30000x30000" in bomb.detail
    assert transcode(Job(NOT_AN_IMAGE_BODY, "webp", None, CAP)).outcome == NOT_IMAGE
    jpeg = render("test-images-truncated", 500, 750)
    assert transcode(Job(jpeg[: len(jpeg) // 3], "webp", None, CAP)).outcome == NOT_IMAGE
    assert transcode(Job(b"", "webp", None, CAP)).outcome == NOT_IMAGE


# --- the process pool ----------------------------------------------------------------------------------

async def test_the_pool_survives_a_crashing_job_and_a_killed_worker():
    pool = await ImagePool(workers=2, timeout=20).start()
    try:
        jpeg = render("test-images-pool", 342, 513)
        result = await pool.run(transcode, Job(jpeg, "webp", None, CAP))
        assert result.outcome == OK and result.content_type == "image/webp"
        assert (await pool.run(transcode, Job(NOT_AN_IMAGE_BODY, "webp", None, CAP))).outcome == NOT_IMAGE
        assert pool.restarts == 0  # garbage is a result, never a dead worker
        with pytest.raises(WorkerCrashed):
            await pool.run(_crash_for_tests)  # dies on a fresh pool too: refused, not retried forever
        assert pool.restarts == 2
        assert (await pool.run(transcode, Job(jpeg, "webp", None, CAP))).outcome == OK
        for pid in pool.pids():  # killed from outside while idle
            os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)
        assert (await pool.run(transcode, Job(jpeg, "webp", None, CAP))).outcome == OK
        assert pool.restarts == 3
    finally:
        pool.shutdown()


@pytest.mark.skipif(not hasattr(os, "SCHED_BATCH"), reason="Linux scheduling classes")
async def test_workers_run_behind_the_proxy_but_are_never_starved():
    """Workers get a lower priority, not the idle class: with every core held by a normal-priority
    busy loop (a host transcoding video, say) a job still finishes, slowly. An idle-class worker
    would never run and every image miss would time out (seen under a loaded CI machine)."""
    pool = await ImagePool(workers=1, timeout=60).start()
    hogs: list[subprocess.Popen] = []
    try:
        policy, niceness = await pool.run(os.sched_getscheduler, 0), await pool.run(os.nice, 0)
        assert policy == os.SCHED_BATCH and niceness >= 10
        hogs += [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(os.cpu_count() or 1)]
        jpeg = render("test-images-busy-host", 342, 513)
        result = await pool.run(transcode, Job(jpeg, "webp", None, CAP))
        assert result.outcome == OK and pool.restarts == 0
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait(5)
        pool.shutdown()


# --- the disk store ----------------------------------------------------------------------------------

def entry(n: int, size: int, ttl: float = 3600, stored_at: float | None = None) -> ImageEntry:
    return ImageEntry(status=200, headers=[], body=bytes([n % 256]) * size, stored_at=stored_at or time.time(),
                      ttl=ttl, stale_while_revalidate=0, stale_if_error=0, route="tmdb.image",
                      partition="shared", content_type="image/webp", etag=f'"{n}"', source_size=size * 2)


def test_store_evicts_least_recently_used_at_its_byte_cap_and_survives_a_reopen(tmp_path):
    store = ImageStore(tmp_path / "images", max_bytes=3_000)
    for n in range(3):
        assert store.put(f"k{n}", entry(n, 800)) == []
    assert store.get("k0").body == bytes([0]) * 800  # k0 is now the most recently used
    assert store.put("k3", entry(3, 800)) == ["k1"]
    assert store.bytes <= 3_000 and "k1" not in store and store.get("k1") is None
    assert store.put("k4", entry(4, 2_500)) == ["k2", "k0", "k3"]
    assert store.evictions == 4 and store.keys() == ["k4"]
    store.close()
    again = ImageStore(tmp_path / "images", max_bytes=3_000)
    assert again.keys() == ["k4"] and again.bytes == entry(4, 2_500).size
    got = again.get("k4")
    assert got.etag == '"4"' and got.source_size == 5_000 and len(got.body) == 2_500
    again.close()


def test_store_removes_expired_entries_and_says_what_it_freed(tmp_path):
    store = ImageStore(tmp_path / "images", max_bytes=10**6)
    store.put("old", entry(1, 1000, ttl=10, stored_at=time.time() - 60))
    store.put("new", entry(2, 1000, ttl=3600))
    keys, freed = store.expired(time.time())
    assert keys == ["old"] and freed == entry(1, 1000).size
    assert store.keys() == ["new"] and store.get("old") is None
    store.close()


# --- helpers -------------------------------------------------------------------------------------------

CHROMIUM_IMG_ACCEPT = "image/avif,image/webp,image/apng,image/svg+xml,image/*,*/*;q=0.8"


@pytest.mark.parametrize("accept, offered, expected", [
    (CHROMIUM_IMG_ACCEPT, ["avif", "webp"], "avif"),
    (CHROMIUM_IMG_ACCEPT, ["webp"], "webp"),
    ("image/webp,*/*", ["avif", "webp"], "webp"),
    ("image/jpeg", ["avif", "webp"], None),
    ("*/*", ["webp"], None),  # a wildcard is no promise to decode WebP
    ("image/*", ["webp"], None),
    ("image/webp;q=0, image/avif;q=0.5", ["webp", "avif"], "avif"),
    (None, ["webp"], None),
])
def test_accept_negotiation(accept, offered, expected):
    assert negotiate(accept, offered) == expected


def test_etag_comparison():
    assert etag_matches('"abc"', '"abc"') and etag_matches('W/"abc"', '"abc"') and etag_matches("*", '"x"')
    assert etag_matches('"zzz", "abc"', '"abc"') and not etag_matches('"abd"', '"abc"')


RULES = load_rules(REPO / "rules.yaml")
PLEX_SERVERS = {("127.0.0.1", 32400)}


@pytest.mark.parametrize("url", [
    "/library/metadata/1001/thumb/1731000000",
    "%2Flibrary%2Fmetadata%2F1001%2Fart",
    "/library/parts/9001/indexes/sd/120000",
    "http://127.0.0.1:32400/library/metadata/1001/thumb",  # the declared Plex server itself
    "https://192-168-1-10.0123abcd.plex.direct:32400/library/metadata/1/thumb",
    "https://image.tmdb.org/t/p/w500/abc.jpg",
])
def test_source_urls_that_may_be_fetched(url):
    assert check_source_url(url, RULES.upstream_for_host, PLEX_SERVERS) is None


@pytest.mark.parametrize("url", [
    "http://127.0.0.1:8080/",
    "http://127.0.0.1:32401/library/metadata/1/thumb",  # the proxy's own listener, not the server
    "http://169.254.169.254/latest/meta-data/",
    "http://[::ffff:169.254.169.254]/",
    "http://[::1]:32400/",
    "http://localhost/",
    "http://10.0.0.7/x.jpg",
    "http://192.168.1.1/",
    "http://2130706433/",
    "http://0x7f.1/",
    "http://8.8.8.8/x.jpg",  # public, but named nowhere
    "http://evil.example/x.jpg",
    "http://image.tmdb.org@127.0.0.1/x.jpg",
    "file:///etc/passwd",
    "gopher://image.tmdb.org/",
    "//127.0.0.1/x",
    "/%2F127.0.0.1/x",
    "http%3A%2F%2F127.0.0.1%3A8080%2F",
    "http%253A%252F%252F169.254.169.254%252F",
    "/\\127.0.0.1/x",
    "library/metadata/1/thumb",
])
def test_source_urls_that_are_refused(url):
    assert check_source_url(url, RULES.upstream_for_host, PLEX_SERVERS)
