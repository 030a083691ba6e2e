"""Viewing history from the playback traffic that passes through (Tautulli-style "who watched what").

The player reports progress with `/:/timeline` (about four times a second while playing) and marks
items watched with `/:/scrobble` / `/:/unscrobble`; titles come from the metadata answers it
fetches before playing. This addon never blocks the event loop: it copies a few query values (or
a reference to the raw metadata body) into a `PlaybackWriter` queue, whose thread builds play
sessions and commits them in batches (projectionist/analytics.py).

Nothing secret is kept: no token, no transcode session id; the client identifier only as a hash.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from mitmproxy import ctx, http

from projectionist.analytics import MAX_METADATA_BYTES, MetadataBody, PlaybackReport, PlaybackWriter
from projectionist.event_stream import playback_writer

from . import flowinfo
from .rules_watch import RulesWatcher

log = logging.getLogger(__name__)

# By path, not route name: rules.yaml may split a path into several routes (e.g. stopped timelines).
PLAYBACK_PATHS = {"/:/timeline": "timeline", "/:/scrobble": "scrobble", "/:/unscrobble": "unscrobble"}
METADATA_PATH = re.compile(r"^/library/(metadata/[^/]+(/children)?|onDeck|sections/[^/]+/all)$")


def _param(request: http.Request, name: str) -> str | None:
    return request.query.get(name) or request.headers.get(name) or None


def _ms(value: str | None) -> int | None:
    try:
        return int(float(value)) if value else None
    except ValueError:
        return None


def playback_report(flow: http.HTTPFlow, info: flowinfo.FlowInfo, kind: str) -> PlaybackReport | None:
    request = flow.request
    query = request.query
    rating_key = query.get("ratingKey") or (query.get("key") or "").rstrip("/").rsplit("/", 1)[-1]
    if not rating_key or len(rating_key) > 64:
        return None
    product = _param(request, "X-Plex-Product")
    device = _param(request, "X-Plex-Device-Name") or _param(request, "X-Plex-Platform")
    player = " / ".join(p for p in (product, device) if p)[:100] or None
    return PlaybackReport(
        ts=request.timestamp_start, kind=kind, rating_key=rating_key, user_id=info.user_id,
        client=_param(request, "X-Plex-Client-Identifier"), player=player,
        state=(query.get("state") or None) if kind == "timeline" else None,
        position_ms=_ms(query.get("time")), duration_ms=_ms(query.get("duration")),
    )


class ViewingHistory:
    def __init__(self, watcher: RulesWatcher | None = None) -> None:
        self.watcher = watcher  # its proxy.redis_url: the reports go to the control plane's writer
        self.writer: PlaybackWriter | None = None

    def configure(self, updated) -> None:
        # projectionist_db is declared by UsageRecorder (which also refuses an empty one).
        if "projectionist_db" not in updated or not getattr(ctx.options, "projectionist_db", ""):
            return
        if self.writer is not None:
            self.writer.close()
        self.writer = playback_writer(Path(ctx.options.projectionist_db).expanduser(),
                                      self.watcher.redis_url if self.watcher else None).start()

    def done(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def response(self, flow: http.HTTPFlow) -> None:
        info = flowinfo.get(flow)
        response = flow.response
        if (info is None or self.writer is None or response is None or response.status_code >= 400
                or info.match.upstream.kind != "plex-server"):
            return
        path = flow.request.path.split("?", 1)[0]
        kind = PLAYBACK_PATHS.get(path)
        if kind is not None:
            if (report := playback_report(flow, info, kind)) is not None:
                self.writer.record(report)
        elif not response.stream and METADATA_PATH.match(path):
            raw = response.raw_content
            if raw and len(raw) <= MAX_METADATA_BYTES:
                self.writer.record(MetadataBody(
                    ts=flow.request.timestamp_start, raw=raw,
                    content_type=response.headers.get("content-type", ""),
                    content_encoding=response.headers.get("content-encoding", ""),
                ))
