"""Scale-out benchmark: several proxy processes sharing one Redis (the response cache's shared tier).

    python bench/scale.py [--connections 10] [--duration 3] [--warmup 1] [--json] [--strict]

Everything on 127.0.0.1, in separate processes, from one run: a `redis-server`, the bench upstream
(bench/_upstream.py, which counts the requests it receives), four Projectionist proxies
(`python -m launcher proxy`, each with its own home and ports, `proxy.redis_url` set) and a stock
`mitmdump` reverse proxy as the baseline. It prints:

- hit req/s with 1, 2 and 4 proxy processes, the load spread evenly over them (each process has
  its own port: a load balancer's view), and each against the same run's mitmdump pass-through;
- upstream fetches for 200 concurrent identical cold requests spread over the 4 processes, the
  origin answering in 300 ms (target 1);
- the hit ratio through process B for 50 URLs first fetched through process A (target 100%);
- usage rows in the processes' SQLite files against responses the clients received (target equal).

Exit status 1 if a request failed or a process did not exit cleanly; with --strict also when a
target of the last three is missed. On a 2-core machine the load generator shares the cores with
the proxies, so the req/s ratios say more about the machine than about the processes.
"""

from __future__ import annotations

import asyncio
import shutil
import sqlite3
import sys
from contextlib import ExitStack, closing
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _load import cache_outcome, load_arguments, run_benchmark, run_load  # noqa: E402
from _stack import MitmdumpProcess, ProxyProcess, RedisServer, UpstreamProcess, tmdb_default_limit  # noqa: E402

PROCESSES = 4
COLD_CLIENTS = 200
SPREAD_URLS = 50
HIT_PATH = "/3/movie/603"


def with_redis(url: str):
    """Shared Redis; the default TMDB key's budget out of the way (this measures the cache)."""
    unlimited = tmdb_default_limit("100000/s", 100_000, 0)

    def edit(rules: dict) -> None:
        unlimited(rules)
        rules["proxy"]["redis_url"] = url
    return edit


async def get(session: aiohttp.ClientSession, proxy: ProxyProcess, path: str) -> tuple[int, str]:
    async with session.get(f"http://api.themoviedb.org{path}", params={"api_key": "bench"}, proxy=proxy.proxy_url,
                           timeout=aiohttp.ClientTimeout(total=30)) as r:
        await r.read()
        return r.status, cache_outcome(r.headers.get("Cache-Status"))


async def upstream_requests(session: aiohttp.ClientSession, upstream: UpstreamProcess) -> dict[str, int]:
    async with session.get(f"{upstream.url}/_bench/requests") as r:
        return await r.json()


def usage_rows(proxy: ProxyProcess) -> int:
    with closing(sqlite3.connect(proxy.db_path, timeout=30)) as conn:
        return conn.execute("SELECT count(*) FROM usage_events").fetchone()[0]


async def bench(args) -> dict:
    report: dict = {"processes": PROCESSES, "connections": args.connections}
    with ExitStack() as stack:
        redis_server = stack.enter_context(RedisServer())
        upstream = stack.enter_context(UpstreamProcess())
        mitmdump = stack.enter_context(MitmdumpProcess(upstream.url))
        proxies = [stack.enter_context(ProxyProcess({"tmdb": upstream.url}, with_redis(redis_server.url)))
                   for _ in range(PROCESSES)]
        responses = 0
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            # Hits: primed through the first process only; the others find it in Redis.
            for proxy in proxies:
                status, _ = await get(session, proxy, HIT_PATH)
                responses += 1
                assert status == 200, status
            baseline = await run_load(f"{mitmdump.url}{HIT_PATH}?api_key=bench", connections=args.connections,
                                      duration=args.duration, warmup=args.warmup)
            report["mitmdump_rps"] = round(baseline.rps, 1)
            throughput = {}
            failed = baseline.failed
            for count in (1, 2, PROCESSES):
                share = max(1, args.connections // count)
                runs = await asyncio.gather(*(run_load(
                    f"http://api.themoviedb.org{HIT_PATH}?api_key=bench", connections=share, duration=args.duration,
                    warmup=args.warmup, proxy=proxy.proxy_url, classify=lambda r: cache_outcome(r.headers.get("Cache-Status")))
                    for proxy in proxies[:count]))
                responses += sum(r.completed for r in runs)
                failed += sum(r.failed + r.errors for r in runs)
                rps = sum(r.rps for r in runs)
                hits = sum(r.classes.get("hit", 0) for r in runs) / max(1, sum(r.completed for r in runs))
                throughput[count] = {"rps": round(rps, 1), "x_mitmdump": round(rps / max(baseline.rps, 1e-9), 2),
                                     "p99_ms": max((r.p99_ms or 0) for r in runs), "hit_ratio": round(hits, 4)}
            for count in (2, PROCESSES):
                throughput[count]["x_one_process"] = round(throughput[count]["rps"] / max(throughput[1]["rps"], 1e-9), 2)
            report["hits"] = throughput

            # One fetch per cold key, across processes.
            cold = "/3/movie/604?bench_delay_ms=300"
            answers = await asyncio.gather(*(get(session, proxies[i % PROCESSES], cold) for i in range(COLD_CLIENTS)))
            responses += len(answers)
            failed += sum(status != 200 for status, _ in answers)
            seen = await upstream_requests(session, upstream)
            report["cold"] = {"clients": COLD_CLIENTS,
                              "upstream_fetches": sum(n for url, n in seen.items() if url.startswith("/3/movie/604?")),
                              "outcomes": {o: sum(1 for _, x in answers if x == o) for o in {x for _, x in answers}}}

            # What A fetched is a hit through B.
            paths = [f"/3/movie/{1000 + i}" for i in range(SPREAD_URLS)]
            for path in paths:
                status, _ = await get(session, proxies[0], path)
                failed += status != 200
            through_b = [await get(session, proxies[1], path) for path in paths]
            responses += 2 * SPREAD_URLS
            failed += sum(status != 200 for status, _ in through_b)
            report["spread"] = {"urls": SPREAD_URLS, "hit_ratio_b": round(sum(o == "hit" for _, o in through_b) / SPREAD_URLS, 4)}

        exits = [proxy.stop() for proxy in proxies]  # SIGTERM: each writes its last usage rows
        rows = sum(usage_rows(proxy) for proxy in proxies)
        report["usage"] = {"rows": rows, "responses": responses}
        report["failed"] = failed
        report["exit_codes"] = exits
        report["targets"] = {"one_fetch": report["cold"]["upstream_fetches"] == 1,
                             "b_hits_all": report["spread"]["hit_ratio_b"] == 1.0,
                             "rows_equal_responses": rows == responses}
        report["ok"] = failed == 0 and all(code == 0 for code in exits) and (
            not args.strict or all(report["targets"].values()))
    return report


def render(report: dict) -> str:
    lines = [f"mitmdump pass-through (baseline): {report['mitmdump_rps']:,.0f} req/s at {report['connections']} connections"]
    for count, figures in report["hits"].items():
        extra = f", x{figures['x_one_process']:.2f} one process" if "x_one_process" in figures else ""
        lines.append(f"hits, {count} process(es): {figures['rps']:,.0f} req/s (x{figures['x_mitmdump']:.2f} mitmdump{extra}), "
                     f"p99 {figures['p99_ms']:.1f} ms, {figures['hit_ratio']:.1%} hits")
    cold = report["cold"]
    lines.append(f"{cold['clients']} identical cold requests over {report['processes']} processes: "
                 f"{cold['upstream_fetches']} upstream fetch(es) (target 1); outcomes {cold['outcomes']}")
    lines.append(f"process B, {report['spread']['urls']} URLs first fetched through A: "
                 f"{report['spread']['hit_ratio_b']:.0%} hits (target 100%)")
    usage = report["usage"]
    lines.append(f"usage rows {usage['rows']} for {usage['responses']} responses "
                 f"({'equal' if usage['rows'] == usage['responses'] else 'NOT equal'})")
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
