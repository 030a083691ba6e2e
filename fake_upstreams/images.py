"""Fake image.tmdb.org, plus the JPEG/PNG renderer the fake PMS uses for thumbs and transcodes.

Mirrors the TMDB image CDN: `GET /t/p/{size}/{file}` with size one of the configured poster/backdrop/
profile/still/logo sizes (anything else: 404), `.jpg` answered as `image/jpeg` and `.png` as `image/png`,
long-lived caching headers (`Cache-Control: max-age=31536000`, `ETag`, `Last-Modified`, 304 on
`If-None-Match`) and `Access-Control-Allow-Origin: *`. No API key is needed. Images are generated with
Pillow, deterministic per file name, with gradient + noise texture so they re-encode like real artwork.

Test hooks: `/t/p/{size}/bomb.png` is a valid, ~100 kB PNG declaring 30000x30000 pixels (a decompression
bomb) and `/t/p/{size}/notanimage.jpg` is an HTML body labelled `image/jpeg`.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import io
import struct
import threading
import zlib
from collections import OrderedDict
from email.utils import formatdate

from aiohttp import web
from PIL import Image, ImageDraw, ImageFilter

from . import data
from .common import CorsPolicy, FakeState, build_app

POSTER_SIZES = ("w92", "w154", "w185", "w342", "w500", "w780", "original")
BACKDROP_SIZES = ("w300", "w780", "w1280", "original")
PROFILE_SIZES = ("w45", "w185", "h632", "original")
STILL_SIZES = ("w92", "w185", "w300", "original")
LOGO_SIZES = ("w45", "w92", "w154", "w185", "w300", "w500", "original")
ALL_SIZES = frozenset(POSTER_SIZES + BACKDROP_SIZES + PROFILE_SIZES + STILL_SIZES + LOGO_SIZES)

# width / height and the pixel size of "original", per artwork kind
ASPECT = {"poster": 2 / 3, "backdrop": 16 / 9, "profile": 2 / 3, "still": 16 / 9, "logo": 10 / 3}
ORIGINAL = {"poster": (2000, 3000), "backdrop": (1920, 1080), "profile": (1000, 1500),
            "still": (1920, 1080), "logo": (1000, 300)}

BOMB_NAME = "bomb.png"
BOMB_SIDE = 30000
NOT_AN_IMAGE_NAME = "notanimage.jpg"
NOT_AN_IMAGE_BODY = (b"<!DOCTYPE html><html><head><title>502 Bad Gateway</title></head>"
                     b"<body><h1>502 Bad Gateway</h1><p>origin returned an error page</p></body></html>")


def _known_kinds() -> dict[str, str]:
    kinds: dict[str, str] = {}
    for m in data.MOVIES:
        kinds[m.poster] = "poster"
        kinds[m.backdrop] = "backdrop"
    for s in data.SHOWS:
        kinds[s.poster] = "poster"
        kinds[s.backdrop] = "backdrop"
        for season in s.seasons:
            kinds[season.poster_path] = "poster"
            for ep in season.episodes:
                kinds[ep.still_path] = "still"
    for p in data.PEOPLE.values():
        kinds[p.profile_path] = "profile"
    return {path.lstrip("/"): kind for path, kind in kinds.items()}


KNOWN_KINDS = _known_kinds()


def kind_for(file_name: str, size: str) -> str:
    """Artwork kind of a file: known dataset files keep theirs; others are guessed from the size."""
    if file_name in KNOWN_KINDS:
        return KNOWN_KINDS[file_name]
    if file_name.endswith(".png"):
        return "logo"
    if size in ("w300", "w780", "w1280"):
        return "backdrop"
    if size in ("w45", "h632"):
        return "profile"
    return "poster"


def dimensions(kind: str, size: str) -> tuple[int, int]:
    if size == "original":
        return ORIGINAL[kind]
    number = int(size[1:])
    if size.startswith("h"):
        return max(1, round(number * ASPECT[kind])), number
    return number, max(1, round(number / ASPECT[kind]))


class _ByteBudgetCache:
    """A small thread-safe LRU bounded by total bytes (renders happen in worker threads)."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self._items: OrderedDict[tuple, bytes] = OrderedDict()
        self._size = 0
        self._lock = threading.Lock()

    def get(self, key: tuple) -> bytes | None:
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key: tuple, value: bytes) -> None:
        with self._lock:
            if key in self._items:
                return
            self._items[key] = value
            self._size += len(value)
            while self._size > self.budget and len(self._items) > 1:
                _, dropped = self._items.popitem(last=False)
                self._size -= len(dropped)


CACHE = _ByteBudgetCache(48 * 1024 * 1024)


def render(seed: str, width: int, height: int, fmt: str = "JPEG") -> bytes:
    """Deterministic artwork for `seed` (cached): same seed and size, same bytes."""
    key = (seed, width, height, fmt)
    body = CACHE.get(key)
    if body is None:
        body = _draw(seed, width, height, fmt)
        CACHE.put(key, body)
    return body


def _draw(seed: str, width: int, height: int, fmt: str) -> bytes:
    """A two-colour gradient, soft shapes and film-grain noise: compresses like real artwork."""
    digest = hashlib.sha256(seed.encode()).digest()
    top, bottom = tuple(digest[0:3]), tuple(digest[3:6])
    size = (width, height)
    mask = Image.linear_gradient("L").resize(size)
    img = Image.composite(Image.new("RGB", size, bottom), Image.new("RGB", size, top), mask)
    draw = ImageDraw.Draw(img)
    for i in range(5):
        b = digest[6 + i * 5: 11 + i * 5]
        cx, cy = b[0] * width // 255, b[1] * height // 255
        r = (b[2] % 40 + 10) * min(width, height) // 100
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=(b[3], b[4], b[2]))
    img = img.filter(ImageFilter.GaussianBlur(max(1, min(width, height) // 40)))
    # Grain at half resolution, scaled up: real-photo-like entropy without the cost of full-size noise.
    grain_size = (max(1, width // 2), max(1, height // 2))
    grain = Image.effect_noise(grain_size, 48).resize(size).convert("RGB")
    img = Image.blend(img, grain, 0.18)
    out = io.BytesIO()
    if fmt == "PNG":
        img.save(out, "PNG", optimize=False, compress_level=6)
    else:
        img.save(out, "JPEG", quality=86, optimize=False)
    return out.getvalue()


async def render_async(seed: str, width: int, height: int, fmt: str = "JPEG") -> bytes:
    """Render off the event loop: a 2000x3000 poster takes a noticeable fraction of a second."""
    return await asyncio.to_thread(render, seed, width, height, fmt)


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


@functools.cache
def bomb_png() -> bytes:
    """A valid 1-bit 30000x30000 PNG (900 Mpx) whose all-zero rows compress to about 100 kB."""
    row = b"\x00" * (1 + (BOMB_SIDE + 7) // 8)  # filter byte + packed bits
    comp = zlib.compressobj(9)
    idat = b"".join(comp.compress(row) for _ in range(BOMB_SIDE)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", BOMB_SIDE, BOMB_SIDE, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def cdn_headers(body: bytes, seed: str, content_type: str) -> dict[str, str]:
    digest = hashlib.md5(body).hexdigest()
    modified = 1420070400 + int.from_bytes(hashlib.sha1(seed.encode()).digest()[:4], "big") % 300_000_000
    return {
        "Content-Type": content_type,
        "ETag": f'"{digest}"',
        "Last-Modified": formatdate(modified, usegmt=True),
        "Cache-Control": "max-age=31536000",
        "Accept-Ranges": "bytes",
    }


def image_response(request: web.Request, body: bytes, headers: dict[str, str]) -> web.Response:
    if request.headers.get("If-None-Match") == headers["ETag"]:
        return web.Response(status=304, headers={k: v for k, v in headers.items() if k != "Content-Type"})
    return web.Response(body=body, headers=headers)


class ImagesState(FakeState):
    name = "tmdb_images"


STATE_KEY = web.AppKey("fake_tmdb_images_state", ImagesState)
routes = web.RouteTableDef()


def _not_found(request: web.Request) -> web.Response:
    return web.Response(status=404, text="Not Found", headers={"Content-Type": "text/plain"})


@routes.get("/t/p/{size}/{file}")
async def tmdb_image(request: web.Request) -> web.StreamResponse:
    size, file_name = request.match_info["size"], request.match_info["file"]
    if size not in ALL_SIZES:
        return _not_found(request)
    if file_name == BOMB_NAME:
        body = await asyncio.to_thread(bomb_png)
        return image_response(request, body, cdn_headers(body, file_name, "image/png"))
    if file_name == NOT_AN_IMAGE_NAME:
        return web.Response(body=NOT_AN_IMAGE_BODY, headers={"Content-Type": "image/jpeg"})
    stem, dot, ext = file_name.rpartition(".")
    if not dot or not stem or ext.lower() not in ("jpg", "jpeg", "png"):
        return _not_found(request)
    fmt, content_type = ("PNG", "image/png") if ext.lower() == "png" else ("JPEG", "image/jpeg")
    width, height = dimensions(kind_for(file_name, size), size)
    body = await render_async(file_name, width, height, fmt)
    return image_response(request, body, cdn_headers(body, file_name, content_type))


def create_app(state: ImagesState | None = None) -> web.Application:
    return build_app(
        state or ImagesState(), STATE_KEY, routes,
        cors=CorsPolicy(echo_origin=False, allow_methods="GET, HEAD, OPTIONS"),
        not_found=_not_found,
    )
