"""`python -m fake_upstreams [--host 127.0.0.1] [--base-port 18000] [--latency plex=0.08,tmdb=0.15]`: run
every fake until Ctrl-C.

Ports are base, base+1, ... in the order plex, plextv, tmdb, tmdb_images, trakt (`--base-port 0`: free
ports). Prints one `name=url` line per fake once all are listening.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal

from .server import NAMES, FakeUpstreams


def parse_latency(value: str) -> dict[str, float]:
    """"plex=0.08,tmdb=0.15,tmdb_images=0.05" (seconds) -> {"plex": 0.08, ...}."""
    out: dict[str, float] = {}
    for pair in filter(None, (p.strip() for p in value.split(","))):
        name, sep, seconds = pair.partition("=")
        if not sep or name not in NAMES:
            raise argparse.ArgumentTypeError(f"--latency takes name=seconds with name one of {', '.join(NAMES)}")
        out[name] = float(seconds)
    return out


async def run(host: str, base_port: int, latency: dict[str, float] | None = None) -> None:
    ports = {name: base_port + n for n, name in enumerate(NAMES)} if base_port else None
    async with FakeUpstreams(host=host, ports=ports, latency=latency) as fakes:
        for name in NAMES:
            print(f"{name}={fakes.urls[name]}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, stop.set)
        await stop.wait()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fake_upstreams", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--base-port", type=int, default=18000)
    parser.add_argument("--latency", type=parse_latency, default={},
                        help="added to every answer, e.g. plex=0.08,tmdb=0.15 (seconds; a remote server)")
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run(args.host, args.base_port, args.latency))


if __name__ == "__main__":
    main()
