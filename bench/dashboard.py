"""Dashboard speed over a big store: every canned query and chart of datasette_metadata.yml must answer in < 1 s,
and every chart of the dashboard home in < 300 ms.

    python bench/dashboard.py [--rows 1000000] [--days 14] [--runs 3] [--keep DIR] [--json]

Generates `--rows` usage rows spread over the last `--days` days into a temporary store, written
through the product's own code (UsageWriter's batch write keeps usage_hourly and
credential_hourly; the trigger keeps rate_limit_hourly; PlaybackWriter turns simulated timeline
reports into plays), then starts Datasette exactly as `projectionist dashboard` does (same
command, settings, metadata and Basic authentication) and times, for every canned query, the
HTML page and the chart's data request (the `.json?_shape=array` that datasette-vega fetches),
plus the view pages. Then the dashboard home (/-/dashboards/home, datasette-dashboards): its page
(which runs the filters' option queries) and each chart's request exactly as the browser sends it
(`/<db>.json?sql=<canned query name>&_shape=objects`, see projectionist/dashboard_charts.py), with
the default range and with the filters set (a week, an upstream, a user); PASS below 300 ms.
Each figure is the median of `--runs` requests. Exit status 1 if anything FAILs or answers an error.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import requests  # noqa: E402
import yaml  # noqa: E402

from projectionist.analytics import MetadataBody, PlaybackReport, PlaybackWriter  # noqa: E402
from projectionist.config import Config  # noqa: E402
from projectionist.dashboard import ADMIN_USER, DATABASE, admin_password, datasette_command, datasette_env  # noqa: E402
from projectionist.store import UsageEvent, UsageWriter, connect, open_db  # noqa: E402

LIMIT_S = 1.0
HOME_LIMIT_S = 0.3  # each chart of the dashboard home

# Why misses happened (usage_events.cache_reason), in about the mix a browsing session shows.
MISS_REASONS = ("uri-miss", "uri-miss", "uri-miss", "stale:expired", "uri-miss:new-partition", "vary-miss",
                "uri-miss:evicted", "uri-miss:invalidated")
# (upstream, route, weight, mean latency ms, bytes, cacheable hit rate, credential kind)
ROUTES = [
    ("plex", "plex.timeline", 30, 8, 300, 0.0, "vault"),
    ("plex", "plex.image", 14, 15, 60_000, 0.85, "vault"),
    ("plex", "plex.photo-transcode", 6, 40, 25_000, 0.7, "vault"),
    ("plex", "plex.metadata", 6, 30, 9_000, 0.5, "vault"),
    ("plex", "plex.section.items", 3, 60, 80_000, 0.6, "vault"),
    ("plex", "plex.sections", 2, 12, 2_000, 0.8, "vault"),
    ("plex", "plex.on-deck", 1, 45, 30_000, 0.3, "vault"),
    ("plex", "plex.transcode.segment", 8, 25, 900_000, 0.0, "vault"),
    ("plex", "plex.transcode.decision", 1, 120, 4_000, 0.0, "vault"),
    ("plex", "plex.scrobble", 0.2, 10, 0, 0.0, "vault"),
    ("plextv", "plextv.resources", 1, 180, 6_000, 0.5, "vault"),
    ("plextv", "plextv.user", 1, 150, 3_000, 0.5, "vault"),
    ("plextv", "plextv.watchlist", 0.5, 300, 20_000, 0.3, "vault"),
    ("tmdb", "tmdb.details", 8, 90, 15_000, 0.6, None),
    ("tmdb", "tmdb.search", 5, 110, 8_000, 0.2, None),
    ("tmdb", "tmdb.trending", 2, 80, 12_000, 0.9, None),
    ("tmdb", "tmdb.lists", 1, 85, 12_000, 0.8, None),
    ("tmdb-images", "tmdb.image", 10, 70, 45_000, 0.9, None),
    ("trakt", "trakt.me", 1, 200, 5_000, 0.1, "vault"),
    ("trakt", "trakt.public-lists", 1, 220, 20_000, 0.7, "default"),
]
USERNAMES = ["alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan", "judy", "mallory", "oscar"]
MOVIES = [("1001", "The Matrix", 1999, 8_160_000), ("1002", "Spirited Away", 2001, 7_500_000),
          ("1003", "Alien", 1979, 7_020_000), ("1004", "Heat", 1995, 10_200_000),
          ("1005", "Amelie", 2001, 7_320_000), ("1006", "Arrival", 2016, 6_960_000)]
SHOWS = [("Severance", "2001"), ("The Expanse", "2002"), ("Dark", "2003")]


def _diurnal(rng: random.Random, start: float, days: int) -> float:
    """A timestamp in [start, start + days): more traffic in the evening (UTC)."""
    day = rng.randrange(days)
    hour = min(23, max(0, int(rng.gauss(19, 4)) % 24))
    return start + day * 86400 + hour * 3600 + rng.random() * 3600


def generate(db_path: Path, rows: int, *, days: int = 14, seed: int = 1, now: float | None = None,
             plays: int | None = None, users: tuple[str, ...] = tuple(USERNAMES)) -> dict:
    """Fill a store with `rows` usage rows over the last `days` days, and viewing history."""
    rng = random.Random(seed)
    now = time.time() if now is None else now
    start = math.floor((now - days * 86400) / 3600) * 3600 + 3600
    db = open_db(db_path)
    conn = db.conn
    conn.execute("BEGIN")
    user_ids = []
    for i, name in enumerate(users, start=1):
        conn.execute("INSERT OR IGNORE INTO users (id, plex_account_id, username, email, created_at) "
                     "VALUES (?, ?, ?, ?, '2024-01-01T00:00:00+00:00')",
                     (i, f"acct-{i}", name, f"{name}@example.invalid"))
        user_ids.append(i)
    conn.execute("COMMIT")
    custom_key_users = set(user_ids[::4])
    weights = [r[2] for r in ROUTES]
    written = 0
    t0 = time.monotonic()
    batch: list[UsageEvent] = []
    limits = []
    while written < rows:
        n = min(20_000, rows - written)
        batch = []
        for upstream, route, _w, mean, size, hit_rate, credential in rng.choices(ROUTES, weights, k=n):
            ts = min(_diurnal(rng, start, days), now - 1)
            user = rng.choice(user_ids) if rng.random() > 0.03 else None
            roll = rng.random()
            status, error = 200, None
            if roll < 0.004:
                status, error = None, "Server connection failed"
            elif roll < 0.012:
                status = 502
            elif roll < 0.03:
                status = 404
            elif roll < 0.036:
                status = 429
            cache = "none"
            if hit_rate:
                cache = "hit" if rng.random() < hit_rate else ("stale" if rng.random() < 0.05 else "miss")
            latency = rng.lognormvariate(math.log(mean), 0.6) if cache not in ("hit", "stale") else rng.uniform(0.3, 3)
            reason = None if cache == "hit" else (
                "bypass:no-rule" if cache == "none" else "stale:stale-while-revalidate" if cache == "stale"
                else rng.choice(MISS_REASONS))
            if upstream == "tmdb":
                credential = "custom" if user in custom_key_users else "default"
            batch.append(UsageEvent(ts=ts, listener="reverse" if upstream == "plex" else "regular",
                                    upstream=upstream, route=route, method="GET", status=status,
                                    latency_ms=round(latency, 3), bytes_in=0 if route != "plex.timeline" else 120,
                                    bytes_out=int(size * rng.uniform(0.5, 1.5)) if status == 200 else 200,
                                    cache=cache, user_id=user, credential=credential, error=error,
                                    cache_reason=reason))
            if status == 429 or (upstream == "tmdb" and rng.random() < 0.01):
                limits.append((ts, user, "10.0.0.%d" % (user or 0), upstream, f"{upstream}-per-ip",
                               round(rng.uniform(5, 800), 1), "refused" if status == 429 else "queued"))
        batch.sort(key=lambda e: e.ts)
        assert UsageWriter._write(conn, batch), "usage batch not written"
        written += n
    conn.execute("BEGIN")
    conn.executemany("INSERT INTO rate_limit_events (ts, user_id, client, upstream, rule, waited_ms, outcome) "
                     "VALUES (?, ?, ?, ?, ?, ?, ?)", limits)
    for i in range(300):
        route = rng.choice(["tmdb.image", "plex.image", "tmdb.details", "plex.metadata", "plex.sections"])
        conn.execute("INSERT INTO cache_entries (key_hash, bucket, route, scope, size, created_at, expires_at, hits, "
                     "last_hit_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                     (f"k{i:06d}", "image" if "image" in route else "response", route,
                      rng.choice(["shared", "user"]), rng.randrange(2_000, 200_000), now - rng.uniform(0, 86400),
                      now + rng.uniform(-3600, 86400), rng.randrange(0, 500), now - rng.uniform(0, 7200)))
    # A day's worth of scheduled jobs per day (control/jobs.py), one in twenty failed.
    for day in range(days):
        for job in ("retention", "cache-cleanup", "trakt-refresh", "library-sync", "backup"):
            started = start + day * 86400 + rng.uniform(0, 86000)
            failed = rng.random() < 0.05
            conn.execute("INSERT INTO job_runs (job, trigger, started_at, ended_at, deadline_at, status, items, error) "
                         "VALUES (?, 'schedule', ?, ?, ?, ?, ?, ?)",
                         (job, started, started + rng.uniform(0.1, 30), started + 600,
                          "failed" if failed else "ok", rng.randrange(0, 500), "upstream timed out" if failed else None))
    # The watchlist sync (control/watchlist.py): a few changes a day, some of them dry runs. A random
    # source of its own: the rows generated before and after stay what they were for a seed.
    wl = random.Random(seed + 1)
    titles = [("movie", "Arrival", '["imdb://tt2543164", "tmdb://329865"]'),
              ("show", "Severance", '["imdb://tt11280740", "tmdb://95396", "tvdb://371980"]'),
              ("movie", "Dune: Part Two", '["imdb://tt15239678", "tmdb://693134"]')]
    for day in range(days):
        for _ in range(wl.randrange(0, 4)):
            kind, title, guids = wl.choice(titles)
            ts = datetime.fromtimestamp(start + day * 86400 + wl.uniform(0, 86000), UTC).isoformat(timespec="seconds")
            dry = wl.random() < 0.2
            conn.execute("INSERT INTO watchlist_sync_events (ts, user_id, direction, action, media_type, title, guids,"
                         " dry_run, outcome) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                         (ts, wl.choice(user_ids), wl.choice(["plex->trakt", "trakt->plex"]),
                          wl.choice(["add", "add", "remove"]), kind, title, guids, int(dry),
                          "planned" if dry else "ok"))
    conn.execute("COMMIT")
    usage_s = time.monotonic() - t0
    t1 = time.monotonic()
    play_count = _generate_plays(conn, rng, user_ids, start, now, days, plays if plays is not None else max(20, rows // 500))
    conn.close()
    return {"rows": written, "rate_limit_events": len(limits), "plays": play_count,
            "usage_seconds": round(usage_s, 1), "plays_seconds": round(time.monotonic() - t1, 1)}


OPEN_PLAYS = 3


def _generate_plays(conn, rng: random.Random, user_ids: list[int], start: float, now: float, days: int,
                    count: int) -> int:
    """Plays through PlaybackWriter, from timeline reports every 10 s, as the player sends them."""
    writer = PlaybackWriter(":memory:", clock=lambda: now)
    items: list = []
    catalog = [{"ratingKey": rk, "type": "movie", "title": t, "year": y, "duration": d} for rk, t, y, d in MOVIES]
    for show, base in SHOWS:
        for season in (1, 2):
            for episode in range(1, 7):
                catalog.append({"ratingKey": f"{base}{season}{episode:02d}", "type": "episode",
                                "title": f"Episode {episode}", "grandparentTitle": show, "parentIndex": season,
                                "index": episode, "duration": 3_000_000})
    items.append(MetadataBody(ts=start, raw=json.dumps({"MediaContainer": {"Metadata": catalog}}).encode(),
                              content_type="application/json"))
    for i in range(count):
        item = rng.choice(catalog)
        user = rng.choice(user_ids)
        client = f"client-{user}-{i}"  # one device per play: plays of a device never overlap
        t = _diurnal(rng, start, days)
        duration = item["duration"]
        watch = duration * rng.choice([0.1, 0.5, 0.95, 1.0])
        position = rng.uniform(0, duration * 0.2)
        state = "playing"
        while position < min(duration, watch) and t < now - 60:
            items.append(PlaybackReport(ts=t, kind="timeline", rating_key=item["ratingKey"], user_id=user,
                                        client=client, player="Plex Web / Chrome", state=state,
                                        position_ms=int(position), duration_ms=duration))
            state = "paused" if rng.random() < 0.01 else "playing"
            t += 10
            position += 10_000 if state == "playing" else 0
        items.append(PlaybackReport(ts=t, kind="timeline", rating_key=item["ratingKey"], user_id=user, client=client,
                                    player="Plex Web / Chrome", state="stopped", position_ms=int(position),
                                    duration_ms=duration))
        if i % 7 == 0:
            items.append(PlaybackReport(ts=t + 1, kind="scrobble", rating_key=item["ratingKey"], user_id=user))
    for user in user_ids[:OPEN_PLAYS]:  # playing now: the home's "Playing now" card has rows to find
        item = rng.choice(catalog)
        for t in (now - 40, now - 30, now - 20):
            items.append(PlaybackReport(ts=t, kind="timeline", rating_key=item["ratingKey"], user_id=user,
                                        client=f"client-{user}-now", player="Plex Web / Chrome", state="playing",
                                        position_ms=int((t - now + 60) * 1000), duration_ms=item["duration"]))
    items.sort(key=lambda r: r.ts)
    for i in range(0, len(items), 50_000):
        assert writer._write(conn, items[i:i + 50_000]), "plays not written"
    return conn.execute("SELECT count(*) FROM plays").fetchone()[0]


# --- Datasette, as `projectionist dashboard` starts it --------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_dashboard(home: Path, metadata: Path | None = None, timeout: float = 30,
                      env: dict[str, str] | None = None):
    """Datasette over `home`/projectionist.db; yields (base URL, requests session logged in as admin).
    `env`: the environment `datasette_env` made, when the caller needs to know it (a salted hash)."""
    config = Config(home=home, rules_path=REPO / "rules.yaml",
                    datasette_metadata=metadata or REPO / "datasette_metadata.yml", dashboard_port=_free_port())
    env = env or datasette_env(config)
    log_path = home / "datasette.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(datasette_command(config), env=env, stdout=log, stderr=subprocess.STDOUT)
    session = requests.Session()
    session.trust_env = False
    session.auth = (ADMIN_USER, admin_password(config))
    base = f"http://{config.host}:{config.dashboard_port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"datasette exited with {proc.returncode}:\n{log_path.read_text()}")
            try:
                if session.get(base + "/-/versions.json", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"datasette did not answer within {timeout} s:\n{log_path.read_text()}")
            time.sleep(0.1)
        yield base, session
    finally:
        session.close()
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def targets(metadata_path: Path) -> list[tuple[str, str]]:
    """(name, path) of every canned query page, chart data request and view page."""
    metadata = yaml.safe_load(metadata_path.read_text())
    queries = metadata["databases"][DATABASE]["queries"]
    out = []
    for name in queries:
        out.append((f"{name} (page)", f"/{DATABASE}/{name}"))
        out.append((f"{name} (chart data)", f"/{DATABASE}/{name}.json?_shape=array"))
    for view in ("play_history", "user_activity", "usage_hourly", "usage_events"):
        out.append((f"{view} (table page)", f"/{DATABASE}/{view}"))
    out.append(("index page", "/"))
    return out


def home_targets(metadata_path: Path, now: float | None = None) -> list[tuple[str, str]]:
    """(name, path) of the dashboard home's page and of each distinct chart request, unfiltered and
    filtered (the last 7 days, upstream plex, the first generated user)."""
    metadata = yaml.safe_load(metadata_path.read_text())
    dashboards = (metadata.get("plugins") or {}).get("datasette-dashboards") or {}
    now = time.time() if now is None else now
    week = (f"since={time.strftime('%Y-%m-%d', time.gmtime(now - 7 * 86400))}&until="
            f"{time.strftime('%Y-%m-%d', time.gmtime(now + 86400))}&upstream=plex&user={USERNAMES[0]}")
    out = []
    for slug, dashboard in dashboards.items():
        out.append((f"{slug} dashboard (page)", f"/-/dashboards/{slug}"))
        out.append((f"{slug} dashboard (page, filtered)", f"/-/dashboards/{slug}?{week}"))
        seen = set()
        for chart_slug, chart in (dashboard.get("charts") or {}).items():
            if not chart.get("query") or chart["query"] in seen:
                continue  # tiles share one query: the browser asks for it once per tile, each as fast
            seen.add(chart["query"])
            base = f"/{chart['db']}.json?sql={chart['query']}&_shape=objects"
            out.append((f"{chart_slug} ({chart['query']})", base))
            out.append((f"{chart_slug} ({chart['query']}, filtered)", f"{base}&{week}"))
    return out


def measure(base: str, session: requests.Session, path: str, runs: int) -> tuple[list[float], int, int]:
    times, status, count = [], 0, 0
    for _ in range(runs):
        t = time.perf_counter()
        r = session.get(base + path, timeout=60)
        times.append(time.perf_counter() - t)
        status = r.status_code
        if path.endswith("_shape=array") and r.ok:
            count = len(r.json())
        elif "_shape=objects" in path and r.ok:
            count = len(r.json()["rows"])
    return times, status, count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--days", type=int, default=14)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--keep", help="generate into this directory and keep it")
    parser.add_argument("--json", action="store_true", help="print one JSON report instead of a table")
    parser.add_argument("--reuse", action="store_true",
                        help="with --keep: time the store already there instead of generating a new one")
    parser.add_argument("--home-only", action="store_true", help="time the dashboard home only")
    parser.add_argument("--home-limit-ms", type=float, default=HOME_LIMIT_S * 1000,
                        help="limit for each dashboard home request (default 300)")
    args = parser.parse_args(argv)
    home_limit = args.home_limit_ms / 1000

    with contextlib.ExitStack() as stack:
        home = Path(args.keep) if args.keep else Path(stack.enter_context(
            tempfile.TemporaryDirectory(prefix="projectionist-bench-dash-")))
        home.mkdir(parents=True, exist_ok=True)
        say = (lambda *a: print(*a, file=sys.stderr)) if args.json else print
        if args.reuse and args.keep and (home / "projectionist.db").exists():
            generated = {"reused": str(home / "projectionist.db")}
        else:
            say(f"generating {args.rows:,} usage rows over {args.days} days in {home} ...")
            generated = generate(home / "projectionist.db", args.rows, days=args.days)
        db = connect(home / "projectionist.db")
        sizes = {t: db.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
                 for t in ("usage_events", "usage_hourly", "credential_hourly", "rate_limit_hourly", "plays")}
        with db:  # the open plays reported a moment ago, however long generating took (live_activity.ACTIVE_WITHIN)
            db.execute("UPDATE plays SET last_seen_at = max(last_seen_at, ?) WHERE stopped_at IS NULL", (time.time() - 10,))
        db.close()
        say(f"generated: {generated}; rows per table: {sizes}")
        results = []
        with running_dashboard(home) as (base, session):
            for name, path in [] if args.home_only else targets(REPO / "datasette_metadata.yml"):
                times, status, count = measure(base, session, path, args.runs)
                median = statistics.median(times)
                ok = status == 200 and median < LIMIT_S
                results.append({"name": name, "path": path, "status": status, "rows": count,
                                "median_s": round(median, 4), "max_s": round(max(times), 4),
                                "result": "PASS" if ok else "FAIL"})
                if not args.json:
                    print(f"  {name:<42} {median * 1000:8.1f} ms median  {max(times) * 1000:8.1f} ms max  "
                          f"HTTP {status}{f'  {count} rows' if path.endswith('array') else ''}  "
                          f"{'PASS' if ok else 'FAIL'}")
            if not args.json:
                print(f"dashboard home (limit {home_limit * 1000:.0f} ms):")
            for name, path in home_targets(REPO / "datasette_metadata.yml"):
                times, status, count = measure(base, session, path, args.runs)
                median = statistics.median(times)
                ok = status == 200 and median < home_limit
                results.append({"name": name, "path": path, "status": status, "rows": count, "home": True,
                                "median_s": round(median, 4), "max_s": round(max(times), 4),
                                "result": "PASS" if ok else "FAIL"})
                if not args.json:
                    print(f"  {name:<52} {median * 1000:8.1f} ms median  {max(times) * 1000:8.1f} ms max  "
                          f"HTTP {status}{f'  {count} rows' if 'sql=' in path else ''}  {'PASS' if ok else 'FAIL'}")
        failed = [r for r in results if r["result"] != "PASS"]
        report = {"rows": args.rows, "days": args.days, "generated": generated, "tables": sizes,
                  "limit_s": LIMIT_S, "home_limit_s": home_limit, "results": results, "failed": len(failed),
                  "ok": not failed}
        if args.json:
            print(json.dumps(report, indent=2))
        else:
            print(f"{len(results) - len(failed)} passed, {len(failed)} failed (limit {LIMIT_S:.0f} s per request, "
                  f"{home_limit * 1000:.0f} ms per dashboard home request, median of {args.runs})")
        return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
