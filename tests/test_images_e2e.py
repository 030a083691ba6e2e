"""The image cache in the whole stack (`projectionist run`): headless Chromium loading plain <img>
URLs through the proxy, a real client revalidating, SSRF refused, and the control plane's stats."""

from __future__ import annotations

import json
import uuid

import pytest
import requests

from fake_upstreams.data import PLEX_SERVER_TOKEN

from support import wait_for
from test_control_e2e import admin_client
from test_e2e_browser import run_page, save_artifact

pytestmark = [pytest.mark.e2e]

CHROMIUM_IMG_ACCEPT = "image/avif,image/webp,image/apng,image/svg+xml,image/*,*/*;q=0.8"

PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>images</title></head><body><div id="images"></div><script>
const cfg = %(config)s;
function loadImage(src) {
  return new Promise(resolve => {
    const img = new Image();
    img.onload = () => resolve({ok: true, width: img.naturalWidth, height: img.naturalHeight});
    img.onerror = () => resolve({ok: false});
    img.src = src;
    document.getElementById("images").appendChild(img);
  });
}
async function main() {
  const report = {};
  for (const [name, src] of Object.entries(cfg)) report[name] = await loadImage(src);
  await fetch("/report", {method: "POST", body: JSON.stringify(report)});
}
main();
</script></body></html>
"""


def client(stack) -> requests.Session:
    session = requests.Session()
    session.trust_env = False
    session.proxies = {"https": stack.proxy_url}
    session.verify = str(stack.ca_path)
    return session


@pytest.mark.browser
def test_img_loads_in_chromium_hit_the_cache_and_are_reencoded_and_capped(stack, tmp_path, clean_fakes):
    run = uuid.uuid4().hex[:12]
    primed = f"/t/p/w342/e2e-primed-{run}.jpg"
    player = client(stack)
    first = player.get(f"https://image.tmdb.org{primed}", headers={"Accept": CHROMIUM_IMG_ACCEPT}, timeout=30)
    assert first.status_code == 200 and first.headers["Content-Type"] in ("image/avif", "image/webp")
    assert "fwd=uri-miss" in first.headers["Cache-Status"]
    again = player.get(f"https://image.tmdb.org{primed}", headers={"Accept": CHROMIUM_IMG_ACCEPT,
                                                                   "If-None-Match": first.headers["ETag"]})
    assert again.status_code == 304 and again.content == b""

    config = {
        "original": f"https://image.tmdb.org/t/p/original/e2e-original-{run}.jpg",  # 2000x3000 at the source
        "primed": f"https://image.tmdb.org{primed}",
        "plexThumb": f"{stack.plex_url}/library/metadata/1002/thumb/1731000000?X-Plex-Token={PLEX_SERVER_TOKEN}",
        "bomb": "https://image.tmdb.org/t/p/original/bomb.png",
    }
    report = run_page(stack, tmp_path, PAGE % {"config": json.dumps(config)})
    save_artifact("browser-images-report.json", report)
    assert report["original"] == {"ok": True, "width": 1280, "height": 1920}  # capped, and decodable
    assert report["primed"] == {"ok": True, "width": 342, "height": 513}
    assert report["plexThumb"]["ok"] and report["plexThumb"]["width"] == 1000
    assert report["bomb"] == {"ok": False}
    # The browser's load of the primed image was answered by the cache: the CDN saw one request.
    assert len([r for r in clean_fakes.requests["tmdb_images"] if r.path == primed]) == 1
    assert stack.wait_usage("route = 'tmdb.image' AND cache = 'hit' AND status = 200")
    assert stack.wait_usage("route = 'tmdb.image' AND status = 422")  # the bomb, refused


def test_photo_transcode_ssrf_refused_and_image_stats_in_the_control_plane(stack, clean_fakes):
    player = requests.Session()
    player.trust_env = False
    for target in ("http://169.254.169.254/latest/meta-data/", f"http://127.0.0.1:{stack.control_port}/api/health"):
        r = player.get(f"{stack.plex_url}/photo/:/transcode", timeout=30, params={
            "width": 320, "height": 180, "url": target, "X-Plex-Token": PLEX_SERVER_TOKEN})
        assert r.status_code == 403, target
    assert not [r for r in clean_fakes.requests["plex"] if r.path == "/photo/:/transcode"]
    ok = player.get(f"{stack.plex_url}/photo/:/transcode", timeout=30, headers={"Accept": "image/webp"}, params={
        "width": 320, "height": 180, "url": "/library/metadata/1001/thumb", "X-Plex-Token": PLEX_SERVER_TOKEN})
    assert ok.status_code == 200 and ok.headers["Content-Type"] == "image/webp"

    path = f"https://image.tmdb.org/t/p/w500/e2e-stats-{uuid.uuid4().hex[:12]}.jpg"
    tmdb = client(stack)
    for _ in range(2):
        assert tmdb.get(path, headers={"Accept": "image/webp"}, timeout=30).status_code == 200
    admin = admin_client(stack)

    def images_bucket():
        stats = admin.get("/api/cache/stats?hours=1").json()
        bucket = next((b for b in stats["buckets"] if b["bucket"] == "images"), None)
        routes = {r["route"]: r for r in stats["routes"] if r["bucket"] == "images"}
        settled = bucket and bucket["hits"] >= 1 and bucket["misses"] >= 1 and bucket["bytes_saved"] > 0 \
            and bucket["bytes"] > 0 and "tmdb.image" in routes and "plex.photo-transcode" in routes
        return (bucket, routes) if settled else None

    bucket, routes = wait_for(images_bucket, what="the image bucket in /api/cache/stats")
    assert routes["tmdb.image"]["keys"] >= 1 and routes["tmdb.image"]["bytes_saved"] > 0
    assert bucket["evictions"] >= 0
    keys = admin.get("/api/cache/keys?bucket=images&limit=500").json()
    assert keys["total"] >= 2 and "t/p/" not in json.dumps(keys) and PLEX_SERVER_TOKEN not in json.dumps(keys)
