"""The offline demo to the end, in headless Chromium set up like a user's browser (the proxy, its CA
trusted by key): "Log in with Plex" through the Approve page the proxy serves for app.plex.tv, the
Home rows (Plex, TMDB, Trakt), Trakt connect (device code, approved on trakt.tv/activate), and Play:
direct play and MSE playback of the fake Plex's DASH and HLS sessions advance `video.currentTime`
through the proxy while the player's ~4/s timeline reports reach the fake at the configured throttle.

The page makes the real player's request shapes (tests/test_e2e_browser.py has the plain ones);
Chromium is driven over the DevTools protocol only to click the Approve button, as a person would.
"""

from __future__ import annotations

import base64
import json
import subprocess
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from test_control_browser import DevTools
from test_e2e_browser import save_artifact, spki_hash

from fake_upstreams.data import PLEX_ACCOUNT_TOKEN, PLEX_SERVER_TOKEN, TRAKT_ACCESS_TOKEN

from support import REPO, start_chromium

pytestmark = [pytest.mark.e2e, pytest.mark.browser]

PLAYER = """<!doctype html>
<html><head><meta charset="utf-8"><title>player (demo)</title></head>
<body><h1>Player</h1><img id="avatar" alt="avatar"><div id="rows"></div>
<video id="direct" muted crossorigin="anonymous" width="426" height="240"></video>
<video id="dash" muted width="426" height="240"></video><video id="hls" muted width="426" height="240"></video>
<script>
const cfg = %(config)s;
const plexHeaders = {Accept: "application/json", "X-Plex-Client-Identifier": cfg.clientId, "X-Plex-Product": "Player"};
const traktHeaders = {"Content-Type": "application/json", "trakt-api-version": "2", "trakt-api-key": cfg.traktId};
const report = {seen: []};
const sleep = ms => new Promise(r => setTimeout(r, ms));
async function get(url, options) {
  const r = await fetch(url, options);
  const text = await r.text();
  report.seen.push(url.split("?")[0] + " " + r.status + " " + text.slice(0, 2000));
  let body = text;
  try { body = JSON.parse(text); } catch (e) {}
  return {status: r.status, body};
}
function loadImage(img, src) {
  return new Promise(resolve => {
    img.onload = () => resolve({ok: true, width: img.naturalWidth});
    img.onerror = () => resolve({ok: false});
    img.src = src;
  });
}

async function signIn() {  // the player's "Log in with Plex": the whole page goes to app.plex.tv
  const pin = (await get("https://plex.tv/api/v2/pins?strong=true", {method: "POST", headers: plexHeaders})).body;
  const forwardUrl = `${location.origin}/login?pinID=${pin.id}&code=${pin.code}`;
  location.assign("https://app.plex.tv/auth/#!?" + new URLSearchParams(
    {clientID: cfg.clientId, code: pin.code, forwardUrl, "context[device][product]": "Player"}));
}

async function home(token) {
  const user = (await get("https://plex.tv/api/v2/user", {headers: {...plexHeaders, "X-Plex-Token": token}})).body;
  report.username = user.username;
  report.avatar = await loadImage(document.getElementById("avatar"), user.thumb);
  const resources = (await get("https://plex.tv/api/v2/resources?includeHttps=1&includeRelay=1",
                               {headers: {...plexHeaders, "X-Plex-Token": token}})).body;
  const server = resources.find(r => r.provides.includes("server"));
  const settings = {plexAccountToken: token, plexBaseUrl: server.connections[0].uri, plexToken: server.accessToken,
                    tmdbBearer: "placeholder", plexClientId: cfg.clientId};
  localStorage.setItem("app.settings.v1", JSON.stringify(settings));
  const q = "X-Plex-Token=" + settings.plexToken;
  const sections = await get(`${settings.plexBaseUrl}/library/sections?${q}`, {headers: {Accept: "application/json"}});
  report.sections = sections.body.MediaContainer.Directory.map(d => d.title);
  const trending = await get("https://api.themoviedb.org/3/trending/movie/week",
                             {headers: {Authorization: "Bearer " + settings.tmdbBearer}});
  report.tmdbTrending = trending.body.results.length;
  report.trakt = {};
  for (const path of ["/movies/trending", "/movies/popular", "/shows/trending", "/shows/popular"]) {
    const r = await get("https://api.trakt.tv" + path, {headers: traktHeaders});
    report.trakt[path] = {status: r.status, count: Array.isArray(r.body) ? r.body.length : 0};
  }
  return settings;
}

async function connectTrakt() {  // device code; the user allows it on trakt.tv/activate
  const code = (await get("https://api.trakt.tv/oauth/device/code",
                          {method: "POST", headers: traktHeaders, body: JSON.stringify({client_id: cfg.traktId})})).body;
  report.traktVerificationUrl = code.verification_url;
  await fetch(code.verification_url, {method: "POST", mode: "no-cors", body: new URLSearchParams({code: code.user_code})});
  let tokens = null;
  for (let i = 0; i < 50 && !tokens; i++) {
    const r = await get("https://api.trakt.tv/oauth/device/token", {method: "POST", headers: traktHeaders,
      body: JSON.stringify({code: code.device_code, client_id: cfg.traktId, client_secret: cfg.traktSecret})});
    if (r.status === 200) tokens = r.body; else await sleep(Math.min(code.interval || 1, 1) * 300);
  }
  const watchlist = await get("https://api.trakt.tv/users/me/watchlist/movies",
                              {headers: {...traktHeaders, Authorization: "Bearer " + tokens.access_token}});
  return {accessToken: tokens.access_token, watchlist: watchlist.status};
}

async function playFor(video, seconds, onTick) {
  const started = performance.now();
  try { await video.play(); } catch (e) { return {error: "play(): " + e}; }
  const first = video.currentTime;
  while (video.currentTime - first < seconds && performance.now() - started < 30000 && !video.error) {
    if (onTick) onTick(video);
    await sleep(250);  // the player reports progress about four times a second
  }
  video.pause();
  return {advanced: video.currentTime - first, error: video.error && video.error.code, wall: (performance.now() - started) / 1000};
}

async function mse(video, tracks) {  // tracks: [{type, urls}], appended in order, as dash.js/hls.js would
  const source = new MediaSource();
  video.src = URL.createObjectURL(source);
  await new Promise(r => source.addEventListener("sourceopen", r, {once: true}));
  await Promise.all(tracks.map(async track => {
    const buffer = source.addSourceBuffer(track.type);
    for (const url of track.urls) {
      const r = await fetch(url);
      if (!r.ok) throw new Error(url + " " + r.status);
      buffer.appendBuffer(await r.arrayBuffer());
      await new Promise(r => buffer.addEventListener("updateend", r, {once: true}));
    }
  }));
  return playFor(video, 3.5);
}

async function play(settings) {
  const q = "X-Plex-Token=" + settings.plexToken;
  const base = settings.plexBaseUrl;
  const meta = (await get(`${base}/library/metadata/1001?${q}`, {headers: {Accept: "application/json"}})).body;
  const item = meta.MediaContainer.Metadata[0];
  const part = item.Media[0].Part[0];
  // Direct play, with the timeline reports the player sends while it plays.
  const direct = document.getElementById("direct");
  direct.src = `${base}${part.key}?${q}`;
  report.timelineSent = 0;
  const sid = "demo-session-1";
  const timeline = (state, video) => {
    report.timelineSent++;
    fetch(`${base}/:/timeline?ratingKey=${item.ratingKey}&key=%%2Flibrary%%2Fmetadata%%2F${item.ratingKey}` +
          `&state=${state}&time=${Math.round(video.currentTime * 1000)}&duration=${item.duration}` +
          `&X-Plex-Session-Identifier=${sid}&X-Plex-Client-Identifier=${cfg.clientId}&${q}`,
          {headers: {Accept: "application/json"}});
  };
  report.direct = await playFor(direct, 3.5, video => timeline("playing", video));
  timeline("stopped", direct);
  // DASH: decision, start.mpd, then the manifest's token-less segments.
  const start = `path=%%2Flibrary%%2Fmetadata%%2F${item.ratingKey}&session=${sid}-dash&protocol=dash&directPlay=0&${q}`;
  const tc = `${base}/video/:/transcode/universal/`;
  await get(`${tc}decision?${start}`, {headers: {Accept: "application/json", "X-Plex-Token": settings.plexToken}});
  const mpd = new DOMParser().parseFromString((await get(`${tc}start.mpd?${start}`)).body, "application/xml");
  const tracks = [...mpd.getElementsByTagName("Representation")].map(rep => {
    const t = rep.getElementsByTagName("SegmentTemplate")[0];
    return {type: `${rep.getAttribute("mimeType")}; codecs="${rep.getAttribute("codecs")}"`,
            urls: [tc + t.getAttribute("initialization"),
                   ...[0, 1].map(n => tc + t.getAttribute("media").replace("$Number$", n))]};
  });
  report.dashTypes = tracks.map(t => [t.type, MediaSource.isTypeSupported(t.type)]);
  report.dash = await mse(document.getElementById("dash"), tracks);
  // HLS: master playlist, one media playlist per rendition (fMP4: EXT-X-MAP + .m4s), played through MSE.
  const hlsStart = start.replace("protocol=dash", "protocol=hls").replace(`${sid}-dash`, `${sid}-hls`);
  const masterUrl = `${tc}start.m3u8?${hlsStart}`;
  const master = (await get(masterUrl)).body;
  const codecs = /CODECS="([^"]+)"/.exec(master)[1].split(",");
  const audioUri = /TYPE=AUDIO[^\\n]*URI="([^"]+)"/.exec(master)[1];
  const videoUri = master.split("\\n").find(l => l && !l.startsWith("#"));
  const hlsTracks = [];
  for (const [uri, type] of [[videoUri, `video/mp4; codecs="${codecs[0]}"`], [audioUri, `audio/mp4; codecs="${codecs[1]}"`]]) {
    const playlistUrl = new URL(uri, masterUrl).href;
    const playlist = (await get(playlistUrl)).body;
    const init = /#EXT-X-MAP:URI="([^"]+)"/.exec(playlist)[1];
    const segments = playlist.split("\\n").filter(l => l && !l.startsWith("#")).slice(0, 2);
    hlsTracks.push({type, urls: [init, ...segments].map(u => new URL(u, playlistUrl).href)});
  }
  report.hls = await mse(document.getElementById("hls"), hlsTracks);
}

async function afterLogin(pinId) {
  let token = null;
  for (let i = 0; i < 100 && !token; i++) {  // the player polls the PIN until plex.tv has linked it
    token = (await get(`https://plex.tv/api/v2/pins/${pinId}`, {headers: plexHeaders})).body.authToken;
    if (!token) await sleep(200);
  }
  report.accountToken = token;
  const settings = await home(token);
  report.traktConnect = await connectTrakt();
  await play(settings);
  report.localStorage = localStorage.getItem("app.settings.v1");
}

const params = new URLSearchParams(location.search);
const run = location.pathname === "/login" ? afterLogin(params.get("pinID")) : signIn();
run.catch(e => { report.error = String(e) + " " + (e.stack || ""); })
   .finally(() => { if (location.pathname === "/login") { window.report = report; document.body.dataset.done = "1"; } });
</script></body></html>
"""


async def start_player_origin(page: str) -> tuple[web.AppRunner, str]:
    """The player's own origin: the same page at `/` and at `/login` (plex.tv's forwardUrl)."""
    async def serve(_request: web.Request) -> web.Response:
        return web.Response(text=page, content_type="text/html")

    app = web.Application()
    app.router.add_get("/", serve)
    app.router.add_get("/login", serve)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}"


async def start_browser(stack, profile: Path, log: Path) -> tuple[subprocess.Popen, str]:
    return await start_chromium(profile, log, f"--proxy-server={stack.proxy_url}",
                                f"--ignore-certificate-errors-spki-list={spki_hash(stack.ca_path)}")


async def screenshot(page: DevTools, name: str) -> None:
    shot = await page.send("Page.captureScreenshot", format="png")
    artifacts = REPO / "test-artifacts"
    artifacts.mkdir(exist_ok=True)
    (artifacts / name).write_bytes(base64.b64decode(shot["data"]))


def timeline_requests(fakes) -> list:
    return [r for r in fakes.requests["plex"] if r.path == "/:/timeline"]


async def test_demo_sign_in_home_trakt_and_play_in_chromium(stack, tmp_path, clean_fakes):
    config = {"clientId": "demo-player-e2e", "traktId": "frontend-bundled-trakt-id",
              "traktSecret": "frontend-bundled-trakt-secret"}
    runner, origin = await start_player_origin(PLAYER % {"config": json.dumps(config)})
    browser, ws_url = await start_browser(stack, tmp_path / "profile", tmp_path / "chromium.log")
    try:
        async with aiohttp.ClientSession() as session, session.ws_connect(ws_url, max_msg_size=0) as ws:
            page = DevTools(ws)
            await page.send("Page.navigate", url=origin + "/")
            # The player sent the whole window to app.plex.tv: the proxy serves the demo's Approve page.
            await page.wait_for("location.host === 'app.plex.tv' && document.querySelector('button[data-account]')"
                                " && !document.querySelector('button[data-account]').disabled",
                                what="the Approve page on app.plex.tv")
            assert await page.evaluate("document.getElementById('code').textContent") != "(none)"
            await screenshot(page, "demo-approve-page.png")
            await page.evaluate("document.querySelector('button[data-account=\"mrandersson\"]').click()")
            await page.wait_for("location.pathname === '/login' && document.body && document.body.dataset.done",
                                timeout=120, what="the player to sign in, load Home, connect Trakt and play")
            report = await page.evaluate("window.report")
            await screenshot(page, "demo-player.png")
    finally:
        browser.terminate()
        browser.wait(10)
        await runner.cleanup()
    save_artifact("demo-browser-report.json", {k: v for k, v in report.items() if k != "seen"})
    assert "error" not in report, report["error"]

    # Signed in through the Approve page; the player holds a surrogate only.
    assert report["accountToken"].startswith("pj_") and report["username"] == "mrandersson"
    assert report["avatar"]["ok"] and report["avatar"]["width"] > 0, "the plex.tv avatar did not load"
    # Home: Plex sections, TMDB and the Trakt rows (the demo's Trakt app credentials were injected).
    assert "Films" in report["sections"] and report["tmdbTrending"] > 0
    assert all(row["status"] == 200 and row["count"] > 0 for row in report["trakt"].values()), report["trakt"]
    assert {r.headers.get("trakt-api-key") for r in clean_fakes.requests["trakt"]} - {None} == {
        __import__("fake_upstreams.data", fromlist=["x"]).TRAKT_CLIENT_ID}
    # Trakt connect: device code approved on trakt.tv/activate (served by the fake Trakt in the demo).
    assert report["traktVerificationUrl"] == "https://trakt.tv/activate"
    assert report["traktConnect"]["accessToken"].startswith("pj_") and report["traktConnect"]["watchlist"] == 200
    assert any(r.path == "/activate" and r.method == "POST" for r in clean_fakes.requests["trakt"])

    # Play: real media advanced through the proxy, direct and through MSE (DASH, HLS).
    assert report["direct"]["error"] is None and report["direct"]["advanced"] >= 3, report["direct"]
    assert all(supported for _type, supported in report["dashTypes"]), report["dashTypes"]
    assert report["dash"]["error"] is None and report["dash"]["advanced"] >= 3, report["dash"]
    assert report["hls"]["error"] is None and report["hls"]["advanced"] >= 3, report["hls"]
    parts = [r for r in clean_fakes.requests["plex"] if r.path.startswith("/library/parts/")]
    assert parts and all(r.query.get("X-Plex-Token") == [PLEX_SERVER_TOKEN] for r in parts)

    # Timeline reports, ~4/s from the page, reach the fake once per 10 s per session plus each state
    # change (rules.yaml plex.timeline): here the first "playing" and the "stopped".
    sent = report["timelineSent"]
    assert sent >= 10
    reached = timeline_requests(clean_fakes)
    states = [r.query.get("state", [None])[0] for r in reached]
    allowed = 2 + int(report["direct"]["wall"] // 10) + 1
    assert states[0] == "playing" and "stopped" in states and len(reached) <= allowed, (sent, states)

    seen = "\n".join(report["seen"]) + report["localStorage"]
    for secret in (PLEX_ACCOUNT_TOKEN, PLEX_SERVER_TOKEN, TRAKT_ACCESS_TOKEN):
        assert secret not in seen
