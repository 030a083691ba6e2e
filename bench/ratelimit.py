"""Benchmark: does the upstream see the configured rate, and how long do queued requests wait?

    python bench/ratelimit.py [--clients 100] [--duration 10] [--rate 2] [--burst 5] [--max-wait 5]
                              [--light-clients 4] [--no-redis] [--json]

`clients` browsers (closed loop; after a 429 a client pauses 0.25 s) ask for one uncached TMDB
document (`/3/movie/603`, cache rules removed) on the shared default key, limited by
`tmdb-default` (`rate`/s, `burst`, `max_wait`), through the explicit proxy, for `duration` seconds:

    one process        one `projectionist proxy`, in-process limiter state
    one process, light the same with `--light-clients` (4): queues stay short, nobody gets 429
    2 processes+Redis  two proxies sharing a `redis-server` (started here on a free port), clients split
    2 processes alone  the same two proxies without Redis: each has its own budget (for contrast)

For each it prints the requests the local upstream received, its sustained rate after the initial
burst (from the first queued request to the last) against the configured one, the most requests it saw in
any 1 s window, the answers the clients got (200 / 429 / other), and the queueing delay of the
admitted requests (p50/p90/p99/max, from the proxies' `rate_limit_events`: every admitted request
that did not wait counts as 0 ms) next to the clients' latency of their 200s. One bounded run on
127.0.0.1; every process started is stopped. Exit status 1 when a shared budget was exceeded (more
than 5% over the configured rate) or a client saw anything but 200 or 429.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import shutil
import sqlite3
import sys
import threading
import time
from pathlib import Path

import aiohttp
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _load import percentile  # noqa: E402
from _stack import ProxyProcess, RedisServer, free_port, tmdb_default_limit  # noqa: E402
from _upstream import TMDB_MOVIE_BODY  # noqa: E402

PATH = "/3/movie/603"
URL = f"http://api.themoviedb.org{PATH}"


class UpstreamThread:
    """A TMDB stand-in on its own event loop and thread, recording when each request arrived."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="upstream", daemon=True)
        self.times: list[float] = []
        self.port = free_port()
        self.runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _handle(self, request: web.Request) -> web.Response:
        self.times.append(time.monotonic())
        return web.Response(body=TMDB_MOVIE_BODY, content_type="application/json")

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

    def __enter__(self) -> UpstreamThread:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)
        return self

    def __exit__(self, *exc) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def rules_edit(args):
    limit = tmdb_default_limit(f"{args.rate:g}/s", args.burst, args.max_wait)

    def edit(rules: dict) -> None:
        limit(rules)
        for route in rules["routes"]:
            if route["upstream"] == "tmdb":
                route.pop("cache", None)  # measure the limiter, not the cache
    return edit


async def load(proxies: list[str], clients: int, duration: float) -> dict:
    """Closed-loop clients spread over the proxies; returns statuses and the latencies of 200s."""
    statuses: dict[str, int] = {}
    ok_latencies: list[float] = []
    errors: list[str] = []
    connector = aiohttp.TCPConnector(limit=clients + 10)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as session:
        async def client(proxy: str) -> None:
            deadline = time.monotonic() + duration
            while time.monotonic() < deadline:
                started = time.monotonic()
                try:
                    async with session.get(URL, proxy=proxy, headers={"Origin": "http://player.example"}) as r:
                        await r.read()
                        status = r.status
                except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                    errors.append(f"{type(exc).__name__}: {exc}")
                    await asyncio.sleep(0.05)
                    continue
                statuses[str(status)] = statuses.get(str(status), 0) + 1
                if status == 200:
                    ok_latencies.append((time.monotonic() - started) * 1000)
                elif status == 429:
                    await asyncio.sleep(0.25)

        started = time.monotonic()
        await asyncio.gather(*(client(proxies[i % len(proxies)]) for i in range(clients)))
        wall = time.monotonic() - started
    ok_latencies.sort()
    return {"statuses": dict(sorted(statuses.items())), "errors": len(errors), "error_samples": errors[:3],
            "wall_s": round(wall, 3), "latency_200_ms": _distribution(ok_latencies)}


def _distribution(values: list[float]) -> dict:
    values = sorted(values)
    return {"n": len(values), **{f"p{q}": _round(percentile(values, q)) for q in (50, 90, 99)},
            "max": _round(values[-1] if values else None)}


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def queued_ms(db_paths: list[Path]) -> list[float]:
    waited: list[float] = []
    for path in db_paths:
        conn = sqlite3.connect(path)
        try:
            waited += [r[0] for r in conn.execute(
                "SELECT waited_ms FROM rate_limit_events WHERE outcome = 'queued' AND rule = 'tmdb-default'")]
        finally:
            conn.close()
    return waited


def upstream_figures(times: list[float], burst: int) -> dict:
    times = sorted(times)
    n = len(times)
    span = times[-1] - times[0] if n > 1 else 0.0
    # After the initial burst: requests per second from the first queued one to the last.
    steady = times[-1] - times[burst] if n > burst + 1 else 0.0
    sustained = (n - burst - 1) / steady if steady > 0 else None
    most, j = 0, 0
    for i in range(n):  # most requests in any 1 s window
        while times[i] - times[j] > 1.0:
            j += 1
        most = max(most, i - j + 1)
    return {"requests": n, "span_s": round(span, 3), "sustained_rate": _round3(sustained), "max_in_1s": most}


def _round3(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


async def scenario(name: str, args, upstream: UpstreamThread, processes: int, redis_url: str | None,
                   clients: int | None = None) -> dict:
    upstream.times.clear()
    clients = clients or args.clients
    env = {"PROJECTIONIST_REDIS_URL": redis_url} if redis_url else {}
    procs = [ProxyProcess(overrides={"tmdb": upstream.url}, rules_edit=rules_edit(args), env=env)
             for _ in range(processes)]
    try:
        await asyncio.gather(*(asyncio.to_thread(p.start) for p in procs))
        result = await load([p.proxy_url for p in procs], clients, args.duration)
        exit_codes = [p.stop() for p in procs]  # SIGTERM: the event writers flush
        waited = queued_ms([p.db_path for p in procs])
        errors_logged = [e for p in procs for e in p.logged_errors()]
        # A process whose Redis call failed decided on its own budget meanwhile (by design): say so.
        fallbacks = sum(p.log_path.read_text(errors="replace").count("rate-limit backend ") for p in procs)
    finally:
        for p in procs:
            p.stop()
            p.cleanup()
    budgets = 1 if redis_url else processes  # separate budgets: one per process unless they share Redis
    figures = upstream_figures(list(upstream.times), args.burst * budgets)
    admitted = figures["requests"]
    delays = [0.0] * max(0, admitted - len(waited)) + waited
    return {"scenario": name, "clients": clients, "processes": processes, "shared_state": "redis" if redis_url else "in-process",
            "configured_rate": args.rate, "budget_rate": args.rate * budgets, **figures,
            "ratio": _round3(figures["sustained_rate"] / args.rate if figures["sustained_rate"] else None),
            **result, "queue_delay_ms": _distribution(delays), "queued": len(waited), "proxy_exit_codes": exit_codes,
            "errors_logged": errors_logged, "backend_fallbacks": fallbacks}


async def bench(args) -> dict:
    report = {"config": {"clients": args.clients, "duration_s": args.duration, "rate": args.rate,
                         "burst": args.burst, "max_wait_s": args.max_wait}, "scenarios": []}
    with UpstreamThread() as upstream:
        report["scenarios"].append(await scenario("one process", args, upstream, 1, None))
        if args.light_clients:
            report["scenarios"].append(await scenario("one process, light", args, upstream, 1, None,
                                                      clients=args.light_clients))
        if not args.no_redis and shutil.which("redis-server"):
            with RedisServer() as redis_server:
                report["scenarios"].append(await scenario("2 processes+Redis", args, upstream, 2, redis_server.url))
            report["scenarios"].append(await scenario("2 processes alone", args, upstream, 2, None))
    problems = []
    for s in report["scenarios"]:
        limit = s["budget_rate"] * 1.05
        if s["sustained_rate"] is not None and s["sustained_rate"] > limit:
            problems.append(f"{s['scenario']}: upstream saw {s['sustained_rate']} req/s, budget {s['budget_rate']}")
        other = {k: v for k, v in s["statuses"].items() if k not in ("200", "429")}
        if s["clients"] == args.light_clients and s["statuses"].get("429"):
            problems.append(f"{s['scenario']}: short queues, yet {s['statuses']['429']} answers were 429")
        if other or s["errors"]:
            problems.append(f"{s['scenario']}: statuses {other}, {s['errors']} errors {s['error_samples']}")
        if any(code != 0 for code in s["proxy_exit_codes"]):
            problems.append(f"{s['scenario']}: proxy exit codes {s['proxy_exit_codes']}")
        if s["errors_logged"]:
            problems.append(f"{s['scenario']}: the proxies logged {len(s['errors_logged'])} errors, "
                            f"the first: {s['errors_logged'][0]}")
    report["problems"] = problems
    report["ok"] = not problems
    return report


def _fmt(value, digits: int = 0) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def render(report: dict) -> str:
    c = report["config"]
    lines = [f"Projectionist rate limits, 127.0.0.1: {c['clients']} clients for {c['duration_s']:g} s on the default "
             f"TMDB key, tmdb-default {c['rate']:g}/s burst {c['burst']} max_wait {c['max_wait_s']:g} s", "",
             f"{'scenario':<19} {'clients':>7} {'upstream':>8} {'rate/s':>7} {'configured':>10} {'ratio':>6} {'max 1s':>6} "
             f"{'200':>6} {'429':>6} {'other':>5}   queue delay ms p50/p90/p99/max   200 latency ms p50/p90/p99/max"]
    for s in report["scenarios"]:
        q, lat = s["queue_delay_ms"], s["latency_200_ms"]
        other = sum(v for k, v in s["statuses"].items() if k not in ("200", "429")) + s["errors"]
        lines.append(
            f"{s['scenario']:<19} {s['clients']:>7} {s['requests']:>8} {_fmt(s['sustained_rate'], 2):>7} {s['configured_rate']:>10.2f} "
            f"{_fmt(s['ratio'], 2):>6} {s['max_in_1s']:>6} {s['statuses'].get('200', 0):>6} "
            f"{s['statuses'].get('429', 0):>6} {other:>5}   "
            f"{'/'.join(_fmt(q[k]) for k in ('p50', 'p90', 'p99', 'max')):<32} "
            f"{'/'.join(_fmt(lat[k]) for k in ('p50', 'p90', 'p99', 'max'))}")
    lines.append("")
    lines.append("rate/s: sustained upstream rate after the initial burst (first queued to last request); "
                 "ratio = rate/s / configured;")
    lines.append("max 1s: most requests the upstream received in any 1 s window (burst + rate = "
                 f"{c['burst'] + c['rate']:g} allowed, plus delivery jitter).")
    lines.append("\"2 processes alone\" has no shared state: each process spends its own budget (expected ratio ~2).")
    for problem in report["problems"]:
        lines.append(f"PROBLEM: {problem}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--rate", type=float, default=2.0, help="tmdb-default requests per second (default 2)")
    parser.add_argument("--burst", type=int, default=5)
    parser.add_argument("--max-wait", type=float, default=5.0)
    parser.add_argument("--light-clients", type=int, default=4,
                        help="clients of the short-queue run (0: skip it; default 4)")
    parser.add_argument("--no-redis", action="store_true", help="skip the two-process scenarios")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.clients < 1 or args.duration <= 0 or args.rate <= 0 or args.burst < 1 or args.max_wait < 0:
        parser.error("--clients >= 1, --duration > 0, --rate > 0, --burst >= 1, --max-wait >= 0")
    gc.freeze()
    report = asyncio.run(bench(args))
    print(json.dumps(report, indent=2) if args.json else render(report), flush=True)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
