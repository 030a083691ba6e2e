"""Pass-through cost of the Projectionist proxy: proxied vs direct, from one run on 127.0.0.1.

    python bench/passthrough.py [--connections 10] [--duration 5] [--warmup 1] [--json]

Three processes: a local aiohttp upstream serving ~2 KB of Plex / TMDB JSON (bench/_upstream.py),
the proxy (`python -m launcher proxy`, the shipped rules.yaml with its listeners moved to
free ports) and this one, the load generator (bench/_load.py). Measured one after the other
against the same upstream, so the ratios are comparable even on a noisy machine:

    direct    GET http://127.0.0.1:UP/library/sections?X-Plex-Token=x
    reverse   the same request to the proxy's Plex reverse listener (route plex.sections, recorded)
    explicit  GET http://api.themoviedb.org/3/movie/603?api_key=x through the explicit proxy,
              tmdb overridden to the local upstream (route tmdb.details, recorded)

After the proxy has stopped (SIGTERM: it flushes its usage rows) the rows in its SQLite file are
counted; they must equal the proxied responses the load generator received (warm-up included).
Exit status 1 if they differ, if any request failed, if the proxy logged an error or did not exit cleanly.
"""

from __future__ import annotations

import os
import sqlite3
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _load import load_arguments, measure, run_benchmark  # noqa: E402
from _stack import ProxyProcess, UpstreamProcess, forwarding_only  # noqa: E402
from _upstream import PLEX_SECTIONS_BODY, TMDB_MOVIE_BODY  # noqa: E402

PLEX_PATH = "/library/sections?X-Plex-Token=x"
PLEX_HEADERS = {"Accept": "application/json", "X-Plex-Client-Identifier": "projectionist-bench",
                "X-Plex-Product": "Plex Web"}
TMDB_URL = "http://api.themoviedb.org/3/movie/603?api_key=x"
TMDB_HEADERS = {"Accept": "application/json"}
# usage_events.listener for each proxied mode
LISTENER_OF_MODE = {"reverse": "reverse", "explicit": "regular"}


def _count_rows(db_path: Path) -> tuple[int, dict[str, int], dict[str, int]]:
    conn = sqlite3.connect(db_path)
    try:
        by_listener = dict(conn.execute("SELECT listener, count(*) FROM usage_events GROUP BY listener"))
        by_route = dict(conn.execute("SELECT route, count(*) FROM usage_events GROUP BY route ORDER BY route"))
    finally:
        conn.close()
    return sum(by_listener.values()), by_listener, by_route


async def bench(args) -> dict:
    report: dict = {
        "config": {"connections": args.connections, "duration_s": args.duration, "warmup_s": args.warmup,
                   "cpus": os.cpu_count(), "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
                   "body_bytes": {"plex_sections": len(PLEX_SECTIONS_BODY), "tmdb_movie": len(TMDB_MOVIE_BODY)}},
        "modes": {},
    }
    modes = report["modes"]
    with UpstreamProcess() as upstream, \
            ProxyProcess(overrides={"plex": upstream.url, "tmdb": upstream.url,
                                     # plex.tv too: the proxy asks it whose a newly seen token is
                                     "plextv": upstream.url},
                           rules_edit=forwarding_only("plex.sections", "tmdb.details")) as proxy:
        procs = {"upstream": upstream, "proxy": proxy}
        reverse_url = f"http://127.0.0.1:{proxy.reverse_port('plex')}{PLEX_PATH}"
        modes["direct"] = await measure("direct", upstream.url + PLEX_PATH, args, procs=procs,
                                         headers=PLEX_HEADERS)
        modes["reverse"] = await measure("reverse", reverse_url, args, procs=procs, headers=PLEX_HEADERS)
        if not args.no_explicit:
            modes["explicit"] = await measure("explicit", TMDB_URL, args, procs=procs,
                                               proxy=proxy.proxy_url, headers=TMDB_HEADERS)
        # SIGTERM: the proxy flushes its usage writer before it exits.
        report["proxy_exit_code"] = proxy.stop()
        report["proxy_errors_logged"] = proxy.logged_errors()
        total_rows, by_listener, by_route = _count_rows(proxy.db_path)

    direct = modes["direct"]
    report["ratios"] = {}
    for name in ("reverse", "explicit"):
        m = modes.get(name)
        if not m:
            continue
        report["ratios"][name] = {
            "rps": _ratio(m["rps"], direct["rps"]),
            "p50": _ratio(m["p50_ms"], direct["p50_ms"]),
            "p99": _ratio(m["p99_ms"], direct["p99_ms"]),
        }
    proxied = {name: modes[name]["completed"] for name in LISTENER_OF_MODE if name in modes}
    report["usage"] = {
        "rows": total_rows,
        "proxied_requests": sum(proxied.values()),
        "rows_by_listener": by_listener,
        "rows_by_route": by_route,
        "proxied_by_mode": proxied,
        "match": total_rows == sum(proxied.values()) and all(
            by_listener.get(LISTENER_OF_MODE[name], 0) == n for name, n in proxied.items()),
    }
    problems = []
    if not report["usage"]["match"]:
        problems.append(f"usage rows ({total_rows}, by listener {by_listener}) != proxied requests "
                        f"completed ({sum(proxied.values())}, by mode {proxied})")
    for name, m in modes.items():
        if m["errors"]:
            problems.append(f"{name}: {m['errors']} errors (statuses {m['statuses']}, {m['error_samples']})")
        if m["count"] == 0:
            problems.append(f"{name}: no request completed in the measured window")
    if report["proxy_exit_code"] != 0:
        problems.append(f"proxy exited with {report['proxy_exit_code']}")
    if errors := report["proxy_errors_logged"]:
        problems.append(f"the proxy logged {len(errors)} errors, the first: {errors[0]}")
    report["problems"] = problems
    report["ok"] = not problems
    return report


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def render(report: dict) -> str:
    cfg = report["config"]
    lines = [
        f"Projectionist pass-through, 127.0.0.1, {cfg['connections']} connections, "
        f"{cfg['duration_s']:g} s measured after {cfg['warmup_s']:g} s warm-up per mode "
        f"({cfg['cpus']} CPUs, load average at start {cfg['loadavg_at_start'][0]})",
        f"bodies: Plex /library/sections {cfg['body_bytes']['plex_sections']} B, "
        f"TMDB /3/movie/603 {cfg['body_bytes']['tmdb_movie']} B",
        "",
        f"{'mode':<9} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'errors':>6} "
        f"{'responses':>9}   CPU µs/req: proxy  upstream  loadgen",
    ]
    for name, m in report["modes"].items():
        cpu = m["cpu_us_per_request"]
        proxy_cpu = _fmt(cpu.get("proxy"), 0) if name != "direct" else "-"
        lines.append(
            f"{name:<9} {m['rps']:>9.0f} {_fmt(m['p50_ms']):>8} {_fmt(m['p99_ms']):>8} {_fmt(m['max_ms']):>8} "
            f"{m['errors']:>6} {m['completed']:>9}   {'':>11}{proxy_cpu:>6} {_fmt(cpu.get('upstream'), 0):>9} "
            f"{_fmt(cpu.get('loadgen'), 0):>8}")
    lines.append("")
    for name, r in report["ratios"].items():
        lines.append(f"{name}/direct: req/s x{_fmt(r['rps'], 3)}, p50 x{_fmt(r['p50'], 1)}, p99 x{_fmt(r['p99'], 1)}")
    u = report["usage"]
    verdict = "equal" if u["match"] else "DIFFERENT"
    lines.append(f"usage rows written: {u['rows']}; proxied responses received: {u['proxied_requests']} "
                 f"({verdict}; rows by listener {u['rows_by_listener']}, responses by mode {u['proxied_by_mode']})")
    lines.append(f"rows by route: {u['rows_by_route']}")
    for problem in report["problems"]:
        lines.append(f"PROBLEM: {problem}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = load_arguments(__doc__)
    parser.add_argument("--no-explicit", action="store_true", help="skip the explicit-proxy mode")
    return run_benchmark(parser, argv, bench, render)


if __name__ == "__main__":
    sys.exit(main())
