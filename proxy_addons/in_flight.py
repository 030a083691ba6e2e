"""Requests in flight, so that a stop lets them finish (issue 16: no request cut by a SIGTERM).

The proxy stops by closing its listeners first. A request that comes meanwhile on a connection
already open gets a 503 with `Connection: close` and Retry-After (a client retries elsewhere or
later); the requests under way get their answers. Only then (or after `DRAIN_SECONDS`) do the
addons' `done` hooks run and close what those requests still need: the vault, the caches, the
writers. The addon comes last, so a request counts from after every addon's `requestheaders` to
after every addon's `response` (or `error`).
"""

from __future__ import annotations

import asyncio
import logging
import time

from mitmproxy import http

log = logging.getLogger(__name__)

DRAIN_SECONDS = 5.0


class InFlight:
    def __init__(self) -> None:
        self._flows: set[str] = set()
        self.draining = False

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if self.draining and flow.response is None:
            flow.response = http.Response.make(503, b"Projectionist is stopping; try again.\n",
                                               {"Content-Type": "text/plain", "Connection": "close",
                                                "Retry-After": "1"})
            return
        self._flows.add(flow.id)

    def response(self, flow: http.HTTPFlow) -> None:
        self._flows.discard(flow.id)

    def error(self, flow: http.HTTPFlow) -> None:
        self._flows.discard(flow.id)

    def __len__(self) -> int:
        return len(self._flows)

    async def drained(self, timeout: float = DRAIN_SECONDS) -> bool:
        """Wait until no request is in flight (True) or `timeout` passed (False, logged)."""
        self.draining = True
        deadline = time.monotonic() + timeout
        while self._flows:
            if time.monotonic() >= deadline:
                log.warning("stopping with %d request(s) still in flight after %.0f s", len(self._flows), timeout)
                return False
            await asyncio.sleep(0.05)
        return True
