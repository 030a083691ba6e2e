"""The proxy's operations listener: `GET /metrics` (Prometheus text), `GET /health` (readiness)
and, with a shared tier, `GET /peer/v1/...`: the cached bodies too big for Redis that this process
holds, for the proxies of other machines (signed requests only; projectionist/peer_bodies.py).

A small aiohttp server of its own, bound to loopback by default and on a port no player uses
(`projectionist_metrics_port`, from PROJECTIONIST_PROXY_METRICS_PORT; 0 = off), so neither is
reachable from the player's side without configuration. Scrapes render in a thread: the cache
size gauges may read the disk.
"""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web
from mitmproxy import ctx

from projectionist.metrics import exposition
from projectionist.peer_bodies import ROUTE, PeerBodies

from .rules_watch import RulesWatcher

log = logging.getLogger(__name__)


class OpsListener:
    def __init__(self, watcher: RulesWatcher, bodies: PeerBodies | None = None) -> None:
        self.watcher = watcher
        self.bodies = bodies
        self.runner: web.AppRunner | None = None
        self.port: int | None = None  # bound port (the option may be 0 = off)
        self._starting: asyncio.Task | None = None
        self.master = None

    def load(self, loader) -> None:
        loader.add_option("projectionist_metrics_port", int, 0,
                          "Port of the proxy's /metrics and /health listener (0: none).")
        loader.add_option("projectionist_metrics_host", str, "127.0.0.1",
                          "Address of that listener (loopback: not reachable from players).")

    def running(self) -> None:
        self.master = ctx.master
        if ctx.options.projectionist_metrics_port and self.runner is None and self._starting is None:
            self._starting = asyncio.get_running_loop().create_task(
                self._start(ctx.options.projectionist_metrics_host, ctx.options.projectionist_metrics_port))

    async def _start(self, host: str, port: int) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/health", self.health)
        if self.bodies is not None and self.watcher.redis_url:  # only machines sharing a Redis ask
            app.router.add_get(ROUTE, self.bodies.serve)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        try:
            site = web.TCPSite(runner, host, port)
            await site.start()
        except OSError as exc:
            log.error("the proxy's metrics listener could not bind %s:%d: %s", host, port, exc.strerror)
            await runner.cleanup()
            return
        self.runner = runner
        self.port = site._server.sockets[0].getsockname()[1]
        if self.bodies is not None and self.watcher.redis_url:
            self.bodies.listening_at(host, self.port)  # from now on, bodies too big for Redis are indexed
        log.info("metrics and health at http://%s:%d/metrics", host, self.port)

    async def done(self) -> None:
        if self._starting is not None:
            await self._starting
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None
        if self.bodies is not None:
            await self.bodies.close()

    async def metrics(self, request: web.Request) -> web.Response:
        body, content_type = await asyncio.to_thread(exposition)
        return web.Response(body=body, headers={"Content-Type": content_type, "Cache-Control": "no-store"})

    async def health(self, request: web.Request) -> web.Response:
        """Ready: rules loaded and every listener of the proxy accepting connections."""
        servers = self.master.addons.get("proxyserver").servers
        listening = [s.mode.full_spec for s in servers if s.is_running]
        ready = self.watcher.rules is not None and bool(listening) and len(listening) == len(servers)
        return web.json_response({"status": "ok" if ready else "starting", "service": "proxy",
                                  "listeners": len(listening), "rules": self.watcher.rules is not None},
                                 status=200 if ready else 503)
