"""A small closed-loop HTTP load generator for the benchmarks (loopback only).

`connections` workers share one aiohttp session whose connector allows exactly that many
keep-alive connections; each worker sends its next request as soon as the previous answer is
fully read. The run is bounded in time (`warmup + duration`, then in-flight requests drain within
`request_timeout`) and in count (`max_requests`).

    result = await run_load("http://127.0.0.1:8080/x", connections=10, duration=5, warmup=1)
    result.rps, result.p50_ms, result.p99_ms, result.errors, result.count

Accounting, so that a proxy's own bookkeeping (e.g. usage rows) can be checked against it:
- `count`: responses that *completed* inside the measured window; `rps = count / window`;
  the latency percentiles are over exactly these responses.
- `completed`: every response received during the whole run (warm-up and drain included), any status.
- `errors`: requests that failed (connection error, timeout) plus responses with a status >= 400.
  `failed` is the first part only; `statuses` counts every status code received.
No request is cancelled once sent: after the deadline workers stop *starting* requests and wait
for the ones in flight, so every request a server received was either answered or timed out.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import ipaddress
import json
import math
import os
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from urllib.parse import urlsplit

import aiohttp

__all__ = ["LoadResult", "run_load", "run_wrk", "wrk_available", "measure", "percentile", "load_arguments",
           "run_benchmark"]

_LOOPBACK_NAMES = {"localhost"}


@dataclass
class LoadResult:
    url: str
    proxy: str | None
    connections: int
    window_s: float  # measured window actually used (seconds)
    count: int  # responses completed inside the window
    rps: float
    p50_ms: float | None
    p99_ms: float | None
    mean_ms: float | None
    max_ms: float | None
    errors: int  # failed requests + responses with status >= 400 (whole run)
    failed: int  # requests that got no response (whole run)
    completed: int  # responses received during the whole run, any status
    statuses: dict[int, int] = field(default_factory=dict)
    error_samples: list[str] = field(default_factory=list)  # first few failure messages
    hit_max_requests: bool = False
    # run_load(classify=...): how many responses (whole run, any status) fell in each class
    classes: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def percentile(sorted_values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100) of an already sorted list."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def _require_loopback(url: str, what: str) -> None:
    host = urlsplit(url).hostname or ""
    if host.lower() in _LOOPBACK_NAMES:
        return
    try:
        if ipaddress.ip_address(host).is_loopback:
            return
    except ValueError:
        pass
    raise ValueError(f"{what} must be a loopback address (127.0.0.1), got {url!r}")


async def run_load(
    url: str,
    *,
    connections: int = 10,
    duration: float = 5.0,
    warmup: float = 1.0,
    proxy: str | None = None,
    headers: Mapping[str, str] | None = None,
    method: str = "GET",
    max_requests: int = 2_000_000,
    request_timeout: float = 10.0,
    classify: Callable[[aiohttp.ClientResponse], str] | None = None,
) -> LoadResult:
    """Hammer `url` with `connections` concurrent keep-alive connections; see the module doc.

    With `proxy` (an http:// proxy on loopback) the URL may name any host: the request goes to
    the proxy in absolute form and the client never resolves or contacts that host itself.
    Without it the URL itself must be on loopback.
    `classify(response) -> str` (optional, called once per response received, warm-up included,
    e.g. on a `Cache-Status` header) fills `LoadResult.classes` with a count per class.
    """
    if connections < 1 or duration <= 0 or warmup < 0 or max_requests < 1:
        raise ValueError("connections >= 1, duration > 0, warmup >= 0 and max_requests >= 1 are required")
    if proxy is not None:
        _require_loopback(proxy, "proxy")
    else:
        _require_loopback(url, "url")

    latencies: list[float] = []  # seconds, responses completed inside the window
    statuses: Counter[int] = Counter()
    classes: Counter[str] = Counter()
    error_samples: list[str] = []
    failed = 0
    started = 0
    request_headers = dict(headers or {})

    connector = aiohttp.TCPConnector(limit=connections, limit_per_host=connections, ttl_dns_cache=None)
    timeout = aiohttp.ClientTimeout(total=request_timeout)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, trust_env=False,
                                     auto_decompress=False) as session:
        clock = time.perf_counter
        t_start = clock()
        window_start = t_start + warmup
        window_end = window_start + duration

        async def worker() -> None:
            nonlocal failed, started
            while True:
                if clock() >= window_end or started >= max_requests:
                    return
                started += 1
                t0 = clock()
                try:
                    async with session.request(method, url, proxy=proxy, headers=request_headers) as resp:
                        await resp.read()
                        status = resp.status
                        if classify is not None:
                            classes[classify(resp)] += 1
                except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
                    failed += 1
                    if len(error_samples) < 5:
                        error_samples.append(f"{type(exc).__name__}: {exc}")
                    await asyncio.sleep(0.01)  # a dead server must not turn this into a busy loop
                    continue
                t1 = clock()
                statuses[status] += 1
                if window_start <= t1 <= window_end:
                    latencies.append(t1 - t0)

        await asyncio.gather(*(worker() for _ in range(connections)))
        # If every worker stopped early (max_requests), the window is shorter than asked for.
        measured = max(1e-9, min(clock(), window_end) - window_start)

    latencies.sort()
    count = len(latencies)
    completed = sum(statuses.values())
    bad_status = sum(n for s, n in statuses.items() if s >= 400)
    ms = 1000.0
    return LoadResult(
        url=url,
        proxy=proxy,
        connections=connections,
        window_s=round(measured, 4),
        count=count,
        rps=count / measured,
        p50_ms=_scaled(percentile(latencies, 50), ms),
        p99_ms=_scaled(percentile(latencies, 99), ms),
        mean_ms=_scaled(sum(latencies) / count if count else None, ms),
        max_ms=_scaled(latencies[-1] if latencies else None, ms),
        errors=failed + bad_status,
        failed=failed,
        completed=completed,
        statuses=dict(sorted(statuses.items())),
        error_samples=error_samples,
        hit_max_requests=started >= max_requests,
        classes=dict(sorted(classes.items())),
    )


# wrk (a C load generator, Debian's `wrk`) for throughput on a small machine: aiohttp's client
# costs about as much CPU per request as the proxy it measures, so on 2 cores it takes the second
# core from a second worker. The script sends absolute-form requests when a proxy is given (as
# an HTTP proxy's client does), counts Cache-Status hits in every thread, and prints one JSON line.
_WRK_SCRIPT = """
local target, host = os.getenv("WRK_TARGET"), os.getenv("WRK_HOST")
local threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args)
  hits = 0
  if target ~= "" then wrk.path = target end
  if host ~= "" then wrk.headers["Host"] = host end
end
function response(status, headers, body)
  local cs = headers["Cache-Status"]
  if cs and string.find(cs, "; hit") then hits = hits + 1 end
end
function done(summary, latency, requests)
  local h = 0
  for _, t in ipairs(threads) do h = h + t:get("hits") end
  local e = summary.errors
  io.write(string.format('WRK {"requests":%d,"seconds":%f,"failed":%d,"bad_status":%d,"hits":%d,'
    .. '"p50_ms":%f,"p99_ms":%f,"mean_ms":%f,"max_ms":%f}\\n', summary.requests, summary.duration / 1e6,
    e.connect + e.read + e.write + e.timeout, e.status, h, latency:percentile(50) / 1000,
    latency:percentile(99) / 1000, latency.mean / 1000, latency.max / 1000))
end
"""


def wrk_available() -> bool:
    return shutil.which("wrk") is not None


async def run_wrk(url: str, *, connections: int = 10, duration: float = 5.0, warmup: float = 1.0,
                  proxy: str | None = None, threads: int = 1) -> LoadResult:
    """`run_load`'s measurement with wrk: `connections` keep-alive connections for `duration`
    seconds (after a `warmup` run). With `proxy`, wrk connects to the proxy and sends `url` in
    absolute form. `completed` counts the measured run's responses only: wrk drops the requests
    in flight at its end, so use run_load where every response must be accounted for."""
    if proxy is not None:
        _require_loopback(proxy, "proxy")
    else:
        _require_loopback(url, "url")
    parts = urlsplit(url)
    env = {"WRK_TARGET": url if proxy else "", "WRK_HOST": parts.netloc if proxy else "", "PATH": "/usr/bin:/bin"}
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(_WRK_SCRIPT)
    try:
        async def one(seconds: float) -> dict:
            proc = await asyncio.create_subprocess_exec(
                "wrk", f"-t{threads}", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--timeout", "10s",
                "-s", script.name, proxy or url, env=env, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT)
            out, _ = await proc.communicate()
            line = next((ln for ln in out.decode(errors="replace").splitlines() if ln.startswith("WRK ")), None)
            if line is None:
                raise RuntimeError(f"wrk printed no summary: {out[-500:]!r}")
            return json.loads(line[4:])
        if warmup > 0:
            await one(warmup)
        figures = await one(duration)
    finally:
        os.unlink(script.name)
    requests = figures["requests"]
    return LoadResult(
        url=url, proxy=proxy, connections=connections, window_s=round(figures["seconds"], 4), count=requests,
        rps=requests / max(figures["seconds"], 1e-9), p50_ms=figures["p50_ms"], p99_ms=figures["p99_ms"],
        mean_ms=figures["mean_ms"], max_ms=figures["max_ms"], errors=figures["failed"] + figures["bad_status"],
        failed=figures["failed"], completed=requests, classes={"hit": figures["hits"]})


def _scaled(value: float | None, factor: float) -> float | None:
    return None if value is None else value * factor


async def measure(name: str, url: str, args, *, procs: Mapping, proxy: str | None = None,
                  headers: Mapping[str, str] | None = None, classify=None) -> dict:
    """One mode of a benchmark: `run_load` with the script's --connections/--duration/--warmup,
    plus the CPU µs per request of each process in `procs` (anything with `cpu_seconds()`) and of
    this load generator."""
    cpu_before = {k: p.cpu_seconds() for k, p in procs.items()}
    self_before = time.process_time()
    result = await run_load(url, connections=args.connections, duration=args.duration, warmup=args.warmup,
                            proxy=proxy, headers=headers, classify=classify)
    self_cpu = time.process_time() - self_before
    out = {"mode": name, **result.to_dict()}
    n = max(1, result.completed + result.failed)
    cpu_us = {"loadgen": round(self_cpu / n * 1e6, 1)}
    for key, proc in procs.items():
        after = proc.cpu_seconds()
        if after is not None and cpu_before[key] is not None:
            cpu_us[key] = round((after - cpu_before[key]) / n * 1e6, 1)
    out["cpu_us_per_request"] = cpu_us
    return out


def cache_outcome(cache_status: str | None) -> str:
    """`Cache-Status: Projectionist; hit; ttl=..` -> "hit"; a stale entry served (fwd=stale without
    a usable fwd-status) -> "stale"; forwarded (fwd=uri-miss, vary-miss, request, a stale entry
    refetched, ...) -> "miss"; fwd=bypass -> "bypass"."""
    if not cache_status:
        return "none"
    params = [p.strip() for p in cache_status.split(";")[1:]]
    if "hit" in params:
        return "hit"
    fwd = next((p.partition("=")[2] for p in params if p.startswith("fwd=")), None)
    fwd_status = next((p.partition("=")[2] for p in params if p.startswith("fwd-status=")), "")
    answered = fwd_status.isdigit() and int(fwd_status) < 500 and int(fwd_status) != 429
    if fwd == "stale" and not answered:
        return "stale"
    if fwd == "bypass":
        return "bypass"
    if fwd:
        return "miss"
    return "other"


def at_least_one(value: str) -> int:
    """argparse type: a count that must be >= 1 (rounds, images, clients)."""
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {number}")
    return number


def load_arguments(doc: str | None) -> argparse.ArgumentParser:
    """A parser with the options every closed-loop benchmark takes: --connections, --duration,
    --warmup, --json. Add the script's own, then `run_benchmark`."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--connections", type=int, default=10, help="concurrent connections (default 10)")
    parser.add_argument("--duration", type=float, default=5.0, help="measured seconds per mode (default 5)")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds before each (default 1)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    return parser


def run_benchmark(parser: argparse.ArgumentParser, argv: list[str] | None, bench, render) -> int:
    """Parse, run `bench(args)` (a coroutine giving a report with "ok"), print it; the exit status."""
    args = parser.parse_args(argv)
    if args.connections < 1 or args.duration <= 0 or args.warmup < 0:
        parser.error("--connections >= 1, --duration > 0 and --warmup >= 0 are required")
    # The load generator is the same for every mode; keep its cyclic GC out of the latencies.
    gc.freeze()
    gc.set_threshold(50_000, 50, 100)
    report = asyncio.run(bench(args))
    print(json.dumps(report, indent=2) if args.json else render(report), flush=True)
    return 0 if report["ok"] else 1
