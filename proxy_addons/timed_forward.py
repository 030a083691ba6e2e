"""Forwards our routes' requests with connect, first-byte and idle timeouts.

mitmproxy 12 has no timeout for an upstream exchange: its only knob, `tcp_timeout` (600 s),
closes a connection idle on both sides, and a hung origin kept a client waiting for as long as
the origin liked (issue 16: 45 s and counting with `upstream_timeout: 15`). So the requests of a
route that mitmproxy would forward are fetched here instead, like the response cache's misses,
with the route's timeouts (rules.py `Match.timeouts`): a hung origin gets a 504, an unreachable
one a 502, each in the upstream's own format, within the timeout.

Image routes are the image cache's, which fetches for itself with the same timeouts; what it
leaves alone (an unknown account's image, a source it will not touch) is fetched here. Streamed
routes (`stream: true`: media parts and segments), requests to no route (Plex's event stream among
them: an answer that never ends) and protocol upgrades stay with mitmproxy: their bodies must not
be buffered. header_timeouts.py gives them (upgrades aside) the connect and first-byte timeouts
inside mitmproxy's own HTTP stream; once their headers came nothing cuts them (a paused player, an
event stream).
"""

from __future__ import annotations

import logging

import aiohttp
from mitmproxy import http

from . import flowinfo
from .local_responses import gateway_error
from .rules_watch import RulesWatcher
from .upstream_fetch import ResponseTooLarge, fetch, upstream_session

log = logging.getLogger(__name__)

# Buffered answers are API documents; anything bigger than this is not one and is refused.
MAX_BUFFERED_ANSWER = 64_000_000


class TimedForward:
    def __init__(self, watcher: RulesWatcher) -> None:
        self.watcher = watcher
        self.session: aiohttp.ClientSession | None = None

    def running(self) -> None:
        self.session = upstream_session()

    async def done(self) -> None:
        if self.session is not None:
            await self.session.close()
            self.session = None

    async def request(self, flow: http.HTTPFlow) -> None:
        info = flowinfo.get(flow)
        rules = self.watcher.rules
        if info is None or flow.response is not None or self.session is None or rules is None:
            return
        route = info.match.route
        if route is None or route.rule.stream or flow.request.stream or "upgrade" in flow.request.headers:
            return
        timeouts = info.match.timeouts(rules.model.proxy)
        kind = info.match.upstream.kind
        try:
            fetched = await fetch(self.session, flow.request, timeouts, max_bytes=MAX_BUFFERED_ANSWER)
        except TimeoutError:
            log.warning("upstream %s did not answer %s in time (connect %gs, first byte %gs, idle %gs)",
                        info.upstream, info.route, timeouts.connect, timeouts.first_byte, timeouts.idle)
            flow.response = gateway_error(flow.request, kind, 504, "the upstream did not answer in time")
            return
        except ResponseTooLarge:
            flow.response = gateway_error(flow.request, kind, 502, "the upstream's answer is too large")
            return
        except (aiohttp.ClientError, OSError) as exc:
            log.info("upstream %s failed for %s: %s", info.upstream, info.route, type(exc).__name__)
            flow.response = gateway_error(flow.request, kind, 502, "the upstream is not reachable")
            return
        flow.response = fetched.to_response()
