"""Request bodies over the route's limit (rules.py `Match.max_body`) are refused before they are read.

mitmproxy reads a whole request body into memory before the `request` hook, and an answer set in
`requestheaders` is only sent once that body has been read (issue 16: one 100 MB POST raised RSS
by 95-197 MB). Its own `body_size_limit` is global and also kills big responses (media parts).

- `Content-Length` over the limit: refused from the headers. The body is streamed through a
  function that drops every chunk, to a refusal listener inside this process that answers 413 in
  the upstream's format as soon as it has the request head, and closes (nginx's
  client_max_body_size). Nothing reaches the upstream.
- Chunked (no length): streamed to the upstream through a counting function that cuts the
  stream off at the limit: both connections are aborted, so the upstream sees an incomplete
  request (never a truncated one that looks whole) and the client a reset.
"""

from __future__ import annotations

import asyncio
import logging
import secrets

from mitmproxy import ctx, http
from mitmproxy.net.http import http1

from . import flowinfo
from .header_lookup import header
from .local_responses import cors_headers
from .rules_watch import RulesWatcher

log = logging.getLogger(__name__)

_TOKEN_HEADER = "x-projectionist-refusal"


class RequestBodyLimit:
    def __init__(self, watcher: RulesWatcher) -> None:
        self.watcher = watcher
        self.refusals: dict[str, bytes] = {}  # token -> the whole answer, for the refusal listener
        self.server: asyncio.Server | None = None
        self.port: int | None = None

    async def running(self) -> None:
        self.server = await asyncio.start_server(self._answer, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def done(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        info = flowinfo.get(flow)
        rules = self.watcher.rules
        if info is None or rules is None or flow.response is not None or self.port is None:
            return
        request = flow.request
        limit = info.match.max_body(rules.model.proxy)
        length = header(request.headers, b"content-length")
        if length is not None and length.strip().isdigit():
            if int(length) > limit:
                self._refuse(flow, info, limit, int(length))
            return
        if "chunked" in (header(request.headers, b"transfer-encoding") or "").lower():
            request.stream = _cut_off_at(flow, limit, info.route)

    def _refuse(self, flow: http.HTTPFlow, info, limit: int, length: int) -> None:
        log.info("%s: request body of %d bytes refused (limit %d)", info.route, length, limit)
        body = f"Payload Too Large: the request body may be {limit} bytes at most\n".encode()
        response = http.Response.make(413, body, {"Content-Type": "text/plain; charset=utf-8", "Connection": "close",
                                                  **cors_headers(flow.request, info.match.upstream.kind)})
        token = secrets.token_hex(16)
        self.refusals[token] = http1.assemble_response(response)
        request = flow.request
        request.headers[_TOKEN_HEADER] = token
        request.scheme, request.host, request.port = "http", "127.0.0.1", self.port
        request.stream = _drop
        info.refused = "body-too-large"

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            token = next((line.split(b":", 1)[1].strip().decode() for line in head.split(b"\r\n")
                          if line.lower().startswith(_TOKEN_HEADER.encode() + b":")), "")
            answer = self.refusals.pop(token, None)
            if answer is not None:
                writer.write(answer)
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
            pass
        finally:
            writer.close()


def _drop(_chunk: bytes) -> bytes:
    return b""


def _cut_off_at(flow: http.HTTPFlow, limit: int, route: str):
    seen = 0

    def count(chunk: bytes) -> bytes:
        nonlocal seen
        seen += len(chunk)
        if seen > limit:
            if seen - len(chunk) <= limit:  # the first chunk over it
                log.info("%s: chunked request body over %d bytes cut off", route, limit)
                _abort_connections(flow)
            return b""
        return chunk

    return count


def _abort_connections(flow: http.HTTPFlow) -> None:
    """Drop the flow's client and server connections at once (mitmproxy's connection handler,
    looked up as its `inject` commands do)."""
    handler = ctx.master.addons.get("proxyserver").connections.get(flow.client_conn.id)
    if handler is None:
        return
    for io in list(handler.transports.values()):
        transport = getattr(io.writer, "transport", None)
        if transport is not None:
            transport.abort()
