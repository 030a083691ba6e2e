"""Connect and first-byte timeouts for the exchanges mitmproxy forwards itself.

`TimedForward` fetches our buffered routes with their timeouts; what it leaves to mitmproxy
(streamed routes: media parts and transcode segments; requests to no route, Plex's event stream
among them) has no timeout there but `tcp_timeout` (600 s, and only for a connection idle on
both sides), so a hung origin kept the player waiting forever. mitmproxy 12 has no option or hook
for it either: an addon cannot answer a flow whose request already went upstream, and its own
errors (a closed or cancelled server connection) reach the client as mitmproxy's 502 page, not in
the upstream's format.

So the timeouts live where mitmproxy waits, in its HTTP stream: `TimedHttpStream` (installed
process-wide, like dispatch.py's connection handler) asks for a `RequestWakeup` (the layers' own
timer) once the request is on its way; if the origin's response headers have not come when it
fires, the stream drops the server side (RST for HTTP/2, close for HTTP/1) and answers as if an
addon had set the response (the 504 in the upstream's format), through the usual responseheaders
and response hooks. Once headers came nothing is cut: a paused player may leave a media stream
idle for as long as it likes, and an event stream never ends.

The connect timeout cancels the server connection's own task (mitmproxy's `tcp_timeout` does
the same to a client's), armed in `server_connect` and disarmed when the stream has its connection
(TCP and TLS set up): the stream answers 504 instead of mitmproxy's 502.

The stream only acts on flows `HeaderTimeouts` gave a `Deadline` (ours, not upgrades, request
body not streamed, not answered by an addon); every other flow behaves exactly as mitmproxy's.
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import logging
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

from mitmproxy import http
from mitmproxy.proxy import commands, events, server_hooks
from mitmproxy.proxy.layers import http as http_layers
from mitmproxy.proxy.layers.http import (ErrorCode, GetHttpConnection, HttpResponseHeadersHook, HttpStream,
                                         RequestProtocolError, ResponseData, ResponseEndOfMessage, ResponseHeaders,
                                         ResponseProtocolError, ResponseTrailers, SendHttp)

from . import flowinfo
from .local_responses import gateway_error
from .rules_watch import RulesWatcher

log = logging.getLogger(__name__)

DEADLINE_KEY = "projectionist.deadline"


@dataclass(eq=False, slots=True)
class Deadline:
    """A flow's timeouts until the response headers, and the answer when they run out."""

    connect: float
    first_byte: float
    answer: Callable[[], http.Response]
    connect_expired: bool = False
    _timer: asyncio.TimerHandle | None = field(default=None, repr=False)

    def connected(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class TimedHttpStream(HttpStream):
    """mitmproxy's HttpStream, with a deadline for the response headers (see above)."""

    _header_wakeup: commands.RequestWakeup | None = None
    _timed_out = False

    def _handle_event(self, event: events.Event):
        if isinstance(event, events.Wakeup) and event.command is self._header_wakeup:
            self._header_wakeup = None
            if self.server_state == self.state_wait_for_response_headers and not self._timed_out:
                yield from self._time_out()
            return
        if self._timed_out and isinstance(event, (ResponseHeaders, ResponseData, ResponseTrailers,
                                                  ResponseEndOfMessage, ResponseProtocolError)):
            return  # the dropped server side's last words: the client has its answer
        yield from super()._handle_event(event)

    def make_server_connection(self):
        deadline = self.flow.metadata.get(DEADLINE_KEY)
        if not isinstance(deadline, Deadline):
            return (yield from super().make_server_connection())
        # As HttpStream.make_server_connection, with our answer for a connect timeout.
        connection, err = yield GetHttpConnection(
            (self.flow.request.host, self.flow.request.port),
            self.flow.request.scheme == "https",
            self.flow.server_conn.via,
            self.flow.server_conn.transport_protocol,
        )
        deadline.connected()
        if err:
            if deadline.connect_expired:
                yield commands.Log(f"no connection to {self.flow.request.host} within {deadline.connect:g}s",
                                   logging.WARNING)
                self._timed_out = True
                yield from self._answer(deadline.answer())
            else:
                yield from self.handle_protocol_error(
                    ResponseProtocolError(self.stream_id, err, ErrorCode.CONNECT_FAILED))
            return False
        self.context.server = self.flow.server_conn = connection
        self._header_wakeup = commands.RequestWakeup(deadline.first_byte)
        yield self._header_wakeup
        return True

    def _time_out(self):
        deadline: Deadline = self.flow.metadata[DEADLINE_KEY]
        self._timed_out = True
        yield commands.Log(f"no response headers from {self.flow.request.host} within {deadline.first_byte:g}s",
                           logging.WARNING)
        # The server side goes (HTTP/1: the connection, never reused half-answered; HTTP/2: the stream).
        yield SendHttp(RequestProtocolError(self.stream_id, "first-byte timeout", ErrorCode.CANCEL),
                       self.context.server)
        yield from self._answer(deadline.answer())

    def _answer(self, response: http.Response):
        """As mitmproxy answers a response an addon set in the request hook."""
        self.flow.response = response
        response.timestamp_start = time.time()
        yield HttpResponseHeadersHook(self.flow)
        if (yield from self.check_killed(True)):
            return
        yield from self.send_response()


# --- the guard: the internals TimedHttpStream copies or relies on, as in mitmproxy 12.3.1 -----

EXPECTED_INTERNALS = {
    "HttpStream._handle_event": "e3cbfef7310ae81f",
    "HttpStream.make_server_connection": "ddc7bc72f4d2fbc7",
    "HttpStream.state_consume_request_body": "45459c1bbd8bdb1a",
    "HttpStream.state_wait_for_response_headers": "10e32e91b2948164",
    "HttpStream.send_response": "d581bc106152e369",
    "HttpStream.check_killed": "368cad352d1e82b6",
    "HttpLayer.make_stream": "654959c6e74548e1",
    "HttpLayer.event_to_child": "1095f6e1581d1780",
}


def _digest(dotted: str) -> str | None:
    cls_name, name = dotted.split(".")
    try:
        target = inspect.unwrap(getattr(getattr(http_layers, cls_name) if cls_name == "HttpLayer" else HttpStream,
                                        name))
        return hashlib.sha256(inspect.getsource(target).encode()).hexdigest()[:16]
    except (AttributeError, OSError, TypeError):
        return None


def unexpected_internals() -> list[str]:
    return [name for name, digest in EXPECTED_INTERNALS.items() if _digest(name) != digest]


def install() -> bool:
    """Make mitmproxy's HTTP layers build TimedHttpStream (process-wide, idempotent); False, with
    a warning, when the internals are not the ones it was written against."""
    current = getattr(http_layers, "HttpStream", None)
    if current is TimedHttpStream:
        return True
    changed = unexpected_internals()
    if current is not HttpStream or changed:
        log.warning("mitmproxy's HTTP stream is not the one expected (%s): streamed and unrouted requests have "
                    "no connect or first-byte timeout", ", ".join(changed) or "another class")
        return False
    http_layers.HttpStream = TimedHttpStream  # HttpLayer.make_stream reads the module global
    return True


class HeaderTimeouts:
    """Gives what mitmproxy forwards itself a Deadline from the route's timeouts (rules.py
    `Match.timeouts`); comes after every addon that may answer or hold a request."""

    def __init__(self, watcher: RulesWatcher) -> None:
        self.watcher = watcher
        self.installed = False
        # Flows waiting for their headers, per client connection: a server_connect finds its own.
        self._waiting: dict[str, weakref.WeakSet[http.HTTPFlow]] = {}

    def running(self) -> None:
        self.installed = install()

    def request(self, flow: http.HTTPFlow) -> None:
        info = flowinfo.get(flow)
        rules = self.watcher.rules
        if (not self.installed or info is None or rules is None or flow.response is not None or flow.request.stream
                or "upgrade" in flow.request.headers):
            return
        timeouts = info.match.timeouts(rules.model.proxy)
        kind = info.match.upstream.kind
        request = flow.request
        flow.metadata[DEADLINE_KEY] = Deadline(
            timeouts.connect, timeouts.first_byte,
            lambda: gateway_error(request, kind, 504, "the upstream did not answer in time"))
        self._waiting.setdefault(flow.client_conn.id, weakref.WeakSet()).add(flow)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        self._done(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._done(flow)

    def _done(self, flow: http.HTTPFlow) -> None:
        waiting = self._waiting.get(flow.client_conn.id)
        if waiting is not None:
            waiting.discard(flow)
            deadline = flow.metadata.get(DEADLINE_KEY)
            if isinstance(deadline, Deadline):
                deadline.connected()

    def client_disconnected(self, client) -> None:
        self._waiting.pop(client.id, None)

    def server_connect(self, data: server_hooks.ServerConnectionHookData) -> None:
        waiting = self._waiting.get(data.client.id)
        if not waiting:
            return
        deadlines = [d for f in list(waiting) if (f.request.host, f.request.port) == data.server.address
                     and isinstance(d := f.metadata.get(DEADLINE_KEY), Deadline) and d._timer is None]
        if not deadlines:
            return
        # This hook runs in the task that opens the connection (mitmproxy's open_connection).
        task = asyncio.current_task()
        if task is None:
            return

        def expire() -> None:
            for d in deadlines:
                d.connect_expired = True
                d._timer = None
            task.cancel("connect timeout")

        timer = asyncio.get_running_loop().call_later(max(d.connect for d in deadlines), expire)
        for d in deadlines:
            d._timer = timer
