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

import logging
import math
import time
from collections import OrderedDict
from urllib.parse import urlsplit

from aiohttp import web

from .errors import ApiError, error_response
from .keys import AUTH_RATE_LIMITER, OPTIONS

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
    """This control plane's origin as the browser sees it."""
    options = request.app[OPTIONS]
    if options.public_origin:
        return options.public_origin
    host = _forwarded(request, "X-Forwarded-Host") or request.host
    return f"{'https' if is_https(request) else 'http'}://{host}"


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
