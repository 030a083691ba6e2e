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
import time
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


def run_page(stack, tmp_path, page: str, while_running=None, timeout: float = 60) -> dict:
    """Load `page` in headless Chromium configured like a user's browser; return its report."""
    assert CHROMIUM, "Chromium is missing: apt-get install chromium (.ci/run does)"
    with FrontendOrigin(page) as origin:
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
            if while_running:
                while_running()
            return origin.wait_report(timeout)
        finally:
            browser.terminate()
            browser.wait(10)


def save_artifact(name: str, report: dict) -> None:
    artifacts = REPO / "test-artifacts"
    artifacts.mkdir(exist_ok=True)
    (artifacts / name).write_text(json.dumps(report, indent=2))


def test_frontend_request_shapes_in_chromium(stack, tmp_path):
    config = {"plexUrl": stack.plex_url, "plexToken": PLEX_SERVER_TOKEN,
              "accountToken": PLEX_ACCOUNT_TOKEN, "tmdbBearer": TMDB_V4_TOKEN}
    report = run_page(stack, tmp_path, PAGE % {"config": json.dumps(config)})
    save_artifact("browser-report.json", report)

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


LOGIN_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>login flow</title></head><body><script>
// What the player does, with nothing but placeholders of its own: PIN login, resources, library,
// playback start. Everything it keeps goes to localStorage, as the real frontend does.
const headers = {Accept: "application/json", "X-Plex-Client-Identifier": "chromium-e2e", "X-Plex-Product": "Player"};
const report = {seen: []};
async function json(url, options) {
  const r = await fetch(url, options);
  const text = await r.text();
  report.seen.push(r.status + " " + [...r.headers].map(h => h.join(": ")).join("\\n") + "\\n" + text);
  return {status: r.status, body: text.startsWith("{") || text.startsWith("[") ? JSON.parse(text) : text};
}
async function main() {
  try {
    const pin = (await json("https://plex.tv/api/v2/pins?strong=true", {method: "POST", headers})).body;
    let token = null;
    for (let i = 0; i < 100 && !token; i++) {
      token = (await json(`https://plex.tv/api/v2/pins/${pin.id}`, {headers})).body.authToken;
      if (!token) await new Promise(r => setTimeout(r, 100));
    }
    localStorage.setItem("app.settings.v1", JSON.stringify({plexAccountToken: token, tmdbBearer: "placeholder"}));
    const resources = (await json("https://plex.tv/api/v2/resources?includeHttps=1&includeRelay=1",
                                  {headers: {...headers, "X-Plex-Token": token}})).body;
    const server = resources.find(r => r.provides.includes("server"));
    const settings = {plexAccountToken: token, plexBaseUrl: server.connections[0].uri,
                      plexToken: server.accessToken, tmdbBearer: "placeholder"};
    localStorage.setItem("app.settings.v1", JSON.stringify(settings));
    const q = "X-Plex-Token=" + settings.plexToken;
    const sections = await json(`${settings.plexBaseUrl}/library/sections?${q}`, {headers: {Accept: "application/json"}});
    report.sections = sections.body.MediaContainer.Directory.map(d => d.title);
    const sid = "chromium-session-1";
    const start = `path=%2Flibrary%2Fmetadata%2F1001&session=${sid}&protocol=dash&${q}`;
    report.decision = (await json(`${settings.plexBaseUrl}/video/:/transcode/universal/decision?${start}`,
                                  {headers: {Accept: "application/json", "X-Plex-Token": settings.plexToken}})).status;
    report.manifest = (await json(`${settings.plexBaseUrl}/video/:/transcode/universal/start.mpd?${start}`)).status;
    const segment = await fetch(`${settings.plexBaseUrl}/video/:/transcode/universal/session/${sid}/0/header`);
    report.segment = segment.status;
    const trending = await json("https://api.themoviedb.org/3/trending/movie/week",
                                {headers: {Authorization: "Bearer " + settings.tmdbBearer}});
    report.trending = trending.status;
    report.localStorage = localStorage.getItem("app.settings.v1");
  } catch (e) { report.error = String(e); }
  await fetch("/report", {method: "POST", body: JSON.stringify(report)});
}
main();
</script></body></html>
"""


def test_login_to_playback_in_chromium_holds_only_surrogates(stack, tmp_path, clean_fakes):
    from fake_upstreams.data import PLEX_ACCOUNT_TOKEN_2, PLEX_SERVER_TOKEN_2, TMDB_V3_KEY

    def link_the_pin_when_created() -> None:  # the user signing in on app.plex.tv
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            pins = [p for p in list(stack.fakes.plextv.pins.values()) if p["clientIdentifier"] == "chromium-e2e"]
            if pins:
                stack.fakes.plextv.link_pin(pins[-1]["id"], account_token=PLEX_ACCOUNT_TOKEN)
                return
            time.sleep(0.05)
        raise AssertionError("the page never created a PIN")

    report = run_page(stack, tmp_path, LOGIN_PAGE, while_running=link_the_pin_when_created)
    save_artifact("browser-login-report.json", report)
    assert "error" not in report, report.get("error")
    assert "Films" in report["sections"]
    assert (report["decision"], report["manifest"], report["segment"], report["trending"]) == (200, 200, 200, 200)
    settings = json.loads(report["localStorage"])
    assert settings["plexAccountToken"].startswith("pj_") and settings["plexToken"].startswith("pj_")
    assert settings["plexBaseUrl"] == stack.plex_url
    # Every byte the page received, and what it stored, is free of real credentials.
    seen = "\n".join(report["seen"]) + report["localStorage"]
    for secret in (PLEX_ACCOUNT_TOKEN, PLEX_SERVER_TOKEN, PLEX_ACCOUNT_TOKEN_2, PLEX_SERVER_TOKEN_2,
                   TMDB_V3_KEY, TMDB_V4_TOKEN):
        assert secret not in seen
    # ... while the upstreams received the real ones.
    assert any(r.query.get("X-Plex-Token") == [PLEX_SERVER_TOKEN] and "/session/" in r.path
               for r in clean_fakes.requests["plex"])
    assert clean_fakes.requests["tmdb"][-1].query.get("api_key") == [TMDB_V3_KEY]
