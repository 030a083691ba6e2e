"""Headless Chromium, configured like a user's browser (proxy + trusted CA), loading a page that
makes the frontend's request shapes: CORS-preflighted TMDB and plex.tv calls through the explicit
proxy, Plex JSON/XML and images through the reverse listener, TMDB images as plain <img>."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import shutil
import subprocess
import threading
from pathlib import Path

import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from fake_upstreams.data import PLEX_ACCOUNT_TOKEN, PLEX_SERVER_TOKEN, TMDB_V4_TOKEN

from support import REPO, free_port

pytestmark = [pytest.mark.e2e, pytest.mark.browser]

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>frontend shapes</title></head>
<body><h1>Projectionist browser check</h1><div id="images"></div>
<script>
const cfg = %(config)s;
const results = {};
function loadImage(src) {
  return new Promise(resolve => {
    const img = new Image();
    img.onload = () => resolve({ok: true, width: img.naturalWidth, height: img.naturalHeight});
    img.onerror = () => resolve({ok: false});
    img.src = src;
    document.getElementById("images").appendChild(img);
  });
}
async function step(name, fn) {
  try { results[name] = await fn(); } catch (e) { results[name] = {error: String(e)}; }
}
async function main() {
  const plexQs = "X-Plex-Token=" + cfg.plexToken;
  await step("tmdbTrending", async () => {
    const r = await fetch("https://api.themoviedb.org/3/trending/movie/week",
                          {headers: {Authorization: "Bearer " + cfg.tmdbBearer, Accept: "application/json"}});
    const body = await r.json();
    return {status: r.status, count: body.results.length, poster: body.results[0].poster_path};
  });
  await step("tmdbMovie", async () => {
    const r = await fetch("https://api.themoviedb.org/3/movie/603?append_to_response=credits",
                          {headers: {Authorization: "Bearer " + cfg.tmdbBearer}});
    return {status: r.status, title: (await r.json()).title};
  });
  await step("plexTvResources", async () => {
    const r = await fetch("https://plex.tv/api/v2/resources?includeHttps=1&includeRelay=1",
                          {headers: {"X-Plex-Token": cfg.accountToken, Accept: "application/json",
                                     "X-Plex-Client-Identifier": "browser-test", "X-Plex-Product": "Player"}});
    const body = await r.json();
    return {status: r.status, servers: body.filter(x => x.provides.includes("server")).length};
  });
  await step("plexSectionsJson", async () => {
    const r = await fetch(cfg.plexUrl + "/library/sections?" + plexQs, {headers: {Accept: "application/json"}});
    return {status: r.status, titles: (await r.json()).MediaContainer.Directory.map(d => d.title)};
  });
  await step("plexSectionsXml", async () => {
    const r = await fetch(cfg.plexUrl + "/library/sections?" + plexQs);
    const text = await r.text();
    return {status: r.status, xml: text.includes("<MediaContainer")};
  });
  await step("plexThumb", () => loadImage(cfg.plexUrl + "/library/metadata/1001/thumb/1731000000?" + plexQs));
  await step("tmdbImage", () => loadImage("https://image.tmdb.org/t/p/w342" +
                                           (results.tmdbTrending.poster || "/missing.jpg")));
  await fetch("/report", {method: "POST", body: JSON.stringify(results)});
}
main();
</script></body></html>
"""


def spki_hash(ca_path: Path) -> str:
    """Chromium can trust our CA by key: mitmproxy signs every leaf certificate with the CA's key."""
    cert = x509.load_pem_x509_certificate(ca_path.read_bytes())
    spki = cert.public_key().public_bytes(serialization.Encoding.DER,
                                          serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(hashlib.sha256(spki).digest()).decode()


class FrontendOrigin:
    """Serves the test page (the player's origin) and receives its report."""

    def __init__(self, page: str) -> None:
        self.page = page
        self.port = free_port()
        self.report: asyncio.Future | None = None
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()

    def __enter__(self) -> FrontendOrigin:
        threading.Thread(target=self._run, daemon=True).start()
        assert self.ready.wait(10)
        return self

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.report = self.loop.create_future()
        app = web.Application()

        async def index(_request):
            return web.Response(text=self.page, content_type="text/html")

        async def report(request):
            if not self.report.done():
                self.report.set_result(await request.json())
            return web.Response(text="thanks")

        app.router.add_get("/", index)
        app.router.add_post("/report", report)
        runner = web.AppRunner(app)
        self.loop.run_until_complete(runner.setup())
        self.loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", self.port).start())
        self.ready.set()
        self.loop.run_forever()

    def wait_report(self, timeout: float) -> dict:
        return asyncio.run_coroutine_threadsafe(asyncio.wait_for(self.report, timeout), self.loop).result()

    def __exit__(self, *exc) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)


def test_frontend_request_shapes_in_chromium(stack, tmp_path):
    assert CHROMIUM, "Chromium is missing: apt-get install chromium (.ci/run does)"
    config = {"plexUrl": stack.plex_url, "plexToken": PLEX_SERVER_TOKEN,
              "accountToken": PLEX_ACCOUNT_TOKEN, "tmdbBearer": TMDB_V4_TOKEN}
    artifacts = REPO / "test-artifacts"
    artifacts.mkdir(exist_ok=True)
    with FrontendOrigin(PAGE % {"config": json.dumps(config)}) as origin:
        browser = subprocess.Popen([
            CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}",
            f"--proxy-server={stack.proxy_url}",
            f"--ignore-certificate-errors-spki-list={spki_hash(stack.ca_path)}",
            "--remote-debugging-port=0",  # keeps headless Chromium running until the report arrives
            f"http://127.0.0.1:{origin.port}/",
        ], stdout=subprocess.DEVNULL, stderr=(tmp_path / "chromium.log").open("w"))
        try:
            report = origin.wait_report(60)
        finally:
            browser.terminate()
            browser.wait(10)
    (artifacts / "browser-report.json").write_text(json.dumps(report, indent=2))

    assert report["tmdbTrending"]["status"] == 200 and report["tmdbTrending"]["count"] > 0
    assert report["tmdbMovie"] == {"status": 200, "title": "The Matrix"}
    assert report["plexTvResources"]["status"] == 200 and report["plexTvResources"]["servers"] >= 1
    assert report["plexSectionsJson"]["status"] == 200 and "Films" in report["plexSectionsJson"]["titles"]
    assert report["plexSectionsXml"] == {"status": 200, "xml": True}
    assert report["plexThumb"]["ok"] and report["plexThumb"]["width"] > 0
    assert report["tmdbImage"] == {"ok": True, "width": 342, "height": report["tmdbImage"]["height"]}

    routes = {r["route"] for r in stack.wait_usage("route = 'tmdb.image'")} | {
        r["route"] for r in stack.usage()}
    assert {"tmdb.trending", "tmdb.details", "plextv.resources", "plex.sections", "plex.image",
            "tmdb.image"} <= routes
    # The CORS preflights went through the proxy to the upstreams too.
    assert stack.usage("method = 'OPTIONS' AND upstream = 'tmdb' AND status < 300")
