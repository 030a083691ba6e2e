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

import functools
import hashlib
import math
import re
import struct
import time
import uuid
from collections.abc import Iterator
from urllib.parse import unquote, urlsplit

from aiohttp import web

from . import data, images
from .common import param
from .mediacontainer import container, html_error, respond
from .plex_model import (
    ITEMS, ITEMS_BY_PART, PLAYED_FRACTION, Ctx, Item, Session, children_of, container_attrs, get_state,
    item_node, leaves_of, require_account, streams_of,
)

routes = web.RouteTableDef()

POSTER_SIZE = (1000, 1500)
ART_SIZE = (1920, 1080)
STILL_SIZE = (1280, 720)
SEGMENT_MS = 4000
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
BLOCK = 64 * 1024
WRITE_CHUNK = 256 * 1024
# Matroska files start with an EBML header; the rest of each 64 KiB block is a per-part pseudo-random
# pattern whose first 8 bytes hold the block's offset, so every range is distinguishable and checkable.
EBML_MAGIC = b"\x1a\x45\xdf\xa3\x9f\x42\x86\x81"
MP4_MAGIC = b"\x00\x00\x00\x20ftyp"  # the trailer extra is an .mp4


@functools.lru_cache(maxsize=64)
def _base_block(part_id: int) -> bytes:
    return hashlib.shake_256(f"fake-plex-part-{part_id}".encode()).digest(BLOCK)


def _block(part_id: int, index: int) -> bytes:
    if index == 0:
        item = ITEMS_BY_PART.get(part_id)
        head = MP4_MAGIC if item is not None and item.type == "clip" else EBML_MAGIC
    else:
        head = struct.pack(">Q", index * BLOCK)
    return head + _base_block(part_id)[8:]


def iter_part(part_id: int, start: int, end: int) -> Iterator[bytes]:
    """Yield the bytes `start..end` (inclusive) of a part in chunks of at most WRITE_CHUNK."""
    pos = start
    buf: list[bytes] = []
    buffered = 0
    while pos <= end:
        index, offset = divmod(pos, BLOCK)
        piece = _block(part_id, index)[offset:offset + (end - pos + 1)]
        buf.append(piece)
        buffered += len(piece)
        pos += len(piece)
        if buffered >= WRITE_CHUNK:
            yield b"".join(buf)
            buf, buffered = [], 0
    if buf:
        yield b"".join(buf)


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
    content_type = "video/mp4" if request.match_info["filename"].endswith(".mp4") else "video/x-matroska"
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
            for chunk in iter_part(part_id, start, end):
                await response.write(chunk)
        except ConnectionResetError:
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


def build_mpd(session: Session) -> str:
    sid, duration = session.session_id, session.duration
    template = ('<SegmentTemplate timescale="1000" duration="{seg}" initialization="session/{sid}/{n}/header" '
                'media="session/{sid}/{n}/$Number$.m4s" startNumber="0" />')
    return "\n".join([
        '<?xml version="1.0" encoding="UTF-8"?>',
        '<MPD xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" xmlns="urn:mpeg:dash:schema:mpd:2011" '
        'xsi:schemaLocation="urn:mpeg:DASH:schema:MPD:2011 DASH-MPD.xsd" '
        'profiles="urn:mpeg:dash:profile:isoff-live:2011" type="static" '
        f'mediaPresentationDuration="{_iso_duration(duration)}" maxSegmentDuration="PT{SEGMENT_MS // 1000}S" '
        'minBufferTime="PT4S">',
        f'<Period id="0" start="PT0S" duration="{_iso_duration(duration)}">',
        '<AdaptationSet id="0" segmentAlignment="true" maxWidth="1920" maxHeight="800" maxFrameRate="24000/1001">',
        '<Representation id="0" mimeType="video/mp4" codecs="avc1.640028" bandwidth="4211000" width="1920" '
        'height="800" frameRate="24000/1001" sar="1:1" startWithSAP="1">',
        template.format(seg=SEGMENT_MS, sid=sid, n=0),
        "</Representation>",
        "</AdaptationSet>",
        '<AdaptationSet id="1" segmentAlignment="true" lang="eng">',
        '<Representation id="1" mimeType="audio/mp4" codecs="mp4a.40.2" bandwidth="256000" '
        'audioSamplingRate="48000">',
        '<AudioChannelConfiguration schemeIdUri="urn:mpeg:dash:23003:3:audio_channel_configuration:2011" '
        'value="2" />',
        template.format(seg=SEGMENT_MS, sid=sid, n=1),
        "</Representation>",
        "</AdaptationSet>",
        "</Period>",
        "</MPD>",
        "",
    ])


@routes.get("/video/:/transcode/universal/start.mpd")
async def start_mpd(request: web.Request) -> web.Response:
    require_account(request)
    item = _item_from_path(request)
    if item is None or item.part_id is None:
        return html_error(400)
    session = _start_session(request, item)
    return web.Response(body=build_mpd(session).encode(), headers={"Content-Type": "application/dash+xml"})


def _box(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", 8 + len(payload)) + kind + payload


@functools.lru_cache(maxsize=256)
def init_segment(rating_key: str, stream: int) -> bytes:
    """An fMP4 initialisation segment: `ftyp` + `moov` (payload is filler, the box layout is real)."""
    filler = hashlib.shake_256(f"init-{rating_key}-{stream}".encode()).digest(1024)
    return _box(b"ftyp", b"iso6\x00\x00\x02\x00iso6dashmp41") + _box(b"moov", _box(b"mvhd", filler))


@functools.lru_cache(maxsize=256)
def media_segment(rating_key: str, stream: int, number: int) -> bytes:
    """A media segment: `styp` + `moof` + `mdat`; video ~192 KiB, audio ~16 KiB, deterministic."""
    size = 192 * 1024 if stream == 0 else 16 * 1024
    payload = hashlib.shake_256(f"seg-{rating_key}-{stream}-{number}".encode()).digest(size)
    moof = _box(b"moof", _box(b"mfhd", struct.pack(">II", 0, number + 1)))
    return _box(b"styp", b"msdh\x00\x00\x00\x00msdhmsix") + moof + _box(b"mdat", payload)


def _segment_session(request: web.Request) -> Session:
    session = get_state(request).sessions.get(request.match_info["sid"])
    if session is None:
        raise web.HTTPNotFound()
    return session


@routes.get(r"/video/:/transcode/universal/session/{sid}/{stream:\d+}/header")
async def segment_header(request: web.Request) -> web.Response:
    session = _segment_session(request)
    stream = int(request.match_info["stream"])
    if stream > 1:
        return html_error(404)
    return web.Response(body=init_segment(session.rating_key, stream), headers={"Content-Type": "video/mp4"})


async def _media_segment(request: web.Request, stream: int) -> web.Response:
    session = _segment_session(request)
    number = int(request.match_info["n"])
    if stream > 1 or number >= math.ceil(session.duration / SEGMENT_MS):
        return html_error(404)
    return web.Response(body=media_segment(session.rating_key, stream, number),
                        headers={"Content-Type": "video/mp4"})


@routes.get(r"/video/:/transcode/universal/session/{sid}/{stream:\d+}/{n:\d+}.m4s")
async def segment(request: web.Request) -> web.Response:
    return await _media_segment(request, int(request.match_info["stream"]))


@routes.get(r"/video/:/transcode/universal/session/{sid}/{n:\d+}.m4s")
async def segment_flat(request: web.Request) -> web.Response:
    """Single-stream form of the segment URL (muxed), as listed in the Plex API spec."""
    return await _media_segment(request, 0)


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


__all__ = ["routes", "part_bytes", "iter_part", "parse_range", "build_mpd", "EBML_MAGIC", "BLOCK"]
