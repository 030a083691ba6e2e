"""Bodies too big for Redis: kept where they were fetched, and fetched from there by other machines.

With a shared tier (projectionist/shared_tier.py), an entry over `cache.shared_max_body_bytes` is
not copied into Redis, where it would crowd out thousands of small ones. Only its *index record*
goes there: the entry's metadata, the body's size and SHA-256, and its holder. The holder is the
URL of the operations listener (proxy_addons/ops_listener.py) of the process that stored it.
A process of another machine that misses such a key asks the holder for the body
(`GET <holder>/peer/v1/<tier>/<key>`). It checks the size and the digest, then stores the entry
like any shared one. The holder answers from its own layers (memory, then disk). A holder that is
gone, or no longer has the entry, is a miss as before: the upstream is asked. (The workers of one
machine share the disk layer already; this is for the other machines.)

Requests are signed: an HMAC-SHA256 of the holder, the path and an expiry under the vault's key
(a signed request is good at that holder only, whoever else it is shown to), which the
machines of one deployment share already (they decrypt each other's transcode-session tokens);
any of the vault's current keys verifies, so a key rotation does not break the exchange.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable

import aiohttp
from aiohttp import web

log = logging.getLogger(__name__)

PEER_HOST_ENV = "PROJECTIONIST_PEER_HOST"
PATH_PREFIX = "/peer/v1/"
ROUTE = PATH_PREFIX + "{tier:[a-z0-9-]+}/{key:[0-9a-f]{64}}"  # keys are SHA-256 hex digests (cache_key)
SIGNATURE_LIFETIME = 60  # s: a signed request is good this long ...
CLOCK_SKEW = 30  # s: ... give or take the machines' clocks
CONNECT_TIMEOUT = 1.0  # s: a holder that does not accept in this time is gone
FETCH_TIMEOUT = 30.0  # s: a whole body, however big
WARN_EVERY = 60.0  # s: per holder
HASH_IN_THREAD_BYTES = 256_000  # bigger bodies are hashed off the event loop

BodyLookup = Callable[[str], Awaitable[bytes | None]]  # key -> the body this process holds
# message -> its HMAC-SHA256 under each of the vault's keys, newest first ([] without a vault)
Signer = Callable[[str], Awaitable[list[str]]]


def advertised_host(bound_host: str) -> str:
    """How other machines reach this process: PROJECTIONIST_PEER_HOST, else the listener's
    address (a wildcard address stands for this machine's name)."""
    if configured := os.environ.get(PEER_HOST_ENV, "").strip():
        return configured
    if bound_host in ("", "0.0.0.0", "::"):
        return socket.getfqdn()
    return bound_host


async def digest(body: bytes) -> str:
    """SHA-256 hex of a body; a big one in a thread (a few ms per MB would stall every request)."""
    if len(body) > HASH_IN_THREAD_BYTES:
        return await asyncio.to_thread(lambda: hashlib.sha256(body).hexdigest())
    return hashlib.sha256(body).hexdigest()


class PeerBodies:
    """One process's side of the exchange: the bodies it holds (one lookup per tier, registered by
    the caches), its holder URL (set by the operations listener once it is bound), and the client
    that fetches other holders' bodies."""

    def __init__(self, sign: Signer) -> None:
        self.holder: str | None = None  # None: no operations listener, so no index records
        self._sign = sign
        self._lookups: dict[str, BodyLookup] = {}
        self._session: aiohttp.ClientSession | None = None
        self._warned: dict[str, float] = {}

    def listening_at(self, host: str, port: int) -> None:
        host = advertised_host(host)
        self.holder = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def register(self, tier: str, lookup: BodyLookup) -> None:
        """A tier whose bodies this process serves with `lookup`."""
        self._lookups[tier] = lookup

    async def _signatures(self, holder: str, path: str, expires: int) -> list[str]:
        return await self._sign(f"peer-body\n{holder}{path}\n{expires}")

    # --- fetching a body from its holder ----------------------------------------------------

    async def fetch(self, holder: str, tier: str, key: str, size: int, sha256: str) -> bytes | None:
        """The body of `key` from `holder`, if it has it and it is the one indexed; else None."""
        if not holder.startswith(("http://", "https://")):
            return None
        path = f"{PATH_PREFIX}{tier}/{key}"
        expires = int(time.time()) + SIGNATURE_LIFETIME
        signatures = await self._signatures(holder, path, expires)
        if not signatures:
            return None
        url = f"{holder}{path}?expires={expires}&sig={signatures[0]}"
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=FETCH_TIMEOUT,
                                                                                sock_connect=CONNECT_TIMEOUT))
        try:
            async with self._session.get(url) as response:
                if response.status == 404:  # evicted there since: a miss
                    return None
                if response.status != 200:
                    self._warn(holder, f"answered {response.status}")
                    return None
                if response.content_length not in (None, size):
                    return None
                body = bytearray()
                async for chunk in response.content.iter_any():
                    body += chunk
                    if len(body) > size:
                        return None
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            self._warn(holder, f"{type(exc).__name__}: {exc}")
            return None
        if len(body) != size or await digest(body) != sha256:  # another body by now, or damaged on the way
            return None
        return bytes(body)

    def _warn(self, holder: str, what: str) -> None:
        now = time.monotonic()
        if now - self._warned.get(holder, -WARN_EVERY) >= WARN_EVERY:
            self._warned[holder] = now
            log.warning("a cached body's holder %s failed (%s); the upstream is asked instead", holder, what)

    # --- serving the bodies this process holds -------------------------------------------------

    async def serve(self, request: web.Request) -> web.Response:
        """`GET /peer/v1/<tier>/<key>?expires=&sig=`: the body, 404 when not held, 403 unsigned."""
        tier, key = request.match_info["tier"], request.match_info["key"]
        path = f"{PATH_PREFIX}{tier}/{key}"
        try:
            expires = int(request.query.get("expires", ""))
        except ValueError:
            return web.Response(status=403, text="unsigned\n")
        if not -CLOCK_SKEW <= expires - time.time() <= SIGNATURE_LIFETIME + CLOCK_SKEW or not await self._verify(
                path, expires, request.query.get("sig", "")):
            return web.Response(status=403, text="bad signature\n")
        lookup = self._lookups.get(tier)
        body = await lookup(key) if lookup is not None else None
        if body is None:
            return web.Response(status=404, text="not held here\n")
        return web.Response(body=body, content_type="application/octet-stream", headers={"Cache-Control": "no-store"})

    async def _verify(self, path: str, expires: int, signature: str) -> bool:
        if self.holder is None:
            return False
        expected = await self._signatures(self.holder, path, expires)
        return any(hmac.compare_digest(s, signature) for s in expected)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
