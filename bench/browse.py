"""Browsing benchmark: headless Chromium through Projectionist, like a person using the player.

    python bench/browse.py [--people N] [--warm before|during|none] [--latency plex=0.08,...] [--json]

Everything on 127.0.0.1: the fake upstreams (`python -m fake_upstreams --latency ...`, a remote
Plex, plex.tv and TMDB), Projectionist with the shipped rules.yaml, and Chromium configured like
a user's browser (explicit proxy + trusted CA, a fresh profile per session). One page makes the
player's request shapes (tests/test_e2e_browser.py, /work/shared/frontend-traffic.md):

    sign-in   PIN create, poll, the user approves (the fake's /test/link), resources, user, users
    Home      sections, onDeck, recentlyAdded, a random hero per section, TMDB trending + popular,
              and every poster they show (Plex thumbs, TMDB w342): "time to all posters" is measured
    library   /library/sections/1/all (sort, 100 per page), genres, collections, their thumbs
    details   two titles: metadata (+extras), children, TMDB details, credits, recommendations,
              similar, videos, images; the backdrop (w1280)
    search    "matrix" typed letter by letter: Plex /hubs/search and /search, TMDB search/multi
    New & Popular, My List (discover watchlist), player start (decision, start.mpd)

Between pages the person looks for `--think` seconds (default 1). Before session 1 the cache warmer runs once (as the cache-warm job asks; `--warm during`: as the people start; `--no-warm`: not).
`--people N` (default 1): N browsers at once, each a fresh profile signed in with an account of
its own where the fakes have one (fake_upstreams/data.py ACCOUNTS has two; person 3 reuses the
first in its own profile, with its own client identifier), the same pages but their own details
titles and search word. Each uses as TMDB key the surrogate the settings page would show its user.
Per person and in total: Projectionist-made 429s (target 0), queued requests and the longest queue
wait (rate_limit_events, by the person's account: people sharing an account share its rows), hit
ratios; the page's own count of 429 answers.
Session 1 is cold, session 2 (a fresh profile and a fresh sign-in of the same account) comes
after it; a third run loads Home straight from the fakes (no proxy): the direct baseline.
Printed from the proxy's usage_events: hit ratio of session 1, of session 2's cacheable requests
and of all its requests, misses by reason (Cache-Status), Projectionist-made 429s and the longest
rate-limit queue wait (rate_limit_events), and Home's time to all posters cold / warm / direct.

Targets (issue 15): session 1 >= 60%, session 2 cacheable >= 95%, 0 Projectionist 429s. The
exit status is 1 only if a page failed or a process did not exit cleanly (--strict: a target).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _stack import REPO_ROOT, ProxyProcess, free_port  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FAKE_TO_RULES = {"plex": "plex", "plextv": "plextv", "tmdb": "tmdb", "tmdb_images": "tmdb-images", "trakt": "trakt"}
DEFAULT_LATENCY = "plex=0.08,plextv=0.1,tmdb=0.15,tmdb_images=0.05"

PAGE = r"""<!doctype html>
<html><head><meta charset="utf-8"><title>browse</title></head><body><div id="images"></div><script>
const cfg = %(config)s;
const report = {steps: {}, failures: []};
const clientId = crypto.randomUUID();  // a fresh profile: a new client identifier, as the player makes
const plexHeaders = {Accept: "application/json", "X-Plex-Client-Identifier": clientId, "X-Plex-Product": "Player",
                     "X-Plex-Platform": "Chrome", "X-Plex-Device": "Linux"};
const tmdbHeaders = {Authorization: "Bearer " + cfg.tmdbBearer, Accept: "application/json"};
report.answers429 = 0;  // 429s this person's page received (any maker)
let plex = cfg.plexUrl, plexToken = cfg.plexToken;
const q = () => `X-Plex-Token=${plexToken}&X-Plex-Client-Identifier=${clientId}&X-Plex-Product=Player`;
async function get(url, options) {
  try {
    const r = await fetch(url, options);
    const text = await r.text();
    if (r.status === 429) report.answers429++;
    if (!r.ok) report.failures.push(r.status + " " + url.split("?")[0]);
    return text.startsWith("{") || text.startsWith("[") ? JSON.parse(text) : {};
  } catch (e) { report.failures.push("error " + url.split("?")[0] + " " + e); return {}; }
}
const px = path => get(`${plex}${path}${path.includes("?") ? "&" : "?"}${q()}`, {headers: {Accept: "application/json"}});
const tmdb = path => get(`${cfg.tmdb}/3${path}`, {headers: tmdbHeaders});
function images(urls) {
  return Promise.all(urls.map(src => new Promise(resolve => {
    const img = new Image();
    img.onload = () => resolve(true);
    img.onerror = () => { report.failures.push("image " + src.split("?")[0]); resolve(false); };
    img.src = src;
    document.getElementById("images").appendChild(img);
  })));
}
const items = mc => (mc && mc.MediaContainer && (mc.MediaContainer.Metadata || mc.MediaContainer.Directory)) || [];
const thumbs = list => list.filter(m => m.thumb).map(m => `${plex}${m.thumb}?${q()}`);
const posters = list => list.filter(m => m.poster_path).map(m => `${cfg.images}/t/p/w342${m.poster_path}`);
async function step(name, fn) {
  const started = performance.now();
  try { await fn(); } catch (e) { report.failures.push(name + ": " + e); }
  report.steps[name] = Math.round(performance.now() - started);
  await new Promise(r => setTimeout(r, cfg.thinkMs || 0));  // a person looks at the page before the next
}
async function signIn() {
  const pin = await get(`${cfg.plextv}/api/v2/pins?strong=true`, {method: "POST", headers: plexHeaders});
  const account = cfg.accountToken ? `?account_token=${cfg.accountToken}` : "";
  await fetch(`${cfg.linkUrl}/test/link/${pin.id}${account}`, {method: "POST"});  // the user approves on app.plex.tv
  let token = null;
  for (let i = 0; i < 50 && !token; i++) {
    token = (await get(`${cfg.plextv}/api/v2/pins/${pin.id}`, {headers: plexHeaders})).authToken;
    if (!token) await new Promise(r => setTimeout(r, 200));
  }
  const auth = {headers: {...plexHeaders, "X-Plex-Token": token}};
  const resources = await get(`${cfg.plextv}/api/v2/resources?includeHttps=1&includeRelay=1`, auth);
  await get(`${cfg.plextv}/api/v2/user`, auth);
  await get(`${cfg.plextv}/api/v2/users`, auth);
  const server = resources.find(r => r.provides.includes("server"));
  plex = server.connections[0].uri; plexToken = server.accessToken;
  cfg.accountToken = token;
  if (cfg.tmdbBearerFromSignIn) {  // the TMDB value the settings page shows this user: their own surrogate
    const minted = await (await fetch("/bearer", {method: "POST", body: JSON.stringify({token})})).json();
    if (minted.bearer) { tmdbHeaders.Authorization = "Bearer " + minted.bearer; report.userId = minted.userId; }
  }
}
async function home() {
  const [sections, onDeck, recent, trending, trendingTv, popular] = await Promise.all([
    px("/library/sections"), px("/library/onDeck"), px("/library/recentlyAdded?X-Plex-Container-Size=50"),
    tmdb("/trending/movie/week"), tmdb("/trending/tv/week"), tmdb("/movie/popular")]);
  const heroes = await Promise.all(items(sections).map(s =>
    px(`/library/sections/${s.key}/all?type=1&sort=random:desc&X-Plex-Container-Start=0&X-Plex-Container-Size=1`)));
  await images([...thumbs(items(onDeck)), ...thumbs(items(recent)), ...heroes.flatMap(h => thumbs(items(h))),
                ...posters(trending.results || []), ...posters(trendingTv.results || []),
                ...posters(popular.results || [])]);
  report.sectionKeys = items(sections).map(s => s.key);
  report.ratingKeys = items(recent).map(m => m.ratingKey).slice(0, 2);
  const ids = (trending.results || []).map(m => m.id);  // each person opens titles of their own
  report.tmdbIds = ids.length ? (cfg.titles || [0, 1]).map(i => ids[i %% ids.length]) : [];
}
async function library() {
  const key = (report.sectionKeys || ["1"])[0];
  const [all] = await Promise.all([
    px(`/library/sections/${key}/all?sort=titleSort&X-Plex-Container-Start=0&X-Plex-Container-Size=100`),
    px(`/library/sections/${key}/genre`), px(`/library/sections/${key}/collections`)]);
  await images(thumbs(items(all)));
}
async function details() {
  for (let i = 0; i < 2; i++) {
    const rk = (report.ratingKeys || [])[i], id = (report.tmdbIds || [])[i];
    const calls = [];
    if (rk) calls.push(px(`/library/metadata/${rk}?includeExtras=1&includeExternalMedia=1&includeChildren=1`),
                       px(`/library/metadata/${rk}/children`));
    if (id) calls.push(tmdb(`/movie/${id}`), tmdb(`/movie/${id}/credits`), tmdb(`/movie/${id}/recommendations`),
                       tmdb(`/movie/${id}/similar`), tmdb(`/movie/${id}/videos`),
                       tmdb(`/movie/${id}/images?include_image_language=en%%2Cnull`));
    const answers = await Promise.all(calls);
    const movie = answers.find(a => a.backdrop_path);
    if (movie) await images([`${cfg.images}/t/p/w1280${movie.backdrop_path}`]);
  }
}
async function search() {
  const word = cfg.searchWord || "matrix";
  for (let n = 1; n <= word.length; n++) {
    const typed = encodeURIComponent(word.slice(0, n));
    await Promise.all([px(`/hubs/search?query=${typed}&limit=30`), px(`/search?type=1&query=${typed}`),
                       tmdb(`/search/multi?query=${typed}&include_adult=false&page=1`)]);
    await new Promise(r => setTimeout(r, 120));  // a person's typing speed
  }
}
async function newAndPopular() {
  const lists = await Promise.all([tmdb("/trending/all/day"), tmdb("/movie/upcoming?region=US"),
                                   tmdb("/tv/popular"), tmdb("/movie/popular")]);
  await images(lists.flatMap(l => posters(l.results || [])));
}
async function myList() {
  await get(`${cfg.discover}/library/sections/watchlist/all?includeFields=title,type,year,ratingKey&X-Plex-Container-Start=0&X-Plex-Container-Size=200&X-Plex-Token=${cfg.accountToken}`,
            {headers: plexHeaders});
}
async function playerStart() {
  const rk = (report.ratingKeys || ["1001"])[0];
  const start = `path=%%2Flibrary%%2Fmetadata%%2F${rk}&session=${clientId}&protocol=dash&${q()}`;
  await get(`${plex}/video/:/transcode/universal/decision?${start}`, {headers: {Accept: "application/json", "X-Plex-Token": plexToken}});
  await fetch(`${plex}/video/:/transcode/universal/start.mpd?${start}`);
}
async function main() {
  if (cfg.mode === "direct") {
    await step("home", home);
  } else {
    await step("signIn", signIn);
    await step("home", home);
    await step("library", library);
    await step("details", details);
    await step("search", search);
    await step("newAndPopular", newAndPopular);
    await step("myList", myList);
    await step("playerStart", playerStart);
  }
  await fetch("/report", {method: "POST", body: JSON.stringify(report)});
}
main();
</script></body></html>
"""


class Origin:
    """The player's origin: serves the page, receives its report (own thread and loop)."""

    def __init__(self, page: str, mint=None) -> None:
        self.page, self.port, self.mint = page, free_port(), mint
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.report: asyncio.Future | None = None
        self.runner: web.AppRunner | None = None

    def __enter__(self) -> Origin:
        threading.Thread(target=self._run, daemon=True).start()
        assert self.ready.wait(10)
        return self

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.report = self.loop.create_future()

        async def index(_):
            return web.Response(text=self.page, content_type="text/html")

        async def report(request):
            if not self.report.done():
                self.report.set_result(await request.json())
            return web.Response(text="ok")

        async def bearer(request):  # what the settings page shows the signed-in user as TMDB key
            token = (await request.json()).get("token")
            minted = self.mint(token) if self.mint and token else None
            return web.json_response({"bearer": minted[0], "userId": minted[1]} if minted else {})

        app = web.Application()
        app.router.add_get("/", index)
        app.router.add_post("/bearer", bearer)
        app.router.add_post("/report", report)
        self.runner = web.AppRunner(app, access_log=None)
        self.loop.run_until_complete(self.runner.setup())
        self.loop.run_until_complete(web.TCPSite(self.runner, "127.0.0.1", self.port).start())
        self.ready.set()
        self.loop.run_forever()

    def wait(self, timeout: float) -> dict:
        return asyncio.run_coroutine_threadsafe(asyncio.wait_for(self.report, timeout), self.loop).result()

    def __exit__(self, *exc) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)


def spki_hash(ca_path: Path) -> str:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    cert = x509.load_pem_x509_certificate(ca_path.read_bytes())
    spki = cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(hashlib.sha256(spki).digest()).decode()


def tmdb_minter(proxy: ProxyProcess):
    """The user's TMDB surrogate for a signed-in player's account surrogate, as control/settings.py
    hands it out (the proxy alone runs here; the same vault, in the proxy's home)."""
    from control.settings import tmdb_bearer
    from projectionist.vault import SecretBox, Vault

    def mint(account_surrogate: str) -> tuple[str, int] | None:
        vault = Vault(proxy.db_path, SecretBox.load(proxy.home))
        try:
            entry = vault.resolve(account_surrogate)
            return (tmdb_bearer(vault, entry.user_id), entry.user_id) if entry and entry.user_id else None
        finally:
            vault.close()
    return mint


def run_browser(config: dict, profile: Path, proxy: ProxyProcess | None, timeout: float, mint=None) -> dict:
    args = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={profile}", "--remote-debugging-port=0"]
    if proxy is not None:
        args += [f"--proxy-server={proxy.proxy_url}",
                 f"--ignore-certificate-errors-spki-list={spki_hash(proxy.home / 'mitmproxy' / 'mitmproxy-ca-cert.pem')}"]
    with Origin(PAGE % {"config": json.dumps(config)}, mint) as origin:
        browser = subprocess.Popen([*args, f"http://127.0.0.1:{origin.port}/"], stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        try:
            return origin.wait(timeout)
        finally:
            browser.terminate()
            try:
                browser.wait(10)
            except subprocess.TimeoutExpired:
                browser.kill()
                browser.wait()


class Fakes:
    """`python -m fake_upstreams --base-port 0 --latency ...` in its own process."""

    def __init__(self, latency: str) -> None:
        self.latency, self.urls, self.proc = latency, {}, None

    def __enter__(self) -> Fakes:
        self.proc = subprocess.Popen([sys.executable, "-m", "fake_upstreams", "--base-port", "0", "--latency",
                                      self.latency], cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True)
        while len(self.urls) < len(FAKE_TO_RULES):
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError("the fake upstreams did not start")
            name, _, url = line.strip().partition("=")
            self.urls[name] = url
        return self

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        self.proc.wait(15)


def warm_run(db: Path, timeout: float) -> int:
    conn = sqlite3.connect(db, isolation_level=None, timeout=10)
    try:
        request_id = conn.execute("INSERT INTO cache_flush_requests (target, value, requested_at) "
                                  "VALUES ('warm', 'bench', datetime('now'))").lastrowid
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            row = conn.execute("SELECT flushed FROM cache_flush_requests WHERE id = ? AND applied_at IS NOT NULL",
                               (request_id,)).fetchone()
            if row:
                return row[0]
            time.sleep(0.2)
        raise RuntimeError("the proxy did not carry out the warm run")
    finally:
        conn.close()


def session_stats(db: Path, since: float, until: float, user_id: int | None = None) -> dict:
    """The session's figures from usage_events and rate_limit_events; with `user_id`, that account's rows
    only (the person's: people sharing an account share them; images carry no user)."""
    who, args = ("", ()) if user_id is None else (" AND user_id = ?", (user_id,))
    conn = sqlite3.connect(db)
    try:
        rows = conn.execute("SELECT cache, cache_reason, status, method, route FROM usage_events WHERE ts >= ? AND ts < ? "
                            "AND listener != 'warm'" + who,
                            (since, until, *args)).fetchall()
        # The warmer's refusals are not recorded (it yields); its requests carry no user.
        queued = conn.execute("SELECT count(*), max(waited_ms) FROM rate_limit_events WHERE outcome = 'queued' "
                              "AND ts >= ? AND ts < ?" + who, (since, until, *args)).fetchone()
        refused = conn.execute("SELECT count(*) FROM rate_limit_events WHERE outcome IN ('refused', 'stale') "
                               "AND ts >= ? AND ts < ?" + who, (since, until, *args)).fetchone()[0]
        stale = conn.execute("SELECT count(*) FROM rate_limit_events WHERE outcome = 'stale' "
                             "AND ts >= ? AND ts < ?" + who, (since, until, *args)).fetchone()[0]
    finally:
        conn.close()
    player = [r for r in rows if r[3] != "OPTIONS"]  # preflights are the browser's, not the player's
    cacheable = [r for r in player if r[0] in ("hit", "stale", "miss")]
    hits = [r for r in player if r[0] in ("hit", "stale")]
    return {
        "requests": len(player),
        "cacheable": len(cacheable),
        "hit_ratio_cacheable": round(len(hits) / len(cacheable), 3) if cacheable else None,
        "hit_ratio_all": round(len(hits) / len(player), 3) if player else None,
        "misses_by_reason": dict(Counter(r[1] or "none" for r in cacheable if r[0] == "miss").most_common()),
        "misses_by_route": dict(Counter(r[4] or "none" for r in cacheable if r[0] == "miss").most_common()),
        "not_cacheable_by_reason": dict(Counter(r[1] or "none" for r in player if r[0] not in ("hit", "stale", "miss"))
                                        .most_common()),
        "projectionist_429": refused - stale,  # a refused slot answered with stale data is no 429
        "stale_for_refused_slot": stale,
        "answers_429": sum(1 for r in player if r[2] == 429),
        "queued": queued[0], "longest_queue_wait_ms": queued[1],
    }


SEARCH_WORDS = ("matrix", "dune", "arrival", "inception", "blade")
PERSON_FIGURES = ("projectionist_429", "queued", "longest_queue_wait_ms", "hit_ratio_cacheable", "cacheable", "requests")


def person_config(base: dict, i: int) -> dict:
    """Person i: the same pages, their own account (the fakes have two; a third person reuses one,
    in its own profile with its own client identifier), their own titles and search word."""
    from fake_upstreams.data import ACCOUNTS
    account = ACCOUNTS[i % len(ACCOUNTS)]
    return {**base, "accountToken": account.account_token, "account": account.username,
            "titles": [2 * i, 2 * i + 1], "searchWord": SEARCH_WORDS[i % len(SEARCH_WORDS)]}


def bench(args) -> dict:
    assert CHROMIUM, "Chromium is missing: apt-get install chromium (.ci/run does)"
    report: dict = {"latency": args.latency, "people": args.people}
    with tempfile.TemporaryDirectory(prefix="pj-browse-") as tmp, Fakes(args.latency) as fakes:
        overrides = {FAKE_TO_RULES[name]: url for name, url in fakes.urls.items()}
        with ProxyProcess(overrides) as proxy:
            config = {"plexUrl": "", "plexToken": "", "tmdbBearer": "placeholder",
                      "plextv": "https://plex.tv", "discover": "https://discover.provider.plex.tv",
                      "tmdb": "https://api.themoviedb.org", "images": "https://image.tmdb.org",
                      "linkUrl": fakes.urls["plextv"], "thinkMs": int(args.think * 1000)}
            warming = None
            if args.warm == "before":  # what the cache-warm job does: ask the proxy for a warm run, wait for it
                started = time.time()
                report["warm"] = {"requests": warm_run(proxy.db_path, args.timeout * 4),
                                  "seconds": round(time.time() - started, 1)}
            elif args.warm == "during":  # the job's run starts as the people do: they must go first
                warming = ThreadPoolExecutor(1)
                warm_started = time.time()
                warm_future = warming.submit(warm_run, proxy.db_path, args.timeout * 4)
            config["tmdbBearerFromSignIn"] = True
            people = [person_config(config, i) for i in range(args.people)]
            mint = tmdb_minter(proxy)
            for n in (1, 2):
                started = time.time()
                with ThreadPoolExecutor(args.people) as pool:  # the people browse at the same time
                    pages = list(pool.map(lambda i: run_browser(people[i], Path(tmp) / f"profile-{n}-{i + 1}", proxy,
                                                                args.timeout, mint), range(args.people)))
                time.sleep(1.0)  # the usage writer commits every 0.1 s
                until = time.time()
                stats = session_stats(proxy.db_path, started, until)
                persons = []
                for i, page in enumerate(pages):
                    mine = session_stats(proxy.db_path, started, until, page.get("userId")) if page.get("userId") else {}
                    persons.append({"account": people[i]["account"], "user_id": page.get("userId"),
                                    "search": people[i]["searchWord"], "titles": people[i]["titles"],
                                    "answers_429_seen": page.get("answers429", 0),
                                    **{k: mine.get(k) for k in PERSON_FIGURES},
                                    "steps_ms": page["steps"], "failures": page["failures"][:20]})
                report[f"session{n}"] = {**stats, "steps_ms": pages[0]["steps"],
                                         "failures": [f for page in pages for f in page["failures"]][:20],
                                         "people": persons}
                if n == 1:
                    time.sleep(args.pause)
            if warming is not None:
                report["warm"] = {"requests": warm_future.result(), "during": True,
                                  "seconds": round(time.time() - warm_started, 1)}
                warming.shutdown()
            proxy.stop()
            report["proxy_errors_logged"] = proxy.logged_errors()[:10]
        from fake_upstreams.data import PLEX_SERVER_TOKEN, TMDB_V4_TOKEN
        direct = {"mode": "direct", "plexUrl": fakes.urls["plex"], "plexToken": PLEX_SERVER_TOKEN,
                  "tmdbBearer": TMDB_V4_TOKEN, "tmdb": fakes.urls["tmdb"], "images": fakes.urls["tmdb_images"]}
        page = run_browser(direct, Path(tmp) / "profile-direct", None, args.timeout)
        report["direct"] = {"steps_ms": page["steps"], "failures": page["failures"][:20]}
    report["home_ms"] = {"cold": report["session1"]["steps_ms"].get("home"),
                         "warm": report["session2"]["steps_ms"].get("home"),
                         "direct": report["direct"]["steps_ms"].get("home")}
    return report


def render(r: dict) -> str:
    s1, s2 = r["session1"], r["session2"]
    lines = [
        f"browse (fakes' latency {r['latency']}), {r['people']} people at once; warm run: {r.get('warm', 'none')}",
        f"  session 1 (cold):  hit ratio {s1['hit_ratio_cacheable']} of {s1['cacheable']} cacheable "
        f"(target >= 0.60), {s1['hit_ratio_all']} of all {s1['requests']}",
        f"  session 2 (fresh profile, fresh sign-in): {s2['hit_ratio_cacheable']} of {s2['cacheable']} cacheable "
        f"(target >= 0.95), {s2['hit_ratio_all']} of all {s2['requests']}",
        f"  misses by reason, session 1: {s1['misses_by_reason']}",
        f"  misses by route, session 1: {s1['misses_by_route']}",
        f"  misses by reason, session 2: {s2['misses_by_reason']}",
        f"  not cacheable, session 2: {s2['not_cacheable_by_reason']}",
        f"  Projectionist-made 429s: {s1['projectionist_429']} + {s2['projectionist_429']} (target 0); "
        f"queued {s1['queued']} + {s2['queued']}, longest wait {s1['longest_queue_wait_ms']} / "
        f"{s2['longest_queue_wait_ms']} ms",
        f"  Home, time to all posters: cold {r['home_ms']['cold']} ms, warm {r['home_ms']['warm']} ms, "
        f"direct {r['home_ms']['direct']} ms",
    ]
    for n in (1, 2):
        for i, person in enumerate(r[f"session{n}"].get("people", []) if r["people"] > 1 else []):
            lines.append(
                f"  session {n}, person {i + 1} ({person['account']}, titles {person['titles']}, "
                f"search {person['search']!r}): Projectionist-made 429s {person['projectionist_429']} "
                f"(429s the page saw {person['answers_429_seen']}), queued {person['queued']}, longest wait "
                f"{person['longest_queue_wait_ms']} ms, hit ratio {person['hit_ratio_cacheable']} of "
                f"{person['cacheable']} cacheable (the account's rows), home {person['steps_ms'].get('home')} ms, "
                f"details {person['steps_ms'].get('details')} ms, search {person['steps_ms'].get('search')} ms")
    for name in ("session1", "session2", "direct"):
        if r[name]["failures"]:
            lines.append(f"  {name} failures: {r[name]['failures']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency", default=DEFAULT_LATENCY, help=f"fakes' latency (default {DEFAULT_LATENCY})")
    parser.add_argument("--people", type=int, default=1,
                        help="people browsing at the same time, each in a fresh profile with an account of their own "
                             "where the fakes have one (default 1)")
    parser.add_argument("--warm", choices=("before", "during", "none"), default="before",
                        help="the cache-warm job's run: before session 1 (default), during it, or none")
    parser.add_argument("--no-warm", dest="warm", action="store_const", const="none", help="--warm none")
    parser.add_argument("--think", type=float, default=1.0,
                        help="seconds a person spends on each page before the next (default 1)")
    parser.add_argument("--pause", type=float, default=2.0, help="seconds between the two sessions (default 2)")
    parser.add_argument("--timeout", type=float, default=120.0, help="per page (default 120 s)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    args = parser.parse_args(argv)
    report = bench(args)
    print(json.dumps(report, indent=2) if args.json else render(report))
    failed = any(report[n]["failures"] for n in ("session1", "session2", "direct"))
    missed = (report["session1"]["hit_ratio_cacheable"] or 0) < 0.6 or \
        (report["session2"]["hit_ratio_cacheable"] or 0) < 0.95 or \
        report["session1"]["projectionist_429"] + report["session2"]["projectionist_429"] > 0
    return 1 if failed or (args.strict and missed) else 0


if __name__ == "__main__":
    sys.exit(main())
