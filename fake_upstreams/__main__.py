"""`python -m fake_upstreams [--host 127.0.0.1] [--base-port 18000]`: run every fake until Ctrl-C.

Ports are base, base+1, ... in the order plex, plextv, tmdb, tmdb_images, trakt (`--base-port 0`: free
ports). Prints one `name=url` line per fake once all are listening.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal

from .server import NAMES, FakeUpstreams


async def run(host: str, base_port: int) -> None:
    ports = {name: base_port + n for n, name in enumerate(NAMES)} if base_port else None
    async with FakeUpstreams(host=host, ports=ports) as fakes:
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
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run(args.host, args.base_port))


if __name__ == "__main__":
    main()
