"""Fetching a flow's request from its upstream ourselves, beside mitmproxy's own forwarding: the
response cache's misses and refreshes, and the rate limiter's retries of forwarded flows.

Bodies stay encoded as received (no decompression), no cookies are kept between requests, no
redirect is followed (the client sees it, as it would through mitmproxy), and hop-by-hop headers
are dropped both ways; the answer carries its own Content-Length.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import aiohttp
from mitmproxy import http

from projectionist.rules import ResolvedTimeouts

from .binding import PlexDirectResolver

HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer",
                        "upgrade", "host", "content-length"})


@dataclass(frozen=True, slots=True)
class Fetched:
    """An upstream answer, as the followers of a collapsed miss also receive it."""

    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes
    reason: bytes = b""

    def header(self, name: bytes) -> str | None:
        """The first value of the header `name` (lower case), decoded as Latin-1."""
        return next((v.decode("latin-1") for k, v in self.headers if k.lower() == name), None)

    def to_response(self) -> http.Response:
        response = http.Response(b"HTTP/1.1", self.status, self.reason, http.Headers(self.headers), None, None,
                                 time.time(), time.time())
        response.raw_content = self.body
        return response


def upstream_session(auto_decompress: bool = False) -> aiohttp.ClientSession:
    """No cookie jar, at most 100 connections; bodies as received unless `auto_decompress` (the
    image cache decodes what it fetches); `*.plex.direct` names reach their embedded IP."""
    return aiohttp.ClientSession(auto_decompress=auto_decompress, cookie_jar=aiohttp.DummyCookieJar(),
                                 connector=aiohttp.TCPConnector(limit=100, resolver=PlexDirectResolver()))


class ResponseTooLarge(aiohttp.ClientError):
    """The answer's body went past the size the caller buffers."""


async def fetch(session: aiohttp.ClientSession, request: http.Request, timeouts: ResolvedTimeouts | float,
                max_bytes: int | None = None) -> Fetched:
    """Connect, first-byte and idle timeouts raise TimeoutError (a float is all three). aiohttp's
    sock_read times the first byte; it also applies to every body read, so a gap in the body may
    last min(idle, first_byte)."""
    if not isinstance(timeouts, ResolvedTimeouts):
        timeouts = ResolvedTimeouts(timeouts, timeouts, timeouts)
    headers = [(k, v) for k, v in request.headers.items(multi=True) if k.lower() not in HOP_BY_HOP]
    async with asyncio.timeout(timeouts.until_headers):  # also bounds a slow upload of the request
        r = await session.request(request.method, request.url, headers=headers, allow_redirects=False,
                                  data=request.raw_content or None,
                                  timeout=aiohttp.ClientTimeout(total=None, sock_connect=timeouts.connect,
                                                                sock_read=timeouts.first_byte))
    try:
        body = bytearray()
        while True:
            async with asyncio.timeout(timeouts.idle):
                chunk = await r.content.readany()
            if not chunk:
                break
            body += chunk
            if max_bytes is not None and len(body) > max_bytes:
                raise ResponseTooLarge(f"answer over {max_bytes} bytes")
    finally:
        r.release()
    fields = [(k, v) for k, v in r.raw_headers if k.lower().decode() not in HOP_BY_HOP]
    fields.append((b"content-length", str(len(body)).encode()))
    return Fetched(r.status, fields, bytes(body), r.reason.encode() if r.reason else b"")
