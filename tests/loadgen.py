"""A load generator in its own process: `clients` browsers each sending GETs through a proxy for
`duration` seconds, each waiting out a refusal's Retry-After (at least `min_pause`) as a well-behaved
client does. It runs apart from the proxy under
test as real browsers do: sharing the test's event loop with the proxy, 100 clients delayed the
proxy's own timers by a second and more, so what was measured was the harness, not the limiter.

Prints one JSON object: {"wall": seconds, "results": [[status, headers, body, elapsed], ...]}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import aiohttp


async def run(proxy: str, url: str, clients: int, duration: float, min_pause: float,
              headers: dict[str, str]) -> dict:
    results: list[list] = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=clients * 2)) as session:

        async def browser() -> None:
            deadline = time.monotonic() + duration
            while time.monotonic() < deadline:
                started = time.monotonic()
                async with session.get(url, proxy=proxy, headers=headers) as r:
                    body = await r.text()
                    results.append([r.status, dict(r.headers), body, time.monotonic() - started])
                if r.status == 429:
                    await asyncio.sleep(max(min_pause, float(r.headers.get("Retry-After", 0))))

        started = time.monotonic()
        await asyncio.gather(*(browser() for _ in range(clients)))
        return {"wall": time.monotonic() - started, "results": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--proxy", required=True)
    parser.add_argument("--url", required=True)
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--duration", type=float, default=4.0)
    parser.add_argument("--min-pause", type=float, default=0.25, help="after a 429, at least this")
    parser.add_argument("--header", action="append", default=[], help="Name: value")
    args = parser.parse_args()
    headers = dict(h.split(": ", 1) for h in args.header)
    print(json.dumps(asyncio.run(run(args.proxy, args.url, args.clients, args.duration,
                                     args.min_pause, headers))))


if __name__ == "__main__":
    main()
