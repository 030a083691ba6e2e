"""Scale-out benchmark: proxy workers on one machine, and proxies of two machines, sharing one Redis.

    python bench/scale.py [--connections 10] [--duration 3] [--warmup 1] [--json] [--strict]

Everything on 127.0.0.1, in separate processes, from one run: a `redis-server`, the bench upstream
(bench/_upstream.py, which counts the requests it receives), Projectionist proxies
(`python -m launcher proxy --workers N`, `proxy.redis_url` set) with their control plane (which
commits the workers' usage rows from the Redis event stream), and a stock `mitmdump` reverse
proxy as the baseline. It prints:

- hit req/s with 1, 2 and 4 workers behind one port (SO_REUSEPORT: the kernel spreads the
  load generator's connections), each against the same run's mitmdump pass-through and the
  one-worker figure (target: 2 workers >= 1.7x one on 2 cores);
- upstream fetches for 200 concurrent identical cold requests, each on its own connection, over
  4 workers, the origin answering in 300 ms (target 1);
- the hit ratio through proxy B for 50 URLs first fetched through proxy A, two proxies with homes
  (disks, databases) of their own: two machines (target 100%); and for 10 answers over
  `cache.shared_max_body_bytes` (64 KB here), which Redis only indexes: B fetches each body from A
  (the holder) instead of the upstream;
- usage rows in the 4-worker proxy's SQLite file against the responses its clients received
  (target equal), written by the control plane's one consumer.

Exit status 1 if a request failed or a process did not exit cleanly; with --strict also when a
target of the last three is missed. On a 2-core machine the load generator shares the cores with
the workers, so the req/s ratios say more about the machine than about the workers.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import shutil
import sqlite3
import sys
import time
from contextlib import ExitStack, closing
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _load import cache_outcome, load_arguments, run_benchmark, run_load, run_wrk, wrk_available  # noqa: E402
from _stack import (ControlProcess, MitmdumpProcess, ProxyProcess, RedisServer, UpstreamProcess,  # noqa: E402
                    free_port, tmdb_default_limit)

WORKERS = (1, 2, 4)
COLD_CLIENTS = 200
SPREAD_URLS = 50
BIG_URLS = 10
BIG_PAD_KB = 200  # answers of ~200 KB ...
MACHINE_SHARED_MAX = 64_000  # ... over the machines' shared_max_body_bytes (and under the stream threshold)
HIT_PATH = "/3/movie/603"


def with_redis(url: str, shared_max_body_bytes: int | None = None):
    """Shared Redis; the default TMDB key's budget out of the way (this measures the cache)."""
    unlimited = tmdb_default_limit("100000/s", 100_000, 0)

    def edit(rules: dict) -> None:
        unlimited(rules)
        rules["proxy"]["redis_url"] = url
        if shared_max_body_bytes is not None:
            rules["cache"]["shared_max_body_bytes"] = shared_max_body_bytes
    return edit


async def get(session: aiohttp.ClientSession, proxy: ProxyProcess, path: str) -> tuple[int, str]:
    async with session.get(f"http://api.themoviedb.org{path}", params={"api_key": "bench"}, proxy=proxy.proxy_url,
                           timeout=aiohttp.ClientTimeout(total=30)) as r:
        await r.read()
        return r.status, cache_outcome(r.headers.get("Cache-Status"))


def usage_rows(proxy: ProxyProcess) -> int:
    with closing(sqlite3.connect(proxy.db_path, timeout=30)) as conn:
        return conn.execute("SELECT count(*) FROM usage_events").fetchone()[0]


async def load(args, url: str, proxy: str | None = None, exact: bool = False):
    """Throughput with wrk when installed (it leaves the cores to the workers), else with the
    aiohttp generator; `exact`: the aiohttp one, which accounts for every response."""
    if wrk_available() and not exact:
        return await run_wrk(url, connections=args.connections, duration=args.duration, warmup=args.warmup, proxy=proxy)
    return await run_load(url, connections=args.connections, duration=args.duration, warmup=args.warmup, proxy=proxy,
                          classify=lambda r: cache_outcome(r.headers.get("Cache-Status")))


async def measured_hits(args, url: str, proxy: ProxyProcess):
    """`load` through `proxy`, with the CPU its processes (all workers) used in the measured window:
    (result, cores busy, CPU µs per request). A per-request cost that stays flat as workers are
    added says the workers scale; what the req/s ratio lacks then is cores (the load generator's
    and the kernel's share of a small machine)."""
    if args.warmup > 0:
        await load(argparse.Namespace(**{**vars(args), "duration": args.warmup, "warmup": 0}), url, proxy.proxy_url)
    cpu, started = proxy.tree_cpu_seconds(), time.monotonic()
    run = await load(argparse.Namespace(**{**vars(args), "warmup": 0}), url, proxy.proxy_url)
    cpu, wall = proxy.tree_cpu_seconds() - cpu, time.monotonic() - started
    return run, cpu / wall, cpu / max(1, run.completed) * 1e6


def start_proxy(stack: ExitStack, upstream: UpstreamProcess, redis_url: str, workers: int,
                vault_key: str | None = None) -> ProxyProcess:
    """With `vault_key`: one machine of several, with its ops listener (where the others fetch the
    bodies too big for Redis that it holds) and the vault key the machines share."""
    if vault_key is None:
        proxy = ProxyProcess({"tmdb": upstream.url}, with_redis(redis_url), workers=workers).start()
    else:
        proxy = ProxyProcess({"tmdb": upstream.url}, with_redis(redis_url, MACHINE_SHARED_MAX), workers=workers,
                             env={"PROJECTIONIST_SECRET_KEY": vault_key,
                                  "PROJECTIONIST_PROXY_METRICS_PORT": str(free_port())}).start()
    stack.callback(proxy.cleanup)
    stack.callback(proxy.stop)  # (a no-op once stopped)
    if vault_key is not None:
        proxy.wait_logged("metrics and health at")  # the holder's address is known from here on
    return proxy


async def bench(args) -> dict:
    report: dict = {"workers": max(WORKERS), "connections": args.connections,
                    "load_generator": "wrk" if wrk_available() else "aiohttp (install wrk for the workers' figures)"}
    hit_url = f"http://api.themoviedb.org{HIT_PATH}?api_key=bench"
    with ExitStack() as stack:
        redis_server = stack.enter_context(RedisServer())
        upstream = stack.enter_context(UpstreamProcess())
        mitmdump = stack.enter_context(MitmdumpProcess(upstream.url))
        exits = []
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            baseline = await load(args, f"{mitmdump.url}{HIT_PATH}?api_key=bench")
            report["mitmdump_rps"] = round(baseline.rps, 1)
            failed = baseline.failed

            # Hits through 1, 2 and 4 workers behind one port (each proxy primed first).
            throughput = {}
            for count in WORKERS:
                proxy = start_proxy(stack, upstream, redis_server.url, count)
                status, _ = await get(session, proxy, HIT_PATH)
                assert status == 200, status
                run, cores, cpu_us = await measured_hits(args, hit_url, proxy)
                failed += run.failed + run.errors
                throughput[count] = {"rps": round(run.rps, 1), "x_mitmdump": round(run.rps / max(baseline.rps, 1e-9), 2),
                                     "p99_ms": round(run.p99_ms or 0, 1), "proxy_cores": round(cores, 2),
                                     "cpu_us_per_request": round(cpu_us),
                                     "hit_ratio": round(run.classes.get("hit", 0) / max(1, run.completed), 4)}
                exits.append(proxy.stop())
            for count in WORKERS[1:]:
                throughput[count]["x_one_worker"] = round(throughput[count]["rps"] / max(throughput[1]["rps"], 1e-9), 2)
            report["hits"] = throughput

            # The 4-worker proxy with its control plane, every response accounted for.
            proxy = start_proxy(stack, upstream, redis_server.url, max(WORKERS))
            control = ControlProcess(proxy).start()
            stack.callback(control.stop)
            burst = await load(args, hit_url, proxy=proxy.proxy_url, exact=True)
            responses, failed = burst.completed, failed + burst.failed + burst.errors

            # One fetch per cold key across the workers: each client on a connection of its own.
            cold = "/3/movie/604?bench_delay_ms=300"
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, force_close=True)) as each_new:
                answers = await asyncio.gather(*(get(each_new, proxy, cold) for _ in range(COLD_CLIENTS)))
            responses += len(answers)
            failed += sum(status != 200 for status, _ in answers)
            seen = upstream.requests_seen()
            report["cold"] = {"clients": COLD_CLIENTS,
                              "upstream_fetches": sum(n for url, n in seen.items() if url.startswith("/3/movie/604?")),
                              "outcomes": {o: sum(1 for _, x in answers if x == o) for o in {x for _, x in answers}}}

            # Two machines: what A fetched is a hit through B.
            vault_key = base64.urlsafe_b64encode(os.urandom(32)).decode()  # a Fernet key, as secret.key holds
            machine_a = start_proxy(stack, upstream, redis_server.url, 1, vault_key)
            machine_b = start_proxy(stack, upstream, redis_server.url, 1, vault_key)
            paths = [f"/3/movie/{1000 + i}" for i in range(SPREAD_URLS)]
            for path in paths:
                status, _ = await get(session, machine_a, path)
                failed += status != 200
            through_b = [await get(session, machine_b, path) for path in paths]
            failed += sum(status != 200 for status, _ in through_b)
            report["spread"] = {"urls": SPREAD_URLS, "hit_ratio_b": round(sum(o == "hit" for _, o in through_b) / SPREAD_URLS, 4)}

            # Answers too big for Redis: held by A, indexed in Redis, fetched by B from A.
            big = [f"/3/movie/{2000 + i}?bench_pad_kb={BIG_PAD_KB}" for i in range(BIG_URLS)]
            for path in big:
                status, _ = await get(session, machine_a, path)
                failed += status != 200
            await asyncio.sleep(0.5)  # A's index records are written in the background
            big_b = [await get(session, machine_b, path) for path in big]
            failed += sum(status != 200 for status, _ in big_b)
            seen = upstream.requests_seen()
            report["big"] = {"urls": BIG_URLS, "kb": BIG_PAD_KB, "hit_ratio_b": round(sum(o == "hit" for _, o in big_b) / BIG_URLS, 4),
                             "upstream_fetches": sum(n for url, n in seen.items() if url.startswith("/3/movie/20"))}

        # SIGTERM: the workers hand their last rows to the stream, then the control plane drains it.
        exits += [proxy.stop(), machine_a.stop(), machine_b.stop(), control.stop()]
        rows = usage_rows(proxy)
        streamed = "a control plane consumes the event stream" in proxy.log_path.read_text(errors="replace")
        report["usage"] = {"rows": rows, "responses": responses, "through_stream": streamed}
        report["failed"] = failed
        report["exit_codes"] = exits
        report["targets"] = {"one_fetch": report["cold"]["upstream_fetches"] == 1,
                             "b_hits_all": report["spread"]["hit_ratio_b"] == 1.0,
                             "b_hits_big_from_holder": report["big"]["hit_ratio_b"] == 1.0
                             and report["big"]["upstream_fetches"] == BIG_URLS,
                             "rows_equal_responses": rows == responses and streamed}
        report["ok"] = failed == 0 and all(code == 0 for code in exits) and (
            not args.strict or all(report["targets"].values()))
    return report


def render(report: dict) -> str:
    lines = [f"load generator: {report['load_generator']}",
             f"mitmdump pass-through (baseline): {report['mitmdump_rps']:,.0f} req/s at {report['connections']} connections"]
    for count, figures in report["hits"].items():
        extra = f", x{figures['x_one_worker']:.2f} one worker" if "x_one_worker" in figures else ""
        lines.append(f"hits, {count} worker(s): {figures['rps']:,.0f} req/s (x{figures['x_mitmdump']:.2f} mitmdump{extra}), "
                     f"p99 {figures['p99_ms']:.1f} ms, {figures['hit_ratio']:.1%} hits; the workers used "
                     f"{figures['proxy_cores']:.2f} cores, {figures['cpu_us_per_request']} µs CPU per request")
    cold = report["cold"]
    lines.append(f"{cold['clients']} identical cold requests over {report['workers']} workers: "
                 f"{cold['upstream_fetches']} upstream fetch(es) (target 1); outcomes {cold['outcomes']}")
    lines.append(f"proxy B (another home), {report['spread']['urls']} URLs first fetched through proxy A: "
                 f"{report['spread']['hit_ratio_b']:.0%} hits (target 100%)")
    big = report["big"]
    lines.append(f"proxy B, {big['urls']} answers of ~{big['kb']} KB first fetched through proxy A (over the "
                 f"shared-body limit: only indexed in Redis): {big['hit_ratio_b']:.0%} hits, bodies from A; "
                 f"{big['upstream_fetches']} upstream fetch(es) for {big['urls']} URLs (target: one each)")
    usage = report["usage"]
    lines.append(f"usage rows {usage['rows']} for {usage['responses']} responses of the {report['workers']}-worker proxy "
                 f"({'equal' if usage['rows'] == usage['responses'] else 'NOT equal'}; "
                 f"{'through' if usage['through_stream'] else 'NOT through'} the control plane's event stream)")
    lines.append(f"failed requests: {report['failed']}; exit codes {report['exit_codes']}; "
                 f"{'OK' if report['ok'] else 'FAILED'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    if shutil.which("redis-server") is None:
        print("bench/scale.py needs redis-server (apt-get install redis-server)", file=sys.stderr)
        return 2
    parser = load_arguments(__doc__.split("\n\n")[0])
    parser.set_defaults(duration=3.0)
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    return run_benchmark(parser, argv, bench, render)


if __name__ == "__main__":
    sys.exit(main())
