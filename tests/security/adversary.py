"""What the adversarial tests share: a catcher that records every byte it receives, raw clients
that can say anything on the wire, and a proxy routed like a real deployment.

Production-like routing: the hosts under test have no `projectionist_upstreams` override. TMDB
also answers to `localhost` (resolved by the system, as api.themoviedb.org would be), and the
Plex upstream's `base_url` is the fake Plex server: both are configuration, the way an operator
would write it. Only plex.tv (account look-ups) is sent to its fake by override.
"""

from __future__ import annotations

import asyncio
import sqlite3
import ssl
import time
from pathlib import Path

from fake_upstreams.data import (
    PLEX_ACCOUNT_TOKEN,
    PLEX_ACCOUNT_TOKEN_2,
    PLEX_SERVER_TOKEN,
    PLEX_SERVER_TOKEN_2,
    TMDB_V3_KEY,
    TMDB_V4_TOKEN,
    TRAKT_ACCESS_TOKEN,
    TRAKT_CLIENT_ID,
    TRAKT_CLIENT_SECRET,
    TRAKT_REFRESH_TOKEN,
)
from support import free_port, start_embedded_proxy

REAL_SECRETS = (PLEX_ACCOUNT_TOKEN, PLEX_ACCOUNT_TOKEN_2, PLEX_SERVER_TOKEN, PLEX_SERVER_TOKEN_2, TMDB_V3_KEY,
                TMDB_V4_TOKEN, TRAKT_CLIENT_ID, TRAKT_CLIENT_SECRET, TRAKT_ACCESS_TOKEN, TRAKT_REFRESH_TOKEN)


class Catcher:
    """A TCP listener on 127.0.0.1 that records every byte of every connection (a TLS ClientHello
    too) and answers anything that looks like an HTTP request with 200 "caught"."""

    def __init__(self) -> None:
        self.port = free_port()
        self.connections: list[bytearray] = []
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> Catcher:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        return self

    async def __aexit__(self, *exc) -> None:
        self.server.close()
        await self.server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        received = bytearray()
        self.connections.append(received)
        try:
            while chunk := await asyncio.wait_for(reader.read(65536), 5):
                received += chunk
                if b"\r\n\r\n" in received:
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\nConnection: close\r\n\r\ncaught")
                    await writer.drain()
                    break
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()

    @property
    def received(self) -> bytes:
        return b"\n".join(bytes(c) for c in self.connections)

    def assert_no_credential(self) -> None:
        for secret in REAL_SECRETS:
            assert secret.encode() not in self.received, "a real credential reached the catcher"


def production_like(fakes, extra=None):
    def edit(rules: dict) -> None:
        rules["upstreams"]["tmdb"]["hosts"].append("localhost")
        rules["upstreams"]["plex"]["base_url"] = fakes.urls["plex"]
        if extra:
            extra(rules)
    return edit


async def start_proxy(home: Path, fakes, extra=None):
    return await start_embedded_proxy(home, [f"plextv={fakes.urls['plextv']}"], production_like(fakes, extra))


def ca_context(home: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(home / "mitmproxy" / "mitmproxy-ca-cert.pem"))


async def raw_exchange(proxy_port: int, request: bytes, connect: str | None = None, sni: str | None = None,
                       ca: ssl.SSLContext | None = None, port: int | None = None) -> bytes:
    """Send `request` as written, to the proxy at `port` (default `proxy_port`): through a CONNECT
    tunnel to `connect` first if given, with TLS (SNI `sni`) inside it if `ca` is given. Returns
    everything the proxy answered to `request`."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port or proxy_port)
    try:
        if connect:
            writer.write(f"CONNECT {connect} HTTP/1.1\r\nHost: {connect}\r\n\r\n".encode())
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            assert head.startswith(b"HTTP/1.1 200"), head
        if ca is not None:
            await writer.start_tls(ca, server_hostname=sni)
        writer.write(request)
        await writer.drain()
        answer = bytearray()
        try:
            while chunk := await asyncio.wait_for(reader.read(65536), 10):
                answer += chunk
                if _complete(answer):
                    break
        except (TimeoutError, ConnectionError, ssl.SSLError):
            pass
        return bytes(answer)
    finally:
        writer.close()


def _complete(answer: bytearray) -> bool:
    head, sep, body = bytes(answer).partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value)
    return False


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/") else 0


async def usage_rows(home: Path, where: str, timeout: float = 10.0) -> list[tuple]:
    """Usage rows matching `where`, once the batched writer has written at least one."""
    deadline = time.monotonic() + timeout
    while True:
        conn = sqlite3.connect(home / "projectionist.db")
        try:
            rows = conn.execute(f"SELECT upstream, route, status FROM usage_events WHERE {where}").fetchall()
        finally:
            conn.close()
        if rows or time.monotonic() > deadline:
            return rows
        await asyncio.sleep(0.1)
