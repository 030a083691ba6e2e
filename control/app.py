"""The control plane: an aiohttp app that owns identity, settings and administration.

`/health` (degraded while a Plex server does not answer: upstream_health.py), the first-run page
`/setup` with `/proxy.pac` and the CA downloads (setup.py), the settings page (`/`), and the JSON
API under `/api/`: sign-in and sessions
(auth.py), Trakt (trakt.py), per-user settings and the localStorage import (settings.py), usage
(usage.py), administration (admin.py; its pages under `/admin`: admin_ui.py), the response cache (cache_api.py), and the OpenAPI
document of all of it (openapi.py). Each module brings its route table; this factory wires them
with the security middlewares (security.py) and the resources they share, opened and closed by
cleanup contexts: the read connection to the store, the vault's worker thread, the HTTP client, and
the job scheduler (jobs.py; `GET /api/jobs`).
"""

from __future__ import annotations

import asyncio
import logging
import platform
import sqlite3
import time
from collections.abc import AsyncIterator
from importlib.metadata import version

import aiohttp
from aiohttp import web

from projectionist.config import Config
from projectionist.event_stream import EventConsumer
from projectionist.redact import RedactSecrets
from projectionist.shared_tier import redis_url
from projectionist.store import connect, migrate, schema_version

from . import admin, admin_ui, auth, cache_api, jobs, metrics, openapi, page, security, settings, setup, trakt, upstream_health, usage
from . import history, library, maintenance, recommendations, reports, token_health, warming, watchlist  # noqa: F401  (they register jobs)
from .errors import ApiError
from .keys import (AUTH_RATE_LIMITER, CONFIG, DB, DB_LOCK, HTTP, LIVE_RULES, OPERATIONS, OPTIONS, PLEX_CLIENT_ID,
                   UPSTREAM_HEALTH, UPSTREAMS, VAULT)
from .live_rules import LiveRules
from .options import ControlOptions
from .upstreams import Upstreams
from .vault_executor import VaultExecutor

log = logging.getLogger("control")

__all__ = ["CONFIG", "DB", "DB_LOCK", "create_app", "serve"]

routes = web.RouteTableDef()


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "sqlite": sqlite3.sqlite_version}
    for dist in ("projectionist", "aiohttp", "mitmproxy", "datasette"):
        try:
            out[dist] = version(dist)
        except Exception:  # not installed in this environment
            out[dist] = "absent"
    return out


VERSIONS = _versions()
CONTROL_USER_AGENT = f"Projectionist-Control/{VERSIONS['projectionist']}"


@routes.get("/health")
async def health(request: web.Request) -> web.Response:
    """Liveness plus a real round trip to the database, and whether each Plex server answers.

    An unreachable Plex server makes the status `degraded` (HTTP 200: this service works and
    serves the setup page that explains it); a database failure is a 503."""
    app = request.app
    started = time.perf_counter()
    try:
        async with app[DB_LOCK]:
            schema = await asyncio.to_thread(schema_version, app[DB])
        db = {"ok": True, "schema_version": schema,
              "latency_ms": round((time.perf_counter() - started) * 1000, 2)}
    except sqlite3.Error as exc:
        log.error("health: database check failed: %s", exc)
        db = {"ok": False, "error": "database unavailable"}
    health = app[UPSTREAM_HEALTH]
    failing = health.failing()
    status = "ok" if db["ok"] and not failing else "degraded"
    return web.json_response({"status": status, "service": "control", "db": db,
                              "upstreams": {name: c.as_dict() for name, c in health.checks.items()},
                              "upstreams_checked": health.checked, "failing": failing,
                              "setup": "/setup", "versions": VERSIONS},
                             status=200 if db["ok"] else 503)


@web.middleware
async def access_log(request: web.Request, handler) -> web.StreamResponse:
    """One structured line per request; the path only (queries may carry secrets)."""
    started = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except (web.HTTPException, ApiError) as exc:  # answered by json_errors, outside this middleware
        status = exc.status
        raise
    finally:
        metrics.count_request(request, status)
        log.info("request", extra={"fields": {
            "method": request.method, "path": request.path, "status": status,
            "ms": round((time.perf_counter() - started) * 1000, 2),
        }})


def create_app(config: Config, options: ControlOptions | None = None) -> web.Application:
    options = options or ControlOptions.from_env()
    for secret in (options.server.trakt_client_secret, options.server.tmdb_read_token):
        RedactSecrets.register(secret)  # logs never show them, even by mistake
    app = web.Application(middlewares=[security.json_errors, access_log, security.same_origin_writes,
                                       security.auth_rate_limit], client_max_size=openapi.MAX_BODY_BYTES)
    app[CONFIG] = config
    app[OPTIONS] = options
    app[DB_LOCK] = asyncio.Lock()
    app[UPSTREAMS] = Upstreams(config.upstream_overrides)
    app[LIVE_RULES] = LiveRules(config.rules_path)
    app[AUTH_RATE_LIMITER] = security.RateLimiter(*options.auth_rate)
    app[VAULT] = VaultExecutor(config.db_path, config.home)
    app[OPERATIONS] = []
    app[trakt.REFRESH_LOCKS] = {}
    app.add_routes(routes)
    app.add_routes(page.routes)
    app.add_routes(admin_ui.pages)
    setup.install(app)
    app.add_routes(openapi.routes)
    app.add_routes(metrics.routes)
    openapi.register(app, auth.api, settings.api, usage.api, admin.api, trakt.api, jobs.api, recommendations.api,
                     admin_ui.api)
    if isinstance(getattr(cache_api, "api", None), openapi.Api):  # documented from its models too
        openapi.register(app, cache_api.api)
    else:
        app.add_routes(cache_api.routes)
    app.on_response_prepare.append(security.security_headers)

    async def database(app: web.Application) -> AsyncIterator[None]:
        config.ensure_dirs()
        conn = await asyncio.to_thread(connect, config.db_path)
        await asyncio.to_thread(migrate, conn)
        app[DB] = conn
        yield
        conn.close()

    async def vault(app: web.Application) -> AsyncIterator[None]:
        await app[VAULT].start()
        app[PLEX_CLIENT_ID] = await app[VAULT].run(auth.plex_client_identifier)
        yield
        await app[VAULT].close()

    async def http_client(app: web.Application) -> AsyncIterator[None]:
        # trust_env=False: the control plane talks to upstreams directly, never through a system proxy
        # (which could be our own mitmproxy).
        # Every call that carries a credential passes allow_redirects=False: aiohttp drops only
        # Authorization on a redirect to another host, so X-Plex-Token and trakt-api-key would follow.
        # The User-Agent names us in the upstreams' logs (and lets tests tell the health checks apart).
        async with aiohttp.ClientSession(trust_env=False, timeout=aiohttp.ClientTimeout(total=15),
                                         headers={"User-Agent": CONTROL_USER_AGENT}) as session:
            app[HTTP] = session
            yield

    async def proxy_events(app: web.Application) -> AsyncIterator[None]:
        """With proxy.redis_url, the proxies' usage, play and rate-limit events come through Redis
        and this control plane commits them (projectionist/event_stream.py)."""
        live = await app[LIVE_RULES].get()
        url = redis_url(live.model.proxy.redis_url if live is not None else None)
        consumer = EventConsumer(config.db_path, url).start() if url else None
        yield
        if consumer is not None:
            await asyncio.to_thread(consumer.close)

    # The scheduler starts last (its jobs use the others) and stops first. The jobs are those of
    # control/jobs.py's registry: maintenance and trakt (imported above) register theirs.
    app.cleanup_ctx.extend([database, vault, http_client, proxy_events, upstream_health.monitor,
                            jobs.scheduler_context])
    return app


def serve(config: Config) -> None:
    # access_log=None: our middleware writes the structured access line instead.
    web.run_app(create_app(config), host=config.host, port=config.control_port,
                access_log=None, print=lambda msg: log.info(msg))
