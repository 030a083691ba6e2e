"""Defences every response of the control plane gets.

- `json_errors`: API errors (and aiohttp's 404/405, and any crash) as JSON without internals.
- `same_origin_writes`: a POST/PUT/PATCH/DELETE from another origin is refused (strict Origin check,
  plus Fetch Metadata); routes that act for a session also require its CSRF token (openapi.py).
- `auth_rate_limit`: a token bucket per client IP on the sign-in endpoints, which call plex.tv and
  Trakt under the server's own client identity (hammering them would get the server throttled).
- `security_headers`: CSP, frame-ancestors, nosniff, Referrer-Policy (the sign-in callback URL
  carries a PIN id), and no caching of API answers.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import math
import socket
import time
from collections import OrderedDict
from urllib.parse import urlsplit

from aiohttp import web
from yarl import URL

from .errors import ApiError, error_response
from .keys import AUTH_RATE_LIMITER, CONFIG, OPTIONS

log = logging.getLogger("control.security")

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
RATE_LIMITED_PREFIXES = ("/api/auth/plex", "/api/trakt/device")

CONTENT_SECURITY_POLICY = "; ".join([
    "default-src 'none'",
    "script-src 'self'",
    "style-src 'self'",
    "img-src 'self' data: https:",  # Plex avatars come from plex.tv
    "connect-src 'self'",
    "form-action 'self'",
    "base-uri 'none'",
    "frame-ancestors 'none'",
])
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=(), payment=()",
}


# --- where a request comes from -----------------------------------------------------------------

def _forwarded(request: web.Request, name: str) -> str | None:
    if not request.app[OPTIONS].trust_forwarded:
        return None
    value = request.headers.get(name, "")
    return value.split(",")[0].strip() or None


def is_https(request: web.Request) -> bool:
    options = request.app[OPTIONS]
    if options.public_origin:
        return options.public_origin.startswith("https://")
    return request.secure or _forwarded(request, "X-Forwarded-Proto") == "https"


def request_origin(request: web.Request) -> str:
    """The origin this request was made to (for same-origin checks: an Origin must agree with
    it; a browser cannot forge both). Never put it in a URL handed to a browser: `browser_origin`."""
    options = request.app[OPTIONS]
    if options.public_origin:
        return options.public_origin
    host = _forwarded(request, "X-Forwarded-Host") or request.host
    return f"{'https' if is_https(request) else 'http'}://{host}"


def browser_origin(request: web.Request) -> str:
    """The origin for URLs this control plane hands out (sign-in forwardUrl, links): from
    configuration, never from what a client wrote in Host. `PROJECTIONIST_CONTROL_URL` when set,
    else the forwarded host behind a trusted front proxy, else the Host header only when it names
    this machine at the listener's port (so http://localhost:3001 keeps its cookies), else the
    listener's own address."""
    options = request.app[OPTIONS]
    if options.public_origin:
        return options.public_origin
    scheme = "https" if is_https(request) else "http"
    forwarded = _forwarded(request, "X-Forwarded-Host")
    if forwarded:
        return f"{scheme}://{forwarded}"
    config = request.app[CONFIG]
    try:
        claimed = URL(f"{scheme}://{request.host}")
        host, port = claimed.host or "", claimed.port
    except ValueError:
        host, port = "", None
    if host and port == config.control_port and _names_this_machine(host, config.host):
        return f"{scheme}://{request.host}"
    listen = "localhost" if config.host in WILDCARD_HOSTS else config.host
    return f"{scheme}://{_bracket(listen)}:{config.control_port}"


WILDCARD_HOSTS = frozenset({"0.0.0.0", "::", ""})
LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost"})


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host


@functools.lru_cache(maxsize=256)
def _names_this_machine(host: str, listen_host: str) -> bool:
    """Is `host` the listener itself, or (for a loopback or wildcard listener) this machine?"""
    host = host.strip("[]").lower().rstrip(".")
    if host == listen_host.lower():
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        address = None
    if host in LOOPBACK_NAMES or (address is not None and address.is_loopback):
        return listen_host in WILDCARD_HOSTS or _is_loopback(listen_host)
    if listen_host not in WILDCARD_HOSTS:
        return False
    # A wildcard listener answers on every address of this machine: its names and its addresses.
    names = {socket.gethostname().lower(), socket.getfqdn().lower()}
    if host in names:
        return True
    try:
        own = {info[4][0] for name in names for info in socket.getaddrinfo(name, None)}
    except OSError:
        own = set()
    return address is not None and str(address) in own


def _is_loopback(host: str) -> bool:
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def client_ip(request: web.Request) -> str:
    return _forwarded(request, "X-Forwarded-For") or request.remote or "unknown"


def _same_origin(origin: str, expected: str) -> bool:
    try:
        a, b = urlsplit(origin.lower()), urlsplit(expected.lower())
    except ValueError:
        return False
    default = {"http": 80, "https": 443}
    return (a.scheme == b.scheme and a.hostname == b.hostname
            and (a.port or default.get(a.scheme)) == (b.port or default.get(b.scheme)))


# --- rate limiting ------------------------------------------------------------------------------

class RateLimiter:
    """Token buckets per key: `capacity` requests at once, refilled at capacity/period per second."""

    def __init__(self, capacity: int, period: float, max_keys: int = 10_000) -> None:
        self.capacity = capacity
        self.rate = capacity / period
        self.max_keys = max_keys
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # key -> (tokens, stamp)

    def take(self, key: str, now: float | None = None) -> float:
        """0 when allowed (a token is spent), else the seconds until the next token."""
        now = time.monotonic() if now is None else now
        tokens, stamp = self._buckets.pop(key, (float(self.capacity), now))
        tokens = min(float(self.capacity), tokens + (now - stamp) * self.rate)
        if tokens >= 1:
            self._buckets[key] = (tokens - 1, now)
            wait = 0.0
        else:
            self._buckets[key] = (tokens, now)
            wait = (1 - tokens) / self.rate
        while len(self._buckets) > self.max_keys:  # the least recently seen clients go first
            self._buckets.popitem(last=False)
        return wait


# --- middlewares --------------------------------------------------------------------------------

@web.middleware
async def json_errors(request: web.Request, handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as exc:
        return exc.response()
    except web.HTTPException as exc:
        if not request.path.startswith("/api/") or exc.status < 400:
            raise
        headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        code = exc.reason.lower().replace(" ", "_")
        return error_response(exc.status, code, exc.reason, headers=headers)
    except Exception:
        # The log filter redacts credentials; the client learns nothing about internals.
        log.exception("unhandled error in %s %s", request.method, request.path)
        return error_response(500, "internal_error", "something went wrong on the server")


@web.middleware
async def same_origin_writes(request: web.Request, handler) -> web.StreamResponse:
    if request.method not in SAFE_METHODS:
        origin = request.headers.get("Origin")
        if request.headers.get("Sec-Fetch-Site") == "cross-site" or (
                origin is not None and not _same_origin(origin, request_origin(request))):
            raise ApiError(403, "cross_origin_request", "requests that change state must come from this site")
    return await handler(request)


@web.middleware
async def auth_rate_limit(request: web.Request, handler) -> web.StreamResponse:
    if request.path.startswith(RATE_LIMITED_PREFIXES):
        wait = request.app[AUTH_RATE_LIMITER].take(client_ip(request))
        if wait > 0:
            raise ApiError(429, "rate_limited", "too many sign-in requests from this address; slow down",
                           headers={"Retry-After": str(max(1, math.ceil(wait)))})
    return await handler(request)


async def security_headers(request: web.Request, response: web.StreamResponse) -> None:
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    if is_https(request):
        response.headers.setdefault("Strict-Transport-Security", "max-age=31536000")
    if request.path.startswith("/api/"):
        response.headers.setdefault("Cache-Control", "no-store")
