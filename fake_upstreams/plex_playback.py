"""Fake PMS playback side: artwork, photo transcoder, direct-play parts, DASH transcode and play-state writes.

Mirrors PMS behaviour the web player relies on:
- `/library/metadata/{rk}/thumb|art/{ts}`: JPEG artwork; `/photo/:/transcode` resizes *local* images only
  (`url=/library/...`; anything else is a 400, nothing is fetched).
- `/library/parts/{id}/{ts}/file.mkv`: byte-range capable file (`Accept-Ranges`, 206 + `Content-Range`,
  416 + `Content-Range: bytes */size`), streamed from a deterministic pattern, never held in memory.
- `/video/:/transcode/universal/decision` and `start.mpd` register a transcode session for the caller;
  the MPD's relative segment URLs (`session/{sid}/{stream}/header`, `.../{n}.m4s`) carry no token, so
  segments are served to anyone who knows a live session id (unknown session: 404), like PMS.
- `/:/timeline`, `/:/scrobble`, `/:/unscrobble`, `/:/rate`, `POST /playQueues`,
  `PUT /library/parts/{id}?audioStreamID=|subtitleStreamID=` change per-user state.
"""

from __future__ import annotations

import math
import re
import time
import uuid
from collections.abc import Iterator
from urllib.parse import unquote, urlsplit

from aiohttp import web

from . import data, images, media
from .common import param
from .mediacontainer import container, html_error, respond
from .plex_model import (
    ITEMS, ITEMS_BY_PART, PART_SIZES, PLAYED_FRACTION, Ctx, Item, Session, children_of, container_attrs, get_state,
    item_node, leaves_of, require_account, streams_of,
)

routes = web.RouteTableDef()

POSTER_SIZE = (1000, 1500)
ART_SIZE = (1920, 1080)
STILL_SIZE = (1280, 720)
SEGMENT_MS = media.SEGMENT_SECONDS * 1000
MAX_TRANSCODE_SIDE = 4096


# --- artwork ------------------------------------------------------------------------------------------
def artwork(item: Item, kind: str) -> tuple[str, tuple[int, int]]:
    """Seed and pixel size of an item's thumb/art as PMS would have stored it."""
    if kind == "art":
        return f"plex-{item.rating_key}-art", ART_SIZE
    if item.type in ("episode", "clip"):
        return f"plex-{item.rating_key}-thumb", STILL_SIZE
    return f"plex-{item.rating_key}-thumb", POSTER_SIZE


async def _image(request: web.Request, seed: str, size: tuple[int, int]) -> web.Response:
    body = await images.render_async(seed, *size)
    return web.Response(body=body, headers={"Content-Type": "image/jpeg"})


for _kind in ("thumb", "art"):
    for _suffix in ("", "/{ts}"):
        @routes.get(rf"/library/metadata/{{rating_key:\d+}}/{_kind}{_suffix}")
        async def metadata_image(request: web.Request, _kind: str = _kind) -> web.Response:
            require_account(request)
            item = ITEMS.get(request.match_info["rating_key"])
            if item is None:
                return html_error(404)
            return await _image(request, *artwork(item, _kind))


_LOCAL_IMAGE = re.compile(r"^/library/metadata/(\d+)/(thumb|art)(?:/\d+)?$")
_LOCAL_INDEX = re.compile(r"^/library/parts/(\d+)/indexes/sd/(\d+)$")


@routes.get("/photo/:/transcode")
async def photo_transcode(request: web.Request) -> web.Response:
    require_account(request)
    try:
        width = int(request.query["width"])
        height = int(request.query["height"])
    except (KeyError, ValueError):
        return html_error(400)
    if not (0 < width <= MAX_TRANSCODE_SIDE and 0 < height <= MAX_TRANSCODE_SIDE):
        return html_error(400)
    source = urlsplit(unquote(request.query.get("url", "")))
    if source.scheme or source.netloc:
        return html_error(400)  # a real PMS would fetch remote URLs; the fake never fetches anything
    if m := _LOCAL_IMAGE.match(source.path):
        item = ITEMS.get(m.group(1))
        if item is None:
            return html_error(404)
        seed = artwork(item, m.group(2))[0]
    elif m := _LOCAL_INDEX.match(source.path):
        if int(m.group(1)) not in ITEMS_BY_PART:
            return html_error(404)
        seed = f"plex-part-{m.group(1)}-frame-{int(m.group(2)) // 10000}"
    else:
        return html_error(400)
    return await _image(request, seed, (width, height))


# --- direct play parts -----------------------------------------------------------------------------
# Each part is real H.264/AAC media (fake_upstreams/media.py: a 12 s clip looped to the part's size), so a
# browser plays it; every byte range is computed on the fly, never held in memory.
WRITE_CHUNK = 256 * 1024


def iter_part(part_id: int, start: int, end: int, size: int | None = None) -> Iterator[bytes]:
    """Yield the bytes `start..end` (inclusive) of a part in chunks of about WRITE_CHUNK."""
    size = size if size is not None else PART_SIZES[part_id]
    return media.Part(size).iter_bytes(start, end, WRITE_CHUNK)


def part_bytes(part_id: int, start: int, end: int) -> bytes:
    """The exact bytes a client gets for `Range: bytes=start-end` (for tests; keep ranges small)."""
    return b"".join(iter_part(part_id, start, end))


def parse_range(header: str | None, size: int) -> tuple[int, int] | None | bool:
    """(start, end) for a satisfiable single range, None without a Range header, False if unsatisfiable."""
    if not header:
        return None
    m = re.fullmatch(r"\s*bytes=(\d*)-(\d*)\s*(?:,.*)?", header)
    if not m or (not m.group(1) and not m.group(2)):
        return None  # malformed ranges are ignored, the whole file is sent
    if not m.group(1):
        length = int(m.group(2))
        if length == 0:
            return False
        return max(size - length, 0), size - 1
    start = int(m.group(1))
    end = int(m.group(2)) if m.group(2) else size - 1
    if start >= size or end < start:
        return False
    return start, min(end, size - 1)


@routes.get("/library/parts/{part_id:\\d+}/{ts}/{filename}")
async def part_file(request: web.Request) -> web.StreamResponse:
    require_account(request)
    state = get_state(request)
    part_id = int(request.match_info["part_id"])
    size = state.part_sizes.get(part_id)
    if size is None:
        return html_error(404)
    content_type = "video/mp4"
    wanted = parse_range(request.headers.get("Range"), size)
    headers = {"Content-Type": content_type, "Accept-Ranges": "bytes"}
    if wanted is False:
        headers["Content-Range"] = f"bytes */{size}"
        return web.Response(status=416, headers=headers)
    start, end = wanted if wanted else (0, size - 1)
    response = web.StreamResponse(status=206 if wanted else 200, headers=headers)
    if wanted:
        response.headers["Content-Range"] = f"bytes {start}-{end}/{size}"
    response.content_length = end - start + 1
    await response.prepare(request)
    if request.method != "HEAD":
        try:
            for chunk in iter_part(part_id, start, end, size):
                await response.write(chunk)
        except ConnectionError:
            return response  # players hang up mid-file all the time (seeking); not an error
    await response.write_eof()
    return response


@routes.put("/library/parts/{part_id:\\d+}")
async def select_streams(request: web.Request) -> web.Response:
    account = require_account(request)
    state = get_state(request)
    part_id = int(request.match_info["part_id"])
    item = ITEMS_BY_PART.get(part_id)
    if item is None:
        return html_error(404)
    streams = {s["id"]: s["streamType"] for s in streams_of(item)}
    chosen = state.selected_streams.setdefault((account.id, part_id), {})
    for name, kind, key in (("audioStreamID", 2, "audio"), ("subtitleStreamID", 3, "subtitle")):
        raw = request.query.get(name)
        if raw is None:
            continue
        clears_subtitles = kind == 3 and raw == "0"
        if not clears_subtitles and (not raw.isdigit() or streams.get(int(raw)) != kind):
            return html_error(400)
        chosen[key] = int(raw)
    return web.Response(status=200, headers={"Content-Type": "text/html"})


# --- DASH transcode ------------------------------------------------------------------------------------
def _item_from_path(request: web.Request) -> Item | None:
    m = re.search(r"/library/metadata/(\d+)", unquote(request.query.get("path", "")))
    return ITEMS.get(m.group(1)) if m else None


def _session_id(request: web.Request) -> str:
    return (request.query.get("session") or param(request, "X-Plex-Session-Identifier")
            or request.query.get("transcodeSessionId") or str(uuid.uuid4()))


def _start_session(request: web.Request, item: Item) -> Session:
    account = require_account(request)
    state = get_state(request)
    sid = _session_id(request)
    session = Session(sid, account.id, item.rating_key, item.duration)
    state.sessions[sid] = session
    return session


@routes.get("/video/:/transcode/universal/decision")
async def decision(request: web.Request) -> web.Response:
    account = require_account(request)
    item = _item_from_path(request)
    if item is None or item.part_id is None:
        return html_error(400)
    _start_session(request, item)
    ctx = Ctx(get_state(request), account, detail=True)
    node = item_node(ctx, item)
    direct = request.query.get("directPlay") == "1"
    for media in (c for c in node.children if c.tag == "Media"):
        media.attrs.update(protocol=None if direct else "dash", selected=True,
                           container=media.attrs["container"] if direct else "mp4")
        for part in media.children:
            part.attrs.update(decision="directplay" if direct else "transcode", selected=True)
            for stream in part.children:
                if stream.attrs["streamType"] in (1, 2):
                    stream.attrs.update(decision="copy" if stream.attrs["streamType"] == 1 else "transcode",
                                        location="direct" if direct else "segments-" +
                                        ("video" if stream.attrs["streamType"] == 1 else "audio"))
    if direct:
        codes = {"directPlayDecisionCode": 1000, "directPlayDecisionText": "Direct play OK.",
                 "generalDecisionCode": 1000, "generalDecisionText": "Direct play OK."}
    else:
        codes = {"directPlayDecisionCode": 3000,
                 "directPlayDecisionText": "App cannot direct play this item. Direct play is disabled.",
                 "generalDecisionCode": 1001, "generalDecisionText": "Direct play not available; Conversion OK.",
                 "transcodeDecisionCode": 1001,
                 "transcodeDecisionText": "Direct play not available; Conversion OK."}
    return respond(request, container(container_attrs(item.section, **codes), [node]))


def _iso_duration(ms: int) -> str:
    return f"PT{ms / 1000:.3f}S"


STREAMS = ("video", "audio")  # the {stream} number in segment URLs -> media.stream() name


def build_mpd(session: Session) -> str:
    """A static DASH manifest over the session's segments (relative URLs, no token, as PMS sends)."""
    sid, duration = session.session_id, session.duration
    video, audio = media.stream("video"), media.stream("audio")
    seg = SEGMENT_MS
    template = ('<SegmentTemplate timescale="1000" duration="{seg}" initialization="session/{sid}/{n}/header" '
                'media="session/{sid}/{n}/$Number$.m4s" startNumber="0" />')
    return "\n".join([
        '<?xml version="1.0" encoding="UTF-8"?>',
        '<MPD xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" xmlns="urn:mpeg:dash:schema:mpd:2011" '
        'xsi:schemaLocation="urn:mpeg:DASH:schema:MPD:2011 DASH-MPD.xsd" '
        'profiles="urn:mpeg:dash:profile:isoff-live:2011" type="static" '
        f'mediaPresentationDuration="{_iso_duration(duration)}" maxSegmentDuration="PT{seg // 1000}S" '
        'minBufferTime="PT4S">',
        f'<Period id="0" start="PT0S" duration="{_iso_duration(duration)}">',
        f'<AdaptationSet id="0" segmentAlignment="true" maxWidth="{media.WIDTH}" maxHeight="{media.HEIGHT}" '
        f'maxFrameRate="{media.FRAME_RATE}">',
        f'<Representation id="0" mimeType="video/mp4" codecs="{video.codec}" bandwidth="{media.VIDEO_BANDWIDTH}" '
        f'width="{media.WIDTH}" height="{media.HEIGHT}" frameRate="{media.FRAME_RATE}" sar="1:1" startWithSAP="1">',
        template.format(seg=seg, sid=sid, n=0),
        "</Representation>",
        "</AdaptationSet>",
        '<AdaptationSet id="1" segmentAlignment="true" lang="eng">',
        f'<Representation id="1" mimeType="audio/mp4" codecs="{audio.codec}" bandwidth="{media.AUDIO_BANDWIDTH}" '
        f'audioSamplingRate="{media.SAMPLE_RATE}">',
        '<AudioChannelConfiguration schemeIdUri="urn:mpeg:dash:23003:3:audio_channel_configuration:2011" '
        'value="1" />',
        template.format(seg=seg, sid=sid, n=1),
        "</Representation>",
        "</AdaptationSet>",
        "</Period>",
        "</MPD>",
        "",
    ])


def build_hls(session: Session) -> str:
    """The HLS master playlist: one video rendition and one audio group, fMP4 segments (HLS 7) that are
    the same files as the DASH ones (`session/{sid}/{n}/index.m3u8` lists them)."""
    sid = session.session_id
    video, audio = media.stream("video"), media.stream("audio")
    return "\n".join([
        "#EXTM3U", "#EXT-X-VERSION:7", "#EXT-X-INDEPENDENT-SEGMENTS",
        f'#EXT-X-MEDIA:TYPE=AUDIO,GROUP-ID="audio",NAME="English",LANGUAGE="eng",DEFAULT=YES,AUTOSELECT=YES,'
        f'CHANNELS="1",URI="session/{sid}/1/index.m3u8"',
        f'#EXT-X-STREAM-INF:BANDWIDTH={media.VIDEO_BANDWIDTH + media.AUDIO_BANDWIDTH},'
        f'CODECS="{video.codec},{audio.codec}",RESOLUTION={media.WIDTH}x{media.HEIGHT},'
        f'FRAME-RATE={media.FRAME_RATE:.3f},AUDIO="audio"',
        f"session/{sid}/0/index.m3u8", "",
    ])


def build_hls_media(session: Session) -> str:
    """A VOD media playlist of one stream: the init segment (`header`) and `{n}.m4s`, relative to it."""
    count = math.ceil(session.duration / SEGMENT_MS)
    last = (session.duration - (count - 1) * SEGMENT_MS) / 1000
    lines = ["#EXTM3U", "#EXT-X-VERSION:7", f"#EXT-X-TARGETDURATION:{SEGMENT_MS // 1000}",
             "#EXT-X-MEDIA-SEQUENCE:0", "#EXT-X-PLAYLIST-TYPE:VOD", '#EXT-X-MAP:URI="header"']
    for n in range(count):
        lines += [f"#EXTINF:{SEGMENT_MS / 1000 if n < count - 1 else last:.3f},", f"{n}.m4s"]
    return "\n".join([*lines, "#EXT-X-ENDLIST", ""])


async def _start_manifest(request: web.Request, build, content_type: str) -> web.Response:
    require_account(request)
    item = _item_from_path(request)
    if item is None or item.part_id is None:
        return html_error(400)
    session = _start_session(request, item)
    return web.Response(body=build(session).encode(), headers={"Content-Type": content_type})


@routes.get("/video/:/transcode/universal/start.mpd")
async def start_mpd(request: web.Request) -> web.Response:
    return await _start_manifest(request, build_mpd, "application/dash+xml")


@routes.get("/video/:/transcode/universal/start.m3u8")
async def start_m3u8(request: web.Request) -> web.Response:
    return await _start_manifest(request, build_hls, "application/vnd.apple.mpegurl")


def _segment_session(request: web.Request) -> Session:
    session = get_state(request).sessions.get(request.match_info["sid"])
    if session is None:
        raise web.HTTPNotFound()
    return session


def _stream_of(request: web.Request) -> media.Stream:
    stream = int(request.match_info.get("stream", 0))
    if stream >= len(STREAMS):
        raise web.HTTPNotFound(headers={"Content-Type": "text/html"})
    return media.stream(STREAMS[stream])


@routes.get(r"/video/:/transcode/universal/session/{sid}/{stream:\d+}/header")
async def segment_header(request: web.Request) -> web.Response:
    _segment_session(request)
    return web.Response(body=_stream_of(request).init, headers={"Content-Type": "video/mp4"})


@routes.get(r"/video/:/transcode/universal/session/{sid}/{stream:\d+}/index.m3u8")
async def hls_media_playlist(request: web.Request) -> web.Response:
    session = _segment_session(request)
    _stream_of(request)
    return web.Response(body=build_hls_media(session).encode(),
                        headers={"Content-Type": "application/vnd.apple.mpegurl"})


# DASH media segments start with a segment type box (ISO/IEC 23009-1 6.3.4.2), as the transcoder's do.
SEGMENT_TYPE = b"\x00\x00\x00\x18styp" + b"msdh\x00\x00\x00\x00msdhmsix"


async def _media_segment(request: web.Request) -> web.Response:
    session = _segment_session(request)
    stream = _stream_of(request)
    number = int(request.match_info["n"])
    if number >= math.ceil(session.duration / SEGMENT_MS):
        return html_error(404)
    return web.Response(body=SEGMENT_TYPE + stream.segment(number), headers={"Content-Type": "video/mp4"})


@routes.get(r"/video/:/transcode/universal/session/{sid}/{stream:\d+}/{n:\d+}.m4s")
async def segment(request: web.Request) -> web.Response:
    return await _media_segment(request)


@routes.get(r"/video/:/transcode/universal/session/{sid}/{n:\d+}.m4s")
async def segment_flat(request: web.Request) -> web.Response:
    """Single-stream form of the segment URL, as listed in the Plex API spec (the video stream here)."""
    return await _media_segment(request)


@routes.get("/video/:/transcode/universal/stop")
async def stop(request: web.Request) -> web.Response:
    require_account(request)
    get_state(request).sessions.pop(request.query.get("session", ""), None)
    return respond(request, container())


@routes.get("/video/:/transcode/universal/ping")
async def ping(request: web.Request) -> web.Response:
    require_account(request)
    return respond(request, container())


# --- play state ----------------------------------------------------------------------------------------
@routes.get("/:/timeline")
@routes.post("/:/timeline")
async def timeline(request: web.Request) -> web.Response:
    """Progress reports (~4/s while playing): move viewOffset; a stop past 90% marks the item played."""
    account = require_account(request)
    state = get_state(request)
    rating_key = request.query.get("ratingKey") or (request.query.get("key", "").rsplit("/", 1)[-1])
    item = ITEMS.get(rating_key or "")
    if item is None:
        return html_error(400) if not rating_key else html_error(404)
    try:
        position = int(float(request.query.get("time", "0")))
        duration = int(float(request.query.get("duration", item.duration)))
    except ValueError:
        return html_error(400)
    vs = state.view(account, item.rating_key)
    vs.last_viewed_at = int(time.time())
    if request.query.get("state") == "stopped" and duration and position >= duration * PLAYED_FRACTION:
        vs.view_count += 1
        vs.view_offset = 0
    else:
        vs.view_offset = position
    return respond(request, container())


def _keyed_item(request: web.Request) -> Item:
    item = ITEMS.get(request.query.get("key", "").rsplit("/", 1)[-1])
    if item is None:
        raise web.HTTPNotFound()
    return item


def _mark(item: Item, state, account, watched: bool) -> None:
    targets = leaves_of(item) or [item]
    for target in targets:
        vs = state.view(account, target.rating_key)
        vs.view_offset = 0
        vs.view_count = vs.view_count + 1 if watched else 0
        if watched:
            vs.last_viewed_at = int(time.time())


for _method in ("GET", "PUT"):
    @routes.route(_method, "/:/scrobble")
    async def scrobble(request: web.Request) -> web.Response:
        account = require_account(request)
        _mark(_keyed_item(request), get_state(request), account, watched=True)
        return web.Response(status=200, headers={"Content-Type": "text/html"})

    @routes.route(_method, "/:/unscrobble")
    async def unscrobble(request: web.Request) -> web.Response:
        account = require_account(request)
        _mark(_keyed_item(request), get_state(request), account, watched=False)
        return web.Response(status=200, headers={"Content-Type": "text/html"})

    @routes.route(_method, "/:/rate")
    async def rate(request: web.Request) -> web.Response:
        account = require_account(request)
        item = _keyed_item(request)
        try:
            rating = float(request.query["rating"])
        except (KeyError, ValueError):
            return html_error(400)
        if not -1 <= rating <= 10:
            return html_error(400)
        get_state(request).view(account, item.rating_key).user_rating = None if rating < 0 else rating
        return web.Response(status=200, headers={"Content-Type": "text/html"})


def _queue_response(request: web.Request, queue_id: int, keys: list[str], uri: str) -> web.Response:
    account = require_account(request)
    ctx = Ctx(get_state(request), account)
    nodes = []
    for n, key in enumerate(keys):
        node = item_node(ctx, ITEMS[key])
        node.attrs["playQueueItemID"] = queue_id * 100 + n
        nodes.append(node)
    first = ITEMS[keys[0]]
    attrs = container_attrs(None, playQueueID=queue_id, playQueueSelectedItemID=queue_id * 100,
                            playQueueSelectedItemOffset=0, playQueueSelectedMetadataItemID=first.rating_key,
                            playQueueShuffled=False, playQueueSourceURI=uri, playQueueTotalCount=len(keys),
                            playQueueVersion=1)
    attrs.pop("allowSync")
    return respond(request, container(attrs, nodes))


@routes.post("/playQueues")
async def create_play_queue(request: web.Request) -> web.Response:
    require_account(request)
    state = get_state(request)
    uri = request.query.get("uri", "")
    m = re.search(r"/library/metadata/(\d+)", unquote(uri))
    item = ITEMS.get(m.group(1)) if m else None
    if item is None:
        return html_error(400)
    keys = [i.rating_key for i in (leaves_of(item) or children_of(item) or [item])]
    queue_id = state.next_play_queue_id
    state.next_play_queue_id += 1
    state.play_queues[queue_id] = keys
    return _queue_response(request, queue_id, keys, uri)


@routes.get(r"/playQueues/{queue_id:\d+}")
async def get_play_queue(request: web.Request) -> web.Response:
    require_account(request)
    queue_id = int(request.match_info["queue_id"])
    keys = get_state(request).play_queues.get(queue_id)
    if keys is None:
        return html_error(404)
    uri = f"server://{data.PMS_MACHINE_ID}/com.plexapp.plugins.library/library/metadata/{keys[0]}"
    return _queue_response(request, queue_id, keys, uri)


__all__ = ["routes", "part_bytes", "iter_part", "parse_range", "build_mpd", "build_hls"]
