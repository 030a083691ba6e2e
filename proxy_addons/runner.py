"""Runs the proxy: an embedded mitmproxy `Master` with a minimal addon set plus ours.

mitmdump's ~35 default addons cost about two thirds of its CPU per request (see
shared/platform-notes.md), so the product embeds a `Master` with only what it needs. The same
addons load into a stock mitmdump too: `mitmdump -s proxy_addons/script.py --set ...`.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from dataclasses import dataclass, field

from mitmproxy import options
from mitmproxy.addons import block, core, next_layer, proxyserver, tlsconfig
from mitmproxy.master import Master
from mitmproxy.proxy import mode_servers

from projectionist.config import Config, parse_overrides
from projectionist.peer_bodies import PeerBodies
from projectionist.rules import load_rules

from .binding import Redirects
from .cache_warmer import CacheWarmer
from .credentials import CredentialStore
from .dispatch import choose_dispatch
from .image_cache import ImageCache
from .in_flight import InFlight
from .ops_listener import OpsListener
from .peers import Peers
from .plex_tokens import PlexTokens
from .rate_limit import RateLimit
from .response_cache import ResponseCache
from .setup_host import SetupHost
from .router import Listeners, Router, listener_modes
from .rules_watch import RulesWatcher
from .body_limit import RequestBodyLimit
from .streaming import LargeBodies
from .header_timeouts import HeaderTimeouts
from .timed_forward import TimedForward
from .tmdb_key import TmdbKey
from .trakt_credentials import TraktCredentials
from .usage import UsageRecorder
from .viewing_history import ViewingHistory

log = logging.getLogger(__name__)


def projectionist_addons() -> list:
    """Our addons, in hook order: classify first, then credentials, then the cache (which must see
    real credentials and rewritten answers), record last.

    Rate limits: `RateLimit` comes after the credentials (it keys on user and credential kind) and
    after the caches, so hits never reach it; the caches' own fetches go through it as their
    `upstream_gate`. Its `UpstreamRetry` half comes before the credential addons, so that an
    answer fetched again after an upstream 429/503 is rewritten like any other, and before
    `Redirects`, which takes injected credentials out of every redirect's Location.

    `TimedForward` comes after everything that may answer or hold a request: what reaches it is
    fetched with the route's timeouts instead of mitmproxy's untimed forwarding; `HeaderTimeouts`,
    right after it, gives what is left to mitmproxy (streamed routes, requests to no route) its
    connect and first-byte timeouts. `InFlight` comes last: a stop waits for the requests it counts."""
    watcher = RulesWatcher()
    router = Router(watcher)
    store = CredentialStore()
    # With Redis, bodies too big to share are fetched from the process that holds them, through
    # its operations listener, signed with the vault's key.
    bodies = PeerBodies(store.signatures)
    cache = ResponseCache(watcher)
    cache.plex_connections = router.plex_connections
    warmer = CacheWarmer(watcher, cache)  # the cache calls it (flush target "warm"); it sees sign-ins
    images = ImageCache(watcher, router)
    cache.bodies = images.bodies = bodies
    peers = router.peers = Peers(watcher, router, store)  # with Redis: what other processes learned
    limiter = RateLimit(watcher, cache, images)
    return [watcher, SetupHost(), router, Listeners(watcher, router), RequestBodyLimit(watcher), store, limiter.retry, Redirects(),
            PlexTokens(store, watcher, router, peers), peers,
            TmdbKey(store, watcher), TraktCredentials(store, watcher), cache, images, limiter,
            LargeBodies(watcher), TimedForward(watcher), HeaderTimeouts(watcher), warmer,
            UsageRecorder(watcher), ViewingHistory(watcher), OpsListener(watcher, bodies), InFlight()]


def mitmproxy_addons() -> list:
    """The part of mitmproxy's default set a proxy needs (block keeps public clients out)."""
    return [core.Core(), block.Block(), proxyserver.Proxyserver(), next_layer.NextLayer(),
            tlsconfig.TlsConfig()]


@dataclass
class EmbeddedProxy:
    """Starts and stops the proxy inside the current event loop (used by the CLI and the tests)."""

    config: Config
    share_ports: bool = False  # a worker: bind with SO_REUSEPORT, beside the other workers
    metrics_port: int | None = None  # None: the config's
    master: Master | None = None
    _task: asyncio.Task | None = None
    fast_dispatch: bool = False  # dispatch.choose_dispatch's verdict
    addons: list = field(default_factory=list)

    async def start(self, timeout: float = 15.0) -> EmbeddedProxy:
        cfg = self.config
        cfg.ensure_dirs()
        rules = load_rules(cfg.rules_path)  # fail before binding anything
        if self.share_ports:
            share_listening_ports()
        overrides = parse_overrides(cfg.upstream_overrides)
        opts = options.Options()
        self.master = Master(opts, event_loop=asyncio.get_running_loop())
        self.fast_dispatch = choose_dispatch(self.master)  # before any addon is added
        self.addons = projectionist_addons()
        self.master.addons.add(*mitmproxy_addons(), *self.addons)
        opts.update(
            confdir=str(cfg.mitmproxy_confdir),
            listen_host=cfg.host,
            mode=listener_modes(rules, cfg.proxy_port, overrides),
            # Lazy: connect upstream only when a request needs it, so an addon can answer even
            # when the upstream is dead.
            connection_strategy="lazy",
            projectionist_rules=str(cfg.rules_path),
            projectionist_db=str(cfg.db_path),
            projectionist_home=str(cfg.home),
            projectionist_upstreams=list(cfg.upstream_overrides),
            projectionist_proxy_port=cfg.proxy_port,
            projectionist_manage_listeners=True,
            projectionist_metrics_port=cfg.proxy_metrics_port if self.metrics_port is None else self.metrics_port,
            projectionist_metrics_host=cfg.proxy_metrics_host,
        )
        self._task = asyncio.create_task(self.master.run(), name="mitmproxy-master")
        try:
            await self._wait_listening(len(opts.mode), timeout)
        except BaseException:
            with contextlib.suppress(Exception):
                await self.stop()  # release whatever did bind, so a retry (or the caller) starts clean
            raise
        return self

    async def _wait_listening(self, expected: int, timeout: float) -> None:
        ps = self.master.addons.get("proxyserver")
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            if self._task.done():
                self._task.result()  # re-raise start-up errors
                raise RuntimeError("mitmproxy stopped during start-up")
            running = [s for s in ps.servers if s.is_running]
            if len(running) >= expected and not ps.servers.is_updating:
                return
            failed = [s for s in ps.servers if s.last_exception is not None]
            if failed and not ps.servers.is_updating:
                # Fail now, with the cause (say EADDRINUSE), rather than at the timeout.
                raise failed[0].last_exception
            if asyncio.get_running_loop().time() > deadline:
                raise RuntimeError(f"proxy listeners did not start: {[s.mode.full_spec for s in ps.servers]}")
            await asyncio.sleep(0.02)

    @property
    def ports(self) -> dict[str, int]:
        """Bound port per mode: {"regular": 8080, "reverse:http://...": 32401, ...}."""
        ps = self.master.addons.get("proxyserver")
        out = {}
        for server in ps.servers:
            key = "regular" if server.mode.type_name == "regular" else server.mode.full_spec.rsplit("@", 1)[0]
            out[key] = server.listen_addrs[0][1]
        return out

    @property
    def rules_watcher(self) -> RulesWatcher:
        return self.addons[0]

    async def stop(self) -> None:
        if self.master is None:
            return
        ps = self.master.addons.get("proxyserver")
        await ps.servers.update([])  # else the ports stay open after shutdown
        # The requests under way finish before `done` closes what they use (the vault, the caches).
        await next(a for a in self.addons if isinstance(a, InFlight)).drained()
        self.master.shutdown()
        if self._task is not None:
            await self._task
        self.master = None


def share_listening_ports() -> None:
    """Every TCP listener of this process binds with SO_REUSEPORT, so that the workers of one proxy
    (launcher/workers.py) listen on the same ports and the kernel spreads connections over them.
    mitmproxy binds with a plain `asyncio.start_server`; its `listen` is replaced for TCP modes on a
    fixed port (port 0 would give each worker a port of its own)."""
    base = mode_servers.AsyncioServerInstance
    if getattr(base.listen, "shares_ports", False):
        return
    original = base.listen

    async def listen(self, host: str, port: int):
        if self.mode.transport_protocol != "tcp" or port == 0:
            return await original(self, host, port)
        return [await asyncio.start_server(self.handle_stream, host, port, reuse_port=True)]

    listen.shares_ports = True
    base.listen = listen


async def serve(config: Config, share_ports: bool = False, metrics_port: int | None = None) -> None:
    """Run the proxy until SIGINT/SIGTERM (as one of several workers with `share_ports`)."""
    import signal

    proxy = await EmbeddedProxy(config, share_ports=share_ports, metrics_port=metrics_port).start()
    # Start-up garbage is long-lived; freezing it keeps the cyclic GC off the request path.
    gc.freeze()
    # 5,000: bench/images measured 12-30 ms young-generation pauses at 50,000 setting the p99.
    gc.set_threshold(5_000, 50, 100)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    log.info("proxy listening: %s; trust %s", proxy.ports, config.ca_cert_path)
    await stop.wait()
    await proxy.stop()
