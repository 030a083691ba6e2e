#!/usr/bin/env python3
"""Soak: unique cache misses through the proxy for a while, then a scripted `kill -9` (issue 16).

Every request is a new TMDB movie (`tmdb.details`, cached, shared), so the response cache keeps
growing until `cache.memory_max_bytes` (here `--memory-bound`, small so that a short run reaches
it) and then evicts. Printed every `--interval` seconds: the proxy's RSS (and its image workers'),
open fds, the SQLite file (+ WAL) and the cache directory's size. The claim to check: RSS is flat
once the memory cache is at its bound. At the end, the proxy is killed with SIGKILL right after
the last acknowledged request, and the usage rows lost are counted (at most the last 100 ms of
acknowledged requests may be).

    python bench/soak.py                  # 60 s
    python bench/soak.py --minutes 30     # the long run
"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import sys
import time
from pathlib import Path

import aiohttp
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _load import load_arguments, run_benchmark  # noqa: E402
from _stack import ProxyProcess, UpstreamProcess, forwarding_only  # noqa: E402

LOSS_BOUND_S = 0.1


def soak_rules(memory_bound: int):
    unlimited = forwarding_only()  # no rate limits on any upstream (the default TMDB key allows 2/s)

    def edit(rules: dict) -> None:
        unlimited(rules)
        rules["limits"] = {}
        rules["cache"]["memory_max_bytes"] = memory_bound
    return edit


def tree_size(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(root, name))
            except OSError:
                pass
    return total


def sample(px: ProxyProcess, started: float, done: int, body_bytes: int) -> dict:
    proc = psutil.Process(px.pid)
    children = proc.children(recursive=True)
    db = sum(p.stat().st_size for p in px.home.glob("projectionist.db*") if p.exists())
    return {"t": round(time.monotonic() - started, 1), "requests": done,
            "rss_mb": round(proc.memory_info().rss / 1e6, 1),
            "workers_rss_mb": round(sum(c.memory_info().rss for c in children if c.is_running()) / 1e6, 1),
            "fds": proc.num_fds(), "db_mb": round(db / 1e6, 2),
            "cache_dir_mb": round(tree_size(px.home / "cache") / 1e6, 2),
            "fetched_mb": round(body_bytes / 1e6, 2)}


async def bench(args) -> dict:
    seconds = args.minutes * 60 if args.minutes else args.duration
    with UpstreamProcess() as up, ProxyProcess({"tmdb": up.url}, soak_rules(args.memory_bound)) as px:
        started = time.monotonic()
        samples: list[dict] = []
        counter = {"next": 0, "done": 0, "errors": 0, "bytes": 0}
        acked: list[float] = []

        async def client(session: aiohttp.ClientSession, until: float) -> None:
            while time.monotonic() < until:
                counter["next"] += 1
                url = f"http://api.themoviedb.org/3/movie/{counter['next']}"
                try:
                    async with session.get(url, proxy=px.proxy_url) as r:
                        body = await r.read()
                    if r.status != 200:
                        counter["errors"] += 1
                except aiohttp.ClientError:
                    counter["errors"] += 1
                    continue
                counter["done"] += 1
                counter["bytes"] += len(body)
                acked.append(time.time())

        async def sampler(until: float) -> None:
            while time.monotonic() < until:
                samples.append(sample(px, started, counter["done"], counter["bytes"]))
                if not args.json:
                    print("  ".join(f"{k}={v}" for k, v in samples[-1].items()), flush=True)
                await asyncio.sleep(args.interval)

        until = started + seconds
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
            await asyncio.gather(sampler(until), *(client(session, until) for _ in range(args.connections)))
            # The scripted crash: the last answers are acknowledged, then SIGKILL at once.
            killed_at = time.time()
            os.kill(px.pid, signal.SIGKILL)
            px.proc.wait(30)
        rows = sqlite3.connect(px.db_path).execute(
            "SELECT count(*) FROM usage_events WHERE route = 'tmdb.details'").fetchone()[0]
    lost = max(0, len(acked) - rows)
    window = killed_at - sorted(acked)[len(acked) - lost] if lost else 0.0
    # RSS from the first sample where the cache had fetched twice its bound (it is full and evicting).
    full = [s for s in samples if s["fetched_mb"] * 1e6 >= 2 * args.memory_bound]
    growth = round(full[-1]["rss_mb"] - full[0]["rss_mb"], 1) if len(full) >= 2 else None
    minutes = (full[-1]["t"] - full[0]["t"]) / 60 if len(full) >= 2 else 0
    # The miss-reason tables fill up to their bound (20,000 keys each) in the first minutes; over
    # the run's second half everything per-key is at its bound, so that is the flatness to judge.
    half = [s for s in samples if s["t"] >= samples[-1]["t"] / 2] if samples else []
    late = round(half[-1]["rss_mb"] - half[0]["rss_mb"], 1) if len(half) >= 2 else None
    late_minutes = (half[-1]["t"] - half[0]["t"]) / 60 if len(half) >= 2 else 0
    report = {
        "seconds": seconds, "memory_bound_mb": round(args.memory_bound / 1e6, 1),
        "requests": counter["done"], "errors": counter["errors"], "samples": samples,
        "rss_growth_after_full_mb": growth,
        "rss_growth_mb_per_min": round(growth / minutes, 2) if growth is not None and minutes else None,
        "rss_growth_second_half_mb": late,
        "rss_growth_second_half_mb_per_min": round(late / late_minutes, 2) if late is not None and late_minutes else None,
        "acked": len(acked), "rows": rows, "rows_lost": lost, "lost_window_s": round(window, 4),
    }
    report["ok"] = counter["errors"] == 0 and window <= LOSS_BOUND_S
    return report


def render(report: dict) -> str:
    return "\n".join([
        f"soak: {report['seconds']:.0f} s, {report['requests']} unique misses, {report['errors']} errors, "
        f"memory cache bound {report['memory_bound_mb']} MB",
        f"RSS after the cache was full: {report['rss_growth_after_full_mb']} MB growth "
        f"({report['rss_growth_mb_per_min']} MB/min); over the second half: {report['rss_growth_second_half_mb']} MB "
        f"({report['rss_growth_second_half_mb_per_min']} MB/min)",
        f"kill -9: {report['acked']} acknowledged, {report['rows']} usage rows, {report['rows_lost']} lost "
        f"(the first lost one acknowledged {report['lost_window_s'] * 1000:.1f} ms before the kill; "
        f"bound {LOSS_BOUND_S * 1000:.0f} ms)",
        "ok" if report["ok"] else "NOT OK",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = load_arguments(__doc__)
    parser.set_defaults(duration=60.0, connections=4, warmup=0.0)
    parser.add_argument("--minutes", type=float, default=None, help="run this long instead (e.g. 30)")
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between samples (default 5)")
    parser.add_argument("--memory-bound", type=int, default=1_000_000,
                        help="cache.memory_max_bytes for the run (default 1 MB, reached in seconds)")
    return run_benchmark(parser, argv, bench, render)


if __name__ == "__main__":
    sys.exit(main())
