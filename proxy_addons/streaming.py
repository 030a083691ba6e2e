"""Streams large bodies (media parts, transcode segments) instead of buffering them.

mitmproxy buffers a whole response before the `response` hook by default; a 500 MB film part
would sit in memory. Our routes' responses stream when the rule says so, or when they are not an
API document (JSON, XML, text) and are larger than `proxy.stream_threshold` or of unknown length.
API documents are always buffered: addons rewrite them (tokens in plex.tv answers) and they are
small; a streamed document would slip past those addons.
Range requests and 206 answers pass through unchanged. Streamed bytes are counted for usage.
"""

from __future__ import annotations

from collections.abc import Callable

from mitmproxy import http

from . import flowinfo
from .header_lookup import header
from .rules_watch import RulesWatcher

_DOCUMENT_TYPES = ("application/json", "text/", "application/xml", "application/javascript")


class LargeBodies:
    def __init__(self, watcher: RulesWatcher) -> None:
        self.watcher = watcher

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        info = flowinfo.get(flow)
        rules = self.watcher.rules
        if info is None or rules is None or flow.response is None:
            return
        if info.match.route and info.match.route.rule.stream or self._is_large(
            flow.response, rules.model.proxy.stream_threshold
        ):
            flow.response.stream = _counter(info)

    @staticmethod
    def _is_large(response: http.Response, threshold: int) -> bool:
        if (header(response.headers, b"content-type") or "").lower().startswith(_DOCUMENT_TYPES):
            return False
        length = header(response.headers, b"content-length")
        return length is None or (length.isdigit() and int(length) > threshold)


def _counter(info: flowinfo.FlowInfo) -> Callable[[bytes], bytes]:
    def count(chunk: bytes) -> bytes:
        info.bytes_streamed += len(chunk)
        return chunk

    return count
