"""Records one usage row per request that belongs to an upstream of rules.yaml.

Rows hold the route *name*, never the URL, headers or body, so no token can reach them. They
go to the store's `UsageWriter`, which commits them in batches from its own thread: this hook
only appends to a queue.
"""

from __future__ import annotations

import functools
import logging
import time
from pathlib import Path

from mitmproxy import ctx, exceptions, http

from projectionist.event_stream import usage_writer
from projectionist.metrics import UPSTREAM_ERRORS, RequestMetrics
from projectionist.store import UsageEvent, UsageWriter, open_db

from . import flowinfo
from .header_lookup import header
from .rules_watch import RulesWatcher

log = logging.getLogger(__name__)

_RECORDED = "projectionist.recorded"


def reason_from_cache_status(response: http.Response | None) -> str | None:
    """"Projectionist; fwd=uri-miss; fwd-status=200; detail=evicted" -> "uri-miss:evicted"; None
    for a hit or no Cache-Status (answers of addons that set their own, e.g. the image cache)."""
    value = header(response.headers, b"cache-status") if response is not None else None
    return _reason(value) if value else None


@functools.lru_cache(maxsize=1024)  # a pure function of the value; hits repeat theirs within a ttl second
def _reason(value: str) -> str | None:
    params = dict(p.strip().partition("=")[::2] for p in value.split(";")[1:])
    fwd = params.get("fwd")
    if not fwd:
        return None if "hit" in params else "miss"
    detail = params.get("detail", "").strip('"')
    return f"{fwd}:{detail}" if detail else fwd


class UsageRecorder:
    def __init__(self, watcher: RulesWatcher | None = None) -> None:
        self.watcher = watcher  # proxy.redis_url: the rows go to the control plane's writer
        self.writer: UsageWriter | None = None
        self.metrics = RequestMetrics()

    def load(self, loader) -> None:
        loader.add_option("projectionist_db", str, "", "Path of Projectionist's SQLite database.")

    def configure(self, updated) -> None:
        if "projectionist_db" not in updated:
            return
        if not ctx.options.projectionist_db:
            raise exceptions.OptionsError("projectionist_db must name a SQLite file")
        path = Path(ctx.options.projectionist_db).expanduser()
        open_db(path).conn.close()  # create and migrate before the first request
        if self.writer is not None:
            self.writer.close()
        self.writer = usage_writer(path, self.watcher.redis_url if self.watcher else None).start()

    def done(self) -> None:
        if self.writer is not None:
            self.writer.close()  # flushes what is queued
            self.writer = None

    def response(self, flow: http.HTTPFlow) -> None:
        self._record(flow, error=None)

    def error(self, flow: http.HTTPFlow) -> None:
        self._record(flow, error=flow.error.msg if flow.error else "error")

    def _record(self, flow: http.HTTPFlow, error: str | None) -> None:
        info = flowinfo.get(flow)
        rule = info.match.route.rule if info and info.match.route else None
        if info is None or self.writer is None or (rule and not rule.record) or flow.metadata.get(_RECORDED):
            return
        flow.metadata[_RECORDED] = True
        response = flow.response
        end = response.timestamp_end if response and response.timestamp_end else time.time()
        if response is None:
            bytes_out = 0
        elif response.stream:
            bytes_out = info.bytes_streamed
        else:
            bytes_out = len(response.raw_content or b"")
        status = response.status_code if response else (502 if error else None)
        seconds = end - flow.request.timestamp_start
        # Counters only on this path: a dict look-up and a locked add each.
        self.metrics.record(info.upstream, info.route, str(status), info.cache, seconds)
        if error or status == 504:
            UPSTREAM_ERRORS.labels(info.upstream, "timeout" if status == 504 or "timeout" in (error or "").lower()
                                   else "error").inc()
        self.writer.record(UsageEvent(
            ts=flow.request.timestamp_start,
            listener="warm" if info.warm else info.listener,
            upstream=info.upstream,
            route=info.route,
            method=flow.request.method,
            status=status,
            latency_ms=round(seconds * 1000, 3),
            bytes_in=len(flow.request.raw_content or b""),
            bytes_out=bytes_out,
            cache=info.cache,
            cache_reason=info.cache_reason or reason_from_cache_status(response),
            user_id=info.user_id,
            credential=info.credential,
            error=error,
        ))
