"""The control plane: an aiohttp app that owns identity, settings and administration.

This skeleton serves `/health`; the auth, settings, cache and admin APIs plug into the same
factory as route tables of their own modules.
"""

from __future__ import annotations

import asyncio
import logging
import platform
import sqlite3
import time
from collections.abc import AsyncIterator
from importlib.metadata import version

from aiohttp import web

from projectionist.config import Config
from projectionist.store import connect, migrate, schema_version

log = logging.getLogger("control")

CONFIG = web.AppKey("config", Config)
DB = web.AppKey("db", sqlite3.Connection)
DB_LOCK = web.AppKey("db_lock", asyncio.Lock)

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


@routes.get("/health")
async def health(request: web.Request) -> web.Response:
    """Liveness plus a real round trip to the database."""
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
    status = "ok" if db["ok"] else "degraded"
    return web.json_response({"status": status, "service": "control", "db": db, "versions": VERSIONS},
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
    except web.HTTPException as exc:
        status = exc.status
        raise
    finally:
        log.info("request", extra={"fields": {
            "method": request.method, "path": request.path, "status": status,
            "ms": round((time.perf_counter() - started) * 1000, 2),
        }})


def create_app(config: Config) -> web.Application:
    app = web.Application(middlewares=[access_log])
    app[CONFIG] = config
    app[DB_LOCK] = asyncio.Lock()
    app.add_routes(routes)

    async def database(app: web.Application) -> AsyncIterator[None]:
        config.ensure_dirs()
        conn = await asyncio.to_thread(connect, config.db_path)
        await asyncio.to_thread(migrate, conn)
        app[DB] = conn
        yield
        conn.close()

    app.cleanup_ctx.append(database)
    return app


def serve(config: Config) -> None:
    # access_log=None: our middleware writes the structured access line instead.
    web.run_app(create_app(config), host=config.host, port=config.control_port,
                access_log=None, print=lambda msg: log.info(msg))
