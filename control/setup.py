"""The first-run pages: `/setup` (step by step, each with a live check), `/proxy.pac` and the CA
downloads under `/ca/`. Public, and nothing here is a secret: the certificate only (never its
key), upstream addresses without user information, whether keys are set and valid (never them).

The checks a browser must make itself (does it use the proxy? does it trust the CA?) are fetches
of the probe on the reserved setup host (projectionist/onboarding.py); the page's script runs
them, the rest comes from `/api/setup`. Upstream calls are remembered for a little while, so a
public page reloaded in a loop cannot hammer TMDB or Plex.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web

from projectionist.onboarding import (CA_BASENAME, CA_DOWNLOADS, PAC_CONTENT_TYPE, PROBE_PATH, SETUP_HOST,
                                      ca_download, fingerprint, pac_file)

from projectionist.config import parse_overrides

from .openapi import documented_statuses
from .keys import CONFIG, HTTP, LIVE_RULES, OPTIONS, UPSTREAMS, VAULT
from .page import STATIC_DIR
from .security import CONTENT_SECURITY_POLICY, request_origin
from .sessions import authenticate
from .settings import sign_in_again, tmdb_bearer
from .upstream_health import check_all

log = logging.getLogger("control.setup")

routes = web.RouteTableDef()

WILDCARD_HOSTS = {"", "0.0.0.0", "::", "[::]"}
UPSTREAM_CHECK_TTL = 60.0  # TMDB and Trakt: one call per minute at most, however often the page loads
PLEX_CHECK_TTL = 3.0
SETUP_CSP = CONTENT_SECURITY_POLICY.replace(
    "connect-src 'self'", f"connect-src 'self' http://{SETUP_HOST} https://{SETUP_HOST}")
TIMEOUT = aiohttp.ClientTimeout(total=5)
_REMEMBERED = web.AppKey("setup_remembered", dict)


def advertised_host(request: web.Request) -> str:
    """The address browsers reach our listeners at: the configured host, unless that is a
    wildcard (docker, a LAN server); then the name this browser used for the control plane."""
    host = request.app[CONFIG].host
    if host in WILDCARD_HOSTS:
        return urlsplit(request_origin(request)).hostname or "127.0.0.1"
    return host


async def _remembered(app: web.Application, key: str, ttl: float, compute: Callable[[], Awaitable[dict]]) -> dict:
    cache = app[_REMEMBERED]
    hit = cache.get(key)
    now = time.monotonic()
    if hit is not None and now - hit[0] < ttl:
        return await asyncio.shield(hit[1])
    future = asyncio.ensure_future(compute())
    cache[key] = (now, future)
    return await asyncio.shield(future)


async def _read_ca(request: web.Request) -> bytes | None:
    path = request.app[CONFIG].ca_cert_path
    try:
        return await asyncio.to_thread(path.read_bytes)
    except FileNotFoundError:
        return None


def install(app: web.Application) -> None:
    app[_REMEMBERED] = {}
    app.add_routes(routes)


# --- PAC and downloads ------------------------------------------------------------------------

@routes.get("/proxy.pac")
async def proxy_pac(request: web.Request) -> web.Response:
    rules = await request.app[LIVE_RULES].get()
    overridden = parse_overrides(request.app[CONFIG].upstream_overrides)
    # The hosts the proxy intercepts: an upstream marked `intercept: when_overridden` (app.plex.tv)
    # passes through unless overridden (the demo), so the browser may as well go direct. Without
    # valid rules only the setup host is proxied (the setup page then says what is wrong).
    hosts = [host for name, up in (rules.upstreams if rules else {}).items() for host in up.hosts
             if up.intercept == "always" or name in overridden]
    proxy = f"{advertised_host(request)}:{request.app[CONFIG].proxy_port}"
    return web.Response(text=pac_file(hosts, proxy), content_type=PAC_CONTENT_TYPE,
                        headers={"Cache-Control": "no-cache"})


@routes.get("/ca/{name}")
@documented_statuses(not_found="no such download, or the proxy has not created its certificate authority yet")
async def ca_file(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    if name not in CA_DOWNLOADS:
        raise web.HTTPNotFound(text=f"no such download; there are: {', '.join(CA_DOWNLOADS)}\n")
    pem = await _read_ca(request)
    if pem is None:
        raise web.HTTPNotFound(
            text="The proxy has not created its certificate authority yet: start it (projectionist run), "
                 "then download again.\n")
    return web.Response(body=ca_download(pem, name), content_type=CA_DOWNLOADS[name],
                        headers={"Content-Disposition": f'attachment; filename="{name}"',
                                 "Cache-Control": "no-cache"})


# --- the page and its JSON ----------------------------------------------------------------------

@routes.get("/setup")
async def setup_page(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC_DIR / "setup.html",
                            headers={"Cache-Control": "no-cache", "Content-Security-Policy": SETUP_CSP})


async def _tmdb_check(app: web.Application) -> dict:
    server = app[OPTIONS].server
    if server.tmdb_read_token:
        source, kwargs = "PROJECTIONIST_TMDB_READ_TOKEN", {"headers": {"Authorization": f"Bearer {server.tmdb_read_token}"}}
    else:  # which variable set it, for the page; the value itself never leaves the server
        source = ("PROJECTIONIST_TMDB_API_KEY" if os.environ.get("PROJECTIONIST_TMDB_API_KEY")
                  else "the player's public default key")
        kwargs = {"params": {"api_key": server.tmdb_api_key}}
    url = app[UPSTREAMS].url("tmdb", "/3/configuration")
    try:
        async with app[HTTP].get(url, timeout=TIMEOUT, allow_redirects=False, **kwargs) as response:
            status = response.status
    except (aiohttp.ClientError, TimeoutError) as exc:
        return {"ok": False, "source": source,
                "detail": f"TMDB did not answer from this server ({type(exc).__name__}); check its network"}
    if status == 200:
        return {"ok": True, "source": source, "detail": f"TMDB accepts the server's key ({source})"}
    if status == 401:
        return {"ok": False, "source": source,
                "detail": f"TMDB refused the server's key ({source}): set PROJECTIONIST_TMDB_API_KEY (v3) or "
                          "PROJECTIONIST_TMDB_READ_TOKEN (v4) to a key from themoviedb.org/settings/api "
                          "and restart"}
    return {"ok": False, "source": source, "detail": f"TMDB answered HTTP {status}; try again later"}


async def _trakt_check(app: web.Application) -> dict:
    server = app[OPTIONS].server
    missing = [name for name, value in (("PROJECTIONIST_TRAKT_CLIENT_ID", server.trakt_client_id),
                                        ("PROJECTIONIST_TRAKT_CLIENT_SECRET", server.trakt_client_secret))
               if not value]
    if missing:
        return {"ok": False, "configured": False,
                "detail": f"set {' and '.join(missing)} (a Trakt app from trakt.tv/oauth/applications) and "
                          "restart; until then Trakt rows and Trakt connect do not work"}
    url = app[UPSTREAMS].url("trakt", "/movies/trending")
    headers = {"trakt-api-version": "2", "trakt-api-key": server.trakt_client_id}
    try:
        async with app[HTTP].get(url, params={"limit": "1"}, headers=headers, timeout=TIMEOUT,
                                allow_redirects=False) as response:
            status = response.status
    except (aiohttp.ClientError, TimeoutError) as exc:
        return {"ok": False, "configured": True,
                "detail": f"Trakt did not answer from this server ({type(exc).__name__})"}
    if status == 200:
        return {"ok": True, "configured": True, "detail": "Trakt accepts the server's app credentials"}
    if status in (401, 403):
        return {"ok": False, "configured": True,
                "detail": f"Trakt refused PROJECTIONIST_TRAKT_CLIENT_ID (HTTP {status}): copy the Client ID of "
                          "your app from trakt.tv/oauth/applications and restart"}
    return {"ok": False, "configured": True, "detail": f"Trakt answered HTTP {status}; try again later"}


@routes.get("/api/setup")
async def setup_status(request: web.Request) -> web.Response:
    app = request.app
    config = app[CONFIG]
    identity = await authenticate(request)
    rules = await app[LIVE_RULES].get()
    host = advertised_host(request)
    origin = request_origin(request)
    pem = await _read_ca(request)
    plex, tmdb, trakt = await asyncio.gather(
        _remembered(app, "plex", PLEX_CHECK_TTL, lambda: _plex_checks(app)),
        _remembered(app, "tmdb", UPSTREAM_CHECK_TTL, lambda: _tmdb_check(app)),
        _remembered(app, "trakt", UPSTREAM_CHECK_TTL, lambda: _trakt_check(app)))
    upstreams = rules.upstreams if rules is not None else {}
    players = [{"upstream": name, "url": up.public_url or f"http://{host}:{up.listen}"}
               for name, up in upstreams.items() if up.kind == "plex-server" and up.listen]
    return web.json_response({
        "proxy": f"{host}:{config.proxy_port}",
        "pac_url": f"{origin}/proxy.pac",
        "probe": {"http": f"http://{SETUP_HOST}{PROBE_PATH}", "https": f"https://{SETUP_HOST}{PROBE_PATH}"},
        "ca": {"ready": pem is not None, "sha256": fingerprint(pem) if pem else None,
               "downloads": {name.rsplit(".", 1)[1]: f"{origin}/ca/{name}" for name in CA_DOWNLOADS},
               "file_name": CA_BASENAME},
        "plex": plex,
        "player_urls": players,
        "tmdb": tmdb,
        "trakt": trakt,
        "rules_problem": app[LIVE_RULES].problem,
        # Only for a signed-in caller: the services whose stored token was found revoked.
        "sign_in_again": await app[VAULT].run(sign_in_again, identity.user_id) if identity else None,
        # What to type as the player's TMDB key (a surrogate of the caller's; proxy.anonymous).
        "tmdb_bearer": await app[VAULT].run(tmdb_bearer, identity.user_id) if identity else None,
    })


async def _plex_checks(app: web.Application) -> dict:
    return {name: check.as_dict() for name, check in (await check_all(app)).items()}
