"""`GET /metrics` of the control plane (Prometheus text; projectionist/metrics.py has the metrics).

The control plane is what browsers reach, so the metrics answer only a scraper on this host (a
loopback peer, not relayed by a reverse proxy) or one presenting `PROJECTIONIST_METRICS_TOKEN` as a
bearer token; anyone else gets a 404, as if there were nothing here.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import os

from aiohttp import web

from projectionist.metrics import CONTROL_REQUESTS, JOB_RUNS, JOB_SECONDS, exposition
from projectionist.redact import RedactSecrets

TOKEN_ENV = "PROJECTIONIST_METRICS_TOKEN"

routes = web.RouteTableDef()


def _local_scraper(request: web.Request) -> bool:
    if any(h in request.headers for h in ("X-Forwarded-For", "Forwarded", "X-Real-IP")):
        return False  # relayed: the peer is a reverse proxy, the client is elsewhere
    peer = request.transport.get_extra_info("peername") if request.transport else None
    try:
        return bool(peer) and ipaddress.ip_address(peer[0]).is_loopback
    except ValueError:
        return False


def _token_ok(request: web.Request) -> bool:
    token = os.environ.get(TOKEN_ENV, "")
    presented = request.headers.get("Authorization", "")
    return bool(token) and hmac.compare_digest(presented.encode(), f"Bearer {token}".encode())


@routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    if not (_local_scraper(request) or _token_ok(request)):
        raise web.HTTPNotFound()
    body, content_type = await asyncio.to_thread(exposition)
    return web.Response(body=body, headers={"Content-Type": content_type, "Cache-Control": "no-store"})


def count_request(request: web.Request, status: int) -> None:
    """Per route template (low cardinality: never the raw path)."""
    info = request.match_info.route.resource if request.match_info.route else None
    CONTROL_REQUESTS.labels(info.canonical if info is not None else "(unmatched)", str(status)).inc()


def count_job(job: str, status: str, seconds: float) -> None:
    JOB_RUNS.labels(job, status).inc()
    JOB_SECONDS.labels(job).observe(seconds)


RedactSecrets.register(os.environ.get(TOKEN_ENV))
