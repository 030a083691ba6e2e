"""Plumbing shared by every fake: request recording, the "down" switch, CORS and app assembly."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class RecordedRequest:
    """One request as a fake received it (before it answered)."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: CIMultiDictProxy[str]
    body: bytes
    time: float

    def param(self, name: str) -> str | None:
        """First query value of `name`, or None."""
        values = self.query.get(name)
        return values[0] if values else None


class FakeState:
    """Mutable state of one fake; subclasses add their own upstream-specific state."""

    name = "fake"

    def __init__(self) -> None:
        self.requests: list[RecordedRequest] = []
        # The control plane's `/identity` checks (its health monitor asks every 30 s, admission at
        # sign-in): kept apart, so that what a test counts in `requests` is what its clients caused
        # even while another test's stack runs against the same fakes.
        self.control_requests: list[RecordedRequest] = []
        self.down = False
        self.latency = 0.0  # seconds every answer waits: a remote server's round trips (--latency)

    def clear(self) -> None:
        self.requests.clear()
        self.control_requests.clear()


@dataclass(frozen=True)
class CorsPolicy:
    """How an upstream answers browsers: echo the Origin (Plex) or a wildcard (TMDB, Trakt, CDNs)."""

    echo_origin: bool
    allow_methods: str = "GET, POST, PUT, DELETE, OPTIONS, HEAD"
    expose_headers: str = ""
    max_age: int = 86400
    preflight_status: int = 204
    extra_preflight_headers: dict[str, str] = field(default_factory=dict)

    def headers_for(self, origin: str | None) -> dict[str, str]:
        if self.echo_origin:
            if not origin:
                return {}
            out = {"Access-Control-Allow-Origin": origin, "Vary": "Origin"}
        else:
            out = {"Access-Control-Allow-Origin": "*"}
        if self.expose_headers:
            out["Access-Control-Expose-Headers"] = self.expose_headers
        return out

    def preflight(self, request: web.Request) -> web.Response:
        headers = self.headers_for(request.headers.get("Origin"))
        headers["Access-Control-Allow-Methods"] = self.allow_methods
        asked = request.headers.get("Access-Control-Request-Headers")
        if asked:
            headers["Access-Control-Allow-Headers"] = asked
        headers["Access-Control-Max-Age"] = str(self.max_age)
        headers.update(self.extra_preflight_headers)
        return web.Response(status=self.preflight_status, headers=headers)


async def _record(request: web.Request, state: FakeState) -> None:
    query: dict[str, list[str]] = {}
    for key, value in request.query.items():
        query.setdefault(key, []).append(value)
    body = await request.read() if request.body_exists else b""
    monitor = request.path == "/identity" and request.headers.get("User-Agent", "").startswith("Projectionist-Control/")
    (state.control_requests if monitor else state.requests).append(
        RecordedRequest(
            method=request.method,
            path=request.path,
            query=query,
            headers=CIMultiDictProxy(CIMultiDict(request.headers)),
            body=body,
            time=time.time(),
        )
    )


def build_app(
    state: FakeState,
    state_key: web.AppKey,
    routes: web.RouteTableDef,
    *,
    cors: CorsPolicy,
    not_found: Callable[[web.Request], web.StreamResponse],
    default_headers: dict[str, str] | None = None,
    server: str | None = None,
) -> web.Application:
    """An aiohttp app that records every request, can play dead, answers preflights and shapes 404s.

    `not_found` renders the upstream's own 404/405 body for paths no route matches. `server` is the
    upstream's `Server` header; None sends none at all (instead of aiohttp's own).
    """

    @web.middleware
    async def fake_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        await _record(request, state)
        if state.down:
            # "Down" = the TCP connection is accepted, the request read, then the socket is closed with
            # no response at all (clients see "server disconnected"/ECONNRESET, like a crashed upstream).
            if request.transport is not None:
                request.transport.abort()
            # aiohttp drops the write quietly once the transport is gone (raising would log a traceback).
            return web.Response(status=503)
        if state.latency > 0:
            await asyncio.sleep(state.latency)
        if request.method == "OPTIONS":
            return cors.preflight(request)
        try:
            return await handler(request)
        except web.HTTPNotFound:
            return not_found(request)
        except web.HTTPMethodNotAllowed:
            return not_found(request)

    async def add_headers(request: web.Request, response: web.StreamResponse) -> None:
        for key, value in cors.headers_for(request.headers.get("Origin")).items():
            response.headers.setdefault(key, value)
        for key, value in (default_headers or {}).items():
            response.headers.setdefault(key, value)
        # aiohttp has already added its own Server header when this hook runs.
        if server is None:
            response.headers.popall("Server", None)
        else:
            response.headers["Server"] = server

    app = web.Application(middlewares=[fake_middleware])
    app[state_key] = state
    app.router.add_routes(routes)
    app.on_response_prepare.append(add_headers)
    return app


def param(request: web.Request, name: str) -> str | None:
    """A value sent either as query parameter or as header (Plex accepts every X-Plex-* both ways)."""
    value = request.query.get(name)
    if value is None:
        value = request.headers.get(name)
    return value


def bearer(request: web.Request) -> str | None:
    auth = request.headers.get("Authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip()
    return None


def int_arg(request: web.Request, name: str, default: int) -> int:
    try:
        return int(request.query.get(name, default))
    except ValueError:
        return default
