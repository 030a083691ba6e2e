"""Streams large bodies (media parts, transcode segments) instead of buffering them.

mitmproxy buffers a whole response before the `response` hook by default; a 500 MB film part
would sit in memory. Our routes' responses stream when the rule says so, when they are larger
than `proxy.stream_threshold`, or when their length is unknown and they are not an API document.
Range requests and 206 answers pass through unchanged. Streamed bytes are counted for usage.
"""

from __future__ import annotations

from collections.abc import Callable

from mitmproxy import http

from . import flowinfo
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
        length = response.headers.get("content-length")
        if length is not None:
            return length.isdigit() and int(length) > threshold
        content_type = response.headers.get("content-type", "").lower()
        return not content_type.startswith(_DOCUMENT_TYPES)


def _counter(info: flowinfo.FlowInfo) -> Callable[[bytes], bytes]:
    def count(chunk: bytes) -> bytes:
        info.bytes_streamed += len(chunk)
        return chunk

    return count
