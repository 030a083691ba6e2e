"""Image-cache benchmark: hits, misses with re-encoding, bytes saved, and an event loop that stays free.

    python bench/images.py [--images 60] [--connections 10] [--duration 5] [--warmup 1] [--api-rate 200]
                           [--rounds 3] [--gc-threshold0 N] [--json] [--strict]

Everything runs on 127.0.0.1 in separate processes: an image upstream serving a generated set of
posters and backdrops (fake_upstreams' artwork renderer: gradient, shapes and film grain, JPEG
q86, like real artwork; w500/w780 posters, w1280 backdrops and 2000x3000 `original` posters), the
bench TMDB JSON upstream (bench/_upstream.py), and Projectionist with the shipped rules.yaml
(`tmdb-images` and `tmdb` overridden to them). Images are requested as
`http://image.tmdb.org/t/p/{size}/bench-{i}.jpg` through the explicit proxy with
`Accept: image/webp,*/*` (route tmdb.image: WebP when smaller, `original` capped to 1280 px).

    miss         each image once, one after the other: fetch + re-encode latency (p50/p99/max),
                 bytes sent against the originals' bytes (all images, and only the ones that were
                 re-encoded but not resized: what WebP alone saves, target >= 25%)
    hit          one cached w780 poster at `--connections`: req/s, p50/p99 (every answer a hit)
    api idle     cached TMDB JSON (`/3/movie/603`, a response-cache hit) sent at a steady
                 `--api-rate` (default 200/s, open loop, so the probe measures the proxy's
                 responsiveness rather than saturating a 2-core box itself): p50/p99
    api loaded   the same while 4 clients (another process) keep the image cache re-encoding
                 (each request a new URL: a fetch, a transcode in the worker pool, a disk write):
                 p99 must stay <= 2x the idle p99, which shows transcodes never block the loop
    api control  the same while the pool's work runs outside the proxy (processes of the
                 workers' priority transcoding in a loop): the machine's own CPU contention

Idle, loaded and control alternate for `--rounds` rounds (and a last idle one); the medians of the
rounds' p99 are compared, so one hiccup of a shared VM does not decide the verdict. On a 2-core
box the API tail is set by the proxy's young-generation GC pauses (mitmproxy leaves ~100 cyclic
objects per request): collected 50,000 at a time they took 12-30 ms each and the loaded/idle p99
was x6.7, so `projectionist proxy` collects them 5,000 at a time. `--gc-threshold0 N` caps the
threshold lower still in the proxy process (an experiment).

Exit status 1 if a request failed, a hit was not a hit or a process did not exit cleanly; with
--strict also if a target (WebP savings, loaded/idle p99) is missed.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _load import at_least_one, cache_outcome, load_arguments, percentile, run_benchmark, run_load  # noqa: E402
from _stack import LOCALHOST, REPO_ROOT, ProxyProcess, UpstreamProcess  # noqa: E402

if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

ACCEPT = "image/webp,*/*"
API_URL = "http://api.themoviedb.org/3/movie/603?api_key=x"
REENCODERS = 4
WEBP_SAVING_TARGET = 0.25
P99_RATIO_TARGET = 2.0
# (TMDB size in the URL, width, height): the mix of the generated set, repeated
KINDS = [("w780", 780, 1170), ("w780", 780, 1170), ("w500", 500, 750), ("w1280", 1280, 720),
         ("w1280", 1280, 720), ("original", 2000, 3000)]
LOAD_KINDS = [0, 2, 3]  # what the re-encode load asks for: w780, w500 posters, w1280 backdrops


def image_spec(i: int) -> tuple[str, int, int]:
    return KINDS[i % len(KINDS)]


def image_path(i: int) -> str:
    return f"/t/p/{image_spec(i)[0]}/bench-{i}.jpg"


# --- the image upstream (a child process: `bench/images.py --serve-upstream N`) --------------------

def _render(i: int) -> bytes:
    from fake_upstreams.images import _draw

    _, width, height = image_spec(i)
    return _draw(f"bench-image-{i}", width, height, "JPEG")


def serve_upstream(count: int) -> None:
    from aiohttp import web

    with concurrent.futures.ProcessPoolExecutor(max(1, min(2, os.cpu_count() or 1))) as pool:
        bodies = list(pool.map(_render, range(count)))

    async def handler(request: web.Request) -> web.Response:
        name = request.match_info["file"].removesuffix(".jpg")
        kind, _, number = name.rpartition("-")
        if not number.isdigit() or kind not in ("bench", "load"):
            return web.Response(status=404)
        i = int(number)
        if kind == "load":  # new URLs (misses for the proxy), same bytes as a set member
            i = next(j for j in range(i % count, i % count + len(KINDS)) if j % len(KINDS) in LOAD_KINDS) % count
        body = bodies[i]
        return web.Response(body=body, headers={"Content-Type": "image/jpeg", "Cache-Control": "max-age=31536000",
                                                "ETag": f'"bench-{i}-{len(body)}"'})

    async def main() -> None:
        app = web.Application()
        app.router.add_get("/t/p/{size}/{file}", handler)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, LOCALHOST, 0)
        await site.start()
        print(f"READY {runner.addresses[0][1]} {sum(map(len, bodies))}", flush=True)
        await asyncio.Event().wait()

    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass


def image_upstream(count: int) -> UpstreamProcess:
    """The generated image set served by this script in a child process (rendering takes a while)."""
    return UpstreamProcess([sys.executable, __file__, "--serve-upstream", str(count)], start_timeout=120.0)


# --- measurements ----------------------------------------------------------------------------------

async def fetch(session: aiohttp.ClientSession, url: str, proxy: str | None, accept: str = ACCEPT):
    t0 = time.perf_counter()
    async with session.get(url, proxy=proxy, headers={"Accept": accept}) as r:
        body = await r.read()
        return r.status, r.headers.copy(), body, time.perf_counter() - t0


async def misses(args, proxy_url: str, upstream_url: str, report: dict) -> None:
    """Every image once through the proxy (a miss each), then again (a hit each)."""
    rows = []
    async with aiohttp.ClientSession(trust_env=False) as session:
        for i in range(args.images):
            _, _, original, _ = await fetch(session, upstream_url + image_path(i), None, "*/*")
            status, headers, body, seconds = await fetch(session, "http://image.tmdb.org" + image_path(i), proxy_url)
            rows.append({"i": i, "size": image_spec(i)[0], "status": status, "outcome": cache_outcome(headers.get("Cache-Status")),
                         "content_type": headers.get("Content-Type"), "original": len(original), "sent": len(body),
                         "ms": seconds * 1000})
        again = [await fetch(session, "http://image.tmdb.org" + image_path(i), proxy_url) for i in range(args.images)]
    latencies = sorted(r["ms"] for r in rows)
    reencoded = [r for r in rows if r["size"] != "original"]  # same pixels, new format: what WebP alone saves
    total_original, total_sent = sum(r["original"] for r in rows), sum(r["sent"] for r in rows)
    webp_original, webp_sent = sum(r["original"] for r in reencoded), sum(r["sent"] for r in reencoded)
    report["miss"] = {
        "images": len(rows), "p50_ms": percentile(latencies, 50), "p99_ms": percentile(latencies, 99),
        "max_ms": latencies[-1], "statuses": sorted({r["status"] for r in rows}),
        "outcomes": sorted({r["outcome"] for r in rows}),
        "content_types": {t: sum(1 for r in rows if r["content_type"] == t) for t in {r["content_type"] for r in rows}},
        "original_bytes": total_original, "sent_bytes": total_sent,
        "saved_fraction": round(1 - total_sent / total_original, 4),
        "webp_only_original_bytes": webp_original, "webp_only_sent_bytes": webp_sent,
        "webp_only_saved_fraction": round(1 - webp_sent / webp_original, 4),
        "second_pass_outcomes": sorted({cache_outcome(h.get("Cache-Status")) for _, h, _, _ in again}),
        "second_pass_statuses": sorted({s for s, _, _, _ in again}),
    }


def _classify(resp: aiohttp.ClientResponse) -> str:
    return cache_outcome(resp.headers.get("Cache-Status"))


async def hits(args, proxy_url: str, report: dict) -> None:
    result = await run_load("http://image.tmdb.org" + image_path(0), connections=args.connections,
                            duration=args.duration, warmup=args.warmup, proxy=proxy_url,
                            headers={"Accept": ACCEPT}, classify=_classify)
    report["hit"] = result.to_dict()


async def api_probe(args, proxy_url: str) -> dict:
    """Cached API answers at a steady rate (open loop): latency percentiles, statuses, outcomes."""
    latencies: list[float] = []
    statuses: Counter[int] = Counter()
    classes: Counter[str] = Counter()
    failed = 0
    connector = aiohttp.TCPConnector(limit=16)
    async with aiohttp.ClientSession(connector=connector, trust_env=False,
                                     timeout=aiohttp.ClientTimeout(total=10)) as session:
        begin = time.perf_counter() + 0.05
        window = begin + args.warmup

        async def one(at: float) -> None:
            nonlocal failed
            await asyncio.sleep(max(0.0, at - time.perf_counter()))
            t0 = time.perf_counter()
            try:
                async with session.get(API_URL, proxy=proxy_url, headers={"Accept": "application/json"}) as r:
                    await r.read()
                    statuses[r.status] += 1
                    classes[_classify(r)] += 1
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
                failed += 1
                return
            if at >= window:
                latencies.append((time.perf_counter() - t0) * 1000)

        total = int((args.warmup + args.duration) * args.api_rate)
        await asyncio.gather(*(one(begin + i / args.api_rate) for i in range(total)))
    latencies.sort()
    return {"rate": args.api_rate, "count": len(latencies), "p50_ms": percentile(latencies, 50),
            "p99_ms": percentile(latencies, 99), "max_ms": latencies[-1] if latencies else None,
            "errors": failed + sum(n for st, n in statuses.items() if st >= 400), "completed": sum(statuses.values()),
            "statuses": dict(statuses), "classes": dict(classes)}


def reencode_load(proxy_url: str, seconds: float, clients: int) -> None:
    """`--reencode-load`: clients asking for new images (misses) for `seconds`; prints a JSON summary."""
    done: list[tuple[int, str, float]] = []
    counter = itertools.count()
    run_id = int(time.time() * 1000) % 10**9

    async def client(stop_at: float) -> None:
        async with aiohttp.ClientSession(trust_env=False) as session:
            while time.perf_counter() < stop_at:
                url = f"http://image.tmdb.org/t/p/w780/load-{run_id}{next(counter):05d}.jpg"
                try:
                    status, headers, _, took = await fetch(session, url, proxy_url)
                    done.append((status, cache_outcome(headers.get("Cache-Status")), took * 1000))
                except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
                    done.append((0, "error", 0.0))

    async def main() -> None:
        print("STARTED", flush=True)
        stop_at = time.perf_counter() + seconds
        await asyncio.gather(*(client(stop_at) for _ in range(clients)))

    started = time.perf_counter()
    asyncio.run(main())
    elapsed = time.perf_counter() - started
    took = sorted(t for _, _, t in done)
    print(json.dumps({"clients": clients, "requests": len(done), "per_second": round(len(done) / elapsed, 1),
                      "statuses": sorted({st for st, _, _ in done}), "outcomes": sorted({o for _, o, _ in done}),
                      "p50_ms": percentile(took, 50), "p99_ms": percentile(took, 99)}), flush=True)


async def api_under_reencode_load(args, proxy_url: str) -> tuple[dict, dict]:
    seconds = args.warmup + args.duration + 1.0
    loader = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--reencode-load", proxy_url, str(seconds), str(REENCODERS),
        stdout=asyncio.subprocess.PIPE, cwd=REPO_ROOT)
    try:
        await asyncio.wait_for(loader.stdout.readline(), 30)  # STARTED
        await asyncio.sleep(0.5)  # the re-encoding is under way before the measurement starts
        loaded = await api_probe(args, proxy_url)
        out, _ = await asyncio.wait_for(loader.communicate(), seconds + 60)
    finally:
        if loader.returncode is None:
            loader.kill()
            await loader.wait()
    return loaded, json.loads(out.decode().strip().splitlines()[-1])


def control_load(seconds: float, workers: int) -> None:
    """`--control-load`: the pool's work without the proxy: `workers` processes with the image
    workers' priority transcoding a w780 poster to WebP in a loop (what the machine's CPU contention
    alone does to the API probe)."""
    from projectionist.images import _init_worker

    print("STARTED", flush=True)
    deadline = time.time() + seconds
    with concurrent.futures.ProcessPoolExecutor(workers, initializer=_init_worker, initargs=(10,)) as pool:
        list(pool.map(_control_worker, [deadline] * workers))


def _control_worker(deadline: float) -> int:
    from projectionist.images import Job, transcode

    source, done = _render(0), 0
    while time.time() < deadline:
        transcode(Job(source, "webp", None, 50_000_000))
        done += 1
    return done


async def api_under_control_load(args, proxy_url: str) -> dict:
    seconds = args.warmup + args.duration + 1.0
    workers = max(1, (os.cpu_count() or 2) - 1)  # the pool's default size
    loader = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--control-load", str(seconds), str(workers),
        stdout=asyncio.subprocess.PIPE, cwd=REPO_ROOT)
    try:
        await asyncio.wait_for(loader.stdout.readline(), 60)  # STARTED
        await asyncio.sleep(0.5)
        return await api_probe(args, proxy_url)
    finally:
        await asyncio.wait_for(loader.communicate(), seconds + 60)


def _median_of(rounds: list[dict]) -> dict:
    return {key: statistics.median(r[key] for r in rounds) for key in ("p50_ms", "p99_ms", "max_ms")} | {
        "rate": rounds[0]["rate"], "count": sum(r["count"] for r in rounds), "rounds": len(rounds),
        "p99_ms_each": [round(r["p99_ms"], 2) for r in rounds]}


def _gc_env(threshold0: int | None, directory: Path) -> dict[str, str] | None:
    """`--gc-threshold0`: the proxy process with a smaller young-generation GC threshold than the
    one `projectionist proxy` sets (an experiment: a sitecustomize caps it), to show how much of
    the API tail is garbage-collection pauses rather than anything the image cache does."""
    if threshold0 is None:
        return None
    (directory / "sitecustomize.py").write_text(
        "import gc\n_set = gc.set_threshold\n"
        f"def set_threshold(t0, *rest):\n    _set(min(t0, {threshold0}), *rest)\n"
        f"gc.set_threshold = set_threshold\ngc.set_threshold({threshold0})\n")
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(directory), os.environ.get("PYTHONPATH")]))}


async def run(args) -> dict:
    report: dict = {"problems": [], "exit_codes": {}, "gc_threshold0": args.gc_threshold0}
    with image_upstream(args.images) as images, UpstreamProcess() as api, \
            tempfile.TemporaryDirectory(prefix="bench-images-gc-") as gc_dir:
        overrides = {"tmdb-images": images.url, "tmdb": api.url}
        with ProxyProcess(overrides=overrides, env=_gc_env(args.gc_threshold0, Path(gc_dir))) as proxy:
            await misses(args, proxy.proxy_url, images.url, report)
            await hits(args, proxy.proxy_url, report)
            async with aiohttp.ClientSession(trust_env=False) as session:  # prime the API answer
                await fetch(session, API_URL, proxy.proxy_url, "application/json")
            # Idle and loaded alternate (idle, loaded, idle, ..., idle): a VM's hiccup in one round
            # does not decide the comparison, medians of the rounds' p99 do.
            idle, loaded, control, reencode = [], [], [], []
            for _ in range(args.rounds):
                idle.append(await api_probe(args, proxy.proxy_url))
                api, load = await api_under_reencode_load(args, proxy.proxy_url)
                loaded.append(api)
                reencode.append(load)
                control.append(await api_under_control_load(args, proxy.proxy_url))
            idle.append(await api_probe(args, proxy.proxy_url))
            report["api_rounds"] = {"idle": idle, "loaded": loaded, "control": control}
            report["api_idle"], report["api_loaded"] = _median_of(idle), _median_of(loaded)
            report["api_control"] = _median_of(control)
            report["reencode_load"] = {
                "clients": REENCODERS, "requests": sum(r["requests"] for r in reencode),
                "per_second": round(statistics.mean(r["per_second"] for r in reencode), 1),
                "statuses": sorted({x for r in reencode for x in r["statuses"]}),
                "outcomes": sorted({x for r in reencode for x in r["outcomes"]}),
                "p50_ms": statistics.median(r["p50_ms"] for r in reencode),
                "p99_ms": max(r["p99_ms"] for r in reencode)}
            report["exit_codes"]["proxy"] = proxy.stop()
            report["errors_logged"] = proxy.logged_errors()
    return report


def judge(report: dict, args) -> None:
    problems = report["problems"]
    miss, hit = report["miss"], report["hit"]
    if miss["statuses"] != [200] or miss["outcomes"] != ["miss"]:
        problems.append(f"first pass: statuses {miss['statuses']}, outcomes {miss['outcomes']}")
    if miss["second_pass_statuses"] != [200] or miss["second_pass_outcomes"] != ["hit"]:
        problems.append(f"second pass: statuses {miss['second_pass_statuses']}, outcomes {miss['second_pass_outcomes']}")
    if hit["errors"] or hit["classes"] != {"hit": hit["completed"]}:
        problems.append(f"hit mode: {hit['errors']} errors, classes {hit['classes']}")
    for name, rounds in report["api_rounds"].items():
        for mode in rounds:
            if mode["errors"] or mode["classes"] != {"hit": mode["completed"]}:
                problems.append(f"api {name}: {mode['errors']} errors, classes {mode['classes']}")
    load = report["reencode_load"]
    if load["statuses"] != [200] or load["outcomes"] != ["miss"]:
        problems.append(f"re-encode load: statuses {load['statuses']}, outcomes {load['outcomes']}")
    if set(report["exit_codes"].values()) != {0}:
        problems.append(f"exit codes {report['exit_codes']}")
    if report["errors_logged"]:
        problems.append(f"the proxy logged {len(report['errors_logged'])} errors, the first: {report['errors_logged'][0]}")
    ratio = report["api_loaded"]["p99_ms"] / report["api_idle"]["p99_ms"]
    report["p99_ratio"] = round(ratio, 2)
    report["p99_ratio_vs_control"] = round(report["api_loaded"]["p99_ms"] / report["api_control"]["p99_ms"], 2)
    report["verdicts"] = {
        "webp_saves_25pct": miss["webp_only_saved_fraction"] >= WEBP_SAVING_TARGET,
        "loop_not_blocked": ratio <= P99_RATIO_TARGET,
    }
    report["ok"] = not problems and (not args.strict or all(report["verdicts"].values()))


def _pf(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def render(report: dict) -> str:
    miss, hit, load = report["miss"], report["hit"], report["reencode_load"]
    idle, loaded = report["api_idle"], report["api_loaded"]
    mb = 1 / 1_000_000
    lines = []
    if report["gc_threshold0"]:
        lines.append(f"(experiment: the proxy's gen-0 GC threshold capped at {report['gc_threshold0']})")
    lines.append(f"image set: {miss['images']} generated posters/backdrops, {miss['original_bytes'] * mb:.1f} MB of JPEG; "
          f"answers: {miss['content_types']}")
    lines.append(f"miss + re-encode   p50 {miss['p50_ms']:7.1f} ms   p99 {miss['p99_ms']:7.1f} ms   "
          f"max {miss['max_ms']:7.1f} ms   (sequential, fetch + transcode + store)")
    lines.append(f"hit                {hit['rps']:8.0f} req/s   p50 {hit['p50_ms']:6.2f} ms   p99 {hit['p99_ms']:6.2f} ms   "
          f"({hit['connections']} connections, {hit['count']} answers, all hits: {hit['classes'] == {'hit': hit['completed']}})")
    lines.append(f"bytes              originals {miss['original_bytes'] * mb:7.2f} MB -> sent {miss['sent_bytes'] * mb:7.2f} MB: "
          f"saved {miss['saved_fraction']:.1%} (re-encoding and the 1280 px cap)")
    lines.append(f"WebP alone         originals {miss['webp_only_original_bytes'] * mb:7.2f} MB -> sent "
          f"{miss['webp_only_sent_bytes'] * mb:7.2f} MB: saved {miss['webp_only_saved_fraction']:.1%}   "
          f"target >= {WEBP_SAVING_TARGET:.0%}: {_pf(report['verdicts']['webp_saves_25pct'])}")
    lines.append(f"API hits idle      p50 {idle['p50_ms']:6.2f} ms   p99 {idle['p99_ms']:6.2f} ms   "
          f"(median of {idle['rounds']} rounds, p99 each {idle['p99_ms_each']}; {idle['rate']:g} req/s steady)")
    lines.append(f"API hits + load    p50 {loaded['p50_ms']:6.2f} ms   p99 {loaded['p99_ms']:6.2f} ms   "
          f"(median of {loaded['rounds']} rounds, p99 each {loaded['p99_ms_each']})")
    control = report["api_control"]
    lines.append(f"re-encode load     {load['clients']} clients, {load['per_second']:.1f} images/s re-encoded "
          f"(miss p50 {load['p50_ms']:.0f} ms, p99 {load['p99_ms']:.0f} ms)")
    lines.append(f"API hits + control p50 {control['p50_ms']:6.2f} ms   p99 {control['p99_ms']:6.2f} ms   "
          f"(same transcodes outside the proxy; p99 each {control['p99_ms_each']})")
    lines.append(f"loaded/idle p99    {report['p99_ratio']:.2f}x   target <= {P99_RATIO_TARGET:g}x: "
          f"{_pf(report['verdicts']['loop_not_blocked'])}   (loaded/control p99 {report['p99_ratio_vs_control']:.2f}x: "
          f"what the proxy adds to the machine's own CPU contention)")
    for problem in report["problems"]:
        lines.append(f"PROBLEM: {problem}")
    lines.append(f"overall: {_pf(report['ok'] and all(report['verdicts'].values()))}")
    return "\n".join(lines)


async def bench(args) -> dict:
    report = await run(args)
    judge(report, args)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = load_arguments(__doc__)
    parser.add_argument("--images", type=int, default=60, help="generated posters/backdrops (default 60, min 50)")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    parser.add_argument("--api-rate", type=float, default=200.0, help="API probe requests per second (default 200)")
    parser.add_argument("--rounds", type=at_least_one, default=3, help="rounds of idle, loaded, control (default 3)")
    parser.add_argument("--gc-threshold0", type=int, metavar="N",
                        help="experiment: cap the proxy's young-generation GC threshold at N (it sets 5000)")
    parser.add_argument("--serve-upstream", type=int, metavar="N", help=argparse.SUPPRESS)
    parser.add_argument("--reencode-load", nargs=3, metavar=("PROXY", "SECONDS", "CLIENTS"), help=argparse.SUPPRESS)
    parser.add_argument("--control-load", nargs=2, metavar=("SECONDS", "WORKERS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    # The same script is also its own image upstream and its load's child processes.
    if args.serve_upstream:
        serve_upstream(args.serve_upstream)
        return 0
    if args.reencode_load:
        proxy, seconds, clients = args.reencode_load
        if not proxy.startswith(f"http://{LOCALHOST}:"):
            parser.error("the proxy must be on 127.0.0.1")
        reencode_load(proxy, float(seconds), int(clients))
        return 0
    if args.control_load:
        control_load(float(args.control_load[0]), int(args.control_load[1]))
        return 0
    if args.images < 50:
        parser.error("--images must be at least 50")
    return run_benchmark(parser, argv, bench, render)


if __name__ == "__main__":
    sys.exit(main())
