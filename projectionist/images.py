"""Image work for the image cache (proxy_addons/image_cache.py): the Pillow transcoder and the
process pool that runs it, the disk store, and small pure helpers (Accept negotiation, checks of
source URLs that an upstream would fetch).

Pillow never runs in the proxy's process: a resize in a hook stalls every flow (see
shared/platform-notes.md). `transcode` runs in `ImagePool` worker processes (forked from a
forkserver that preloaded this module, so a restarted pool is ready in milliseconds); a job that
crashes its worker breaks the pool, which is replaced. Inputs are untrusted: the pixel cap is
checked from the header before anything is decoded, and every decoding error becomes a result,
never an exception in the worker.

The disk store is diskcache (SQLite index + files; a value is written to its own file and then
committed with its row, so a reader never sees half an image). Its byte cap is kept here, least
recently used first, so that every eviction is known by key (the SQLite mirror counts them).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import hashlib
import io
import ipaddress
import logging
import multiprocessing
import os
import signal
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

import diskcache

from .cache_store import SQLITE_MEMORY, Entry
from .disk_guard import DiskWrites
from .lifetime import die_with

log = logging.getLogger(__name__)

# --- the worker side: runs in pool processes ------------------------------------------------------

OK, TOO_LARGE, NOT_IMAGE = "ok", "too-large", "not-image"
CONTENT_TYPES = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp", "AVIF": "image/avif",
                 "GIF": "image/gif"}
_REENCODED_SOURCES = ("JPEG", "PNG")  # others (WebP, AVIF, GIF animations) are served as they are


@dataclass(frozen=True)
class Job:
    data: bytes
    target: str | None  # "webp" | "avif": try this format; None: keep the source's format
    max_width: int | None
    max_pixels: int
    webp_quality: int = 80
    avif_quality: int = 60
    jpeg_quality: int = 85


@dataclass(frozen=True)
class Result:
    outcome: str  # OK | TOO_LARGE | NOT_IMAGE
    body: bytes | None = None  # None: the source itself is the smallest acceptable answer
    content_type: str | None = None
    digest: str = ""  # of what is served (the body, or the source)
    width: int = 0
    height: int = 0
    source_format: str | None = None
    detail: str = ""


def _init_worker(nice: int, parent_pid: int | None = None) -> None:
    """Workers yield the CPU to the proxy: its event loop must not wait for a core because a
    transcode holds it. A raised nice value gives them a small share of a busy core (about a tenth
    against one normal process) and SCHED_BATCH stops their wake-ups preempting the proxy. Not
    SCHED_IDLE: on a host kept busy by something else (Plex transcoding, say) an idle-class worker
    never runs, and every image miss would time out."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the proxy shuts its pool down itself
    if parent_pid is not None:
        die_with(parent_pid)
    if nice:
        try:
            os.nice(nice)
        except OSError:
            pass
        try:
            os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
        except (AttributeError, OSError):
            pass


def capabilities() -> dict[str, bool]:
    """Which target formats the installed Pillow can write (asked once, from a worker)."""
    from PIL import features

    return {"webp": bool(features.check("webp")), "avif": bool(features.check("avif"))}


def transcode(job: Job) -> Result:
    """Decode, cap the width, re-encode; keep whichever acceptable body is smallest."""
    try:
        return _transcode(job)
    except MemoryError:
        return Result(NOT_IMAGE, detail="out of memory while decoding")
    except Exception as exc:  # untrusted input: whatever Pillow raises is a bad image, not a crash
        return Result(NOT_IMAGE, detail=f"{type(exc).__name__}: {exc}"[:200])


def _transcode(job: Job) -> Result:
    from PIL import Image, ImageOps, UnidentifiedImageError

    Image.MAX_IMAGE_PIXELS = None  # checked below, from the header, with a clearer message
    try:
        im = Image.open(io.BytesIO(job.data))  # reads the header only
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        return Result(NOT_IMAGE, detail=f"{type(exc).__name__}: {exc}"[:200])
    width, height = im.size
    source_format = im.format
    if width * height > job.max_pixels:
        return Result(TOO_LARGE, width=width, height=height, source_format=source_format,
                      detail=f"{width}x{height} pixels is over the {job.max_pixels} pixel cap")
    source = Result(OK, None, CONTENT_TYPES.get(source_format or ""), _digest(job.data), width, height,
                    source_format)
    if source_format not in _REENCODED_SOURCES:
        im.verify()  # decodable at all? (raises on garbage)
        return source
    resize = job.max_width is not None and width > job.max_width
    if not resize and not job.target:
        return source  # nothing to do: served as it came, undecoded
    if resize and source_format == "JPEG":
        # DCT scaling: decode straight at the smallest power-of-two scale still >= the target.
        im.draft("RGB", (job.max_width, max(1, height * job.max_width // width)))
    im.load()  # a truncated or corrupt body raises here
    if im.getexif().get(0x0112, 1) != 1:
        im = ImageOps.exif_transpose(im)
    has_alpha = im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info)
    if im.mode not in ("RGB", "RGBA", "L"):
        im = im.convert("RGBA" if has_alpha else "RGB")
    out_w, out_h = width, height
    if resize:
        out_w, out_h = job.max_width, max(1, round(height * job.max_width / width))
        im = im.resize((out_w, out_h), Image.Resampling.LANCZOS)
    icc = im.info.get("icc_profile")
    candidates: list[tuple[bytes | None, str]] = []
    if resize:  # the cap is a must: the source itself is not an option
        candidates.append((_encode(im, source_format, job, icc), CONTENT_TYPES[source_format]))
    else:
        candidates.append((None, CONTENT_TYPES[source_format]))
    if job.target:
        candidates.append((_encode(im, job.target.upper(), job, icc), CONTENT_TYPES[job.target.upper()]))
    body, content_type = min(candidates, key=lambda c: len(job.data) if c[0] is None else len(c[0]))
    return Result(OK, body, content_type, _digest(job.data if body is None else body), out_w, out_h,
                  source_format, detail="resized" if resize else "")


def _encode(im, fmt: str, job: Job, icc: bytes | None) -> bytes:
    out = io.BytesIO()
    extra = {"icc_profile": icc} if icc else {}
    if fmt == "JPEG":
        if im.mode not in ("RGB", "L"):
            im = im.convert("RGB")
        im.save(out, "JPEG", quality=job.jpeg_quality, optimize=True, **extra)
    elif fmt == "PNG":
        im.save(out, "PNG", compress_level=6, **extra)
    elif fmt == "WEBP":
        im.save(out, "WEBP", quality=job.webp_quality, method=4, **extra)
    elif fmt == "AVIF":
        im.save(out, "AVIF", quality=job.avif_quality, speed=8, **extra)
    else:
        raise ValueError(f"cannot encode {fmt}")
    return out.getvalue()


def digest(data: bytes) -> str:
    """The ETag value of a body (what the workers compute for theirs)."""
    return _digest(data)


def _digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=12).hexdigest()


def _crash_for_tests(code: int = 1) -> None:
    """Ends the worker process abruptly, as a segfault in a decoder would (tests only)."""
    os._exit(code)


# --- the pool: runs jobs from the event loop -------------------------------------------------------

class WorkerCrashed(Exception):
    """A worker process died during the job (twice, the second time after a fresh pool)."""


class ImagePool:
    """A process pool with at most `workers` jobs at once, replaced when a worker dies.

    Workers are forked from a forkserver that preloaded this module (never from the proxy, whose
    threads a fork would copy mid-operation) and run at a lower priority than the proxy.
    """

    def __init__(self, workers: int = 2, timeout: float = 30.0, nice: int = 10,
                 max_tasks_per_child: int | None = 2000) -> None:
        self.workers = workers
        self.timeout = timeout
        self.nice = nice
        self.max_tasks_per_child = max_tasks_per_child
        self.restarts = 0
        self._executor: concurrent.futures.ProcessPoolExecutor | None = None
        self._semaphore: asyncio.Semaphore | None = None
        self._starting: asyncio.Lock | None = None
        self._closed = False

    def _new_executor(self) -> concurrent.futures.ProcessPoolExecutor:
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload([__name__])
        executor = concurrent.futures.ProcessPoolExecutor(
            self.workers, mp_context=context, initializer=_init_worker, initargs=(self.nice, os.getpid()),
            max_tasks_per_child=self.max_tasks_per_child)
        # Start every worker now (blocking: this runs in a thread), so no request pays for it.
        for future in [executor.submit(os.getpid) for _ in range(self.workers)]:
            future.result(60)
        return executor

    async def start(self) -> ImagePool:
        if self._semaphore is None:
            self._semaphore = asyncio.Semaphore(self.workers)
            self._starting = asyncio.Lock()
        async with self._starting:
            if self._executor is None and not self._closed:
                self._executor = await asyncio.get_running_loop().run_in_executor(None, self._new_executor)
        return self

    async def run(self, fn: Callable, *args):
        """`fn(*args)` in a worker. Raises WorkerCrashed, TimeoutError (the pool is then replaced)."""
        if self._semaphore is None or self._executor is None:
            await self.start()
        async with self._semaphore:
            for attempt in (1, 2):
                if self._executor is None:
                    await self.start()
                if self._closed:
                    raise WorkerCrashed("the image pool is shut down")
                executor = self._executor
                try:
                    future = executor.submit(fn, *args)
                    return await asyncio.wait_for(asyncio.wrap_future(future), self.timeout)
                except BrokenProcessPool:
                    # A worker died: every job it shared the pool with failed too. Retry once on a
                    # fresh pool; the job that kills its worker fails twice.
                    self._replace(executor, "a worker process died")
                    if attempt == 2:
                        raise WorkerCrashed("the image worker died twice on this job") from None
                except TimeoutError:
                    self._replace(executor, f"a job ran over {self.timeout:g}s", kill=True)
                    raise

    def saturated(self) -> bool:
        """Every worker busy: a job submitted now would wait for CPU work queued before it."""
        return self._semaphore is not None and self._semaphore.locked()

    def _replace(self, executor: concurrent.futures.ProcessPoolExecutor, why: str, kill: bool = False) -> None:
        if self._executor is not executor:
            return  # someone replaced it already
        self._executor = None
        self.restarts += 1
        log.warning("image pool restarted: %s", why)
        _shutdown(executor, kill)

    def pids(self) -> list[int]:
        executor = self._executor
        return list(getattr(executor, "_processes", {}) or {}) if executor else []

    def shutdown(self) -> None:
        self._closed = True
        if self._executor is not None:
            _shutdown(self._executor, kill=True)
            self._executor = None


def _shutdown(executor: concurrent.futures.ProcessPoolExecutor, kill: bool) -> None:
    processes = list((getattr(executor, "_processes", None) or {}).values())
    executor.shutdown(wait=False, cancel_futures=True)
    if kill:
        for process in processes:
            try:
                process.kill()
            except (OSError, ValueError, AttributeError):
                pass


# --- entries and the disk store ---------------------------------------------------------------------

@dataclass
class ImageEntry(Entry):
    """A stored image variant. `status`/`headers` of Entry are unused (always 200, headers built per
    answer); `source_size` is what the upstream sent, so savings are known per answer."""

    content_type: str = "application/octet-stream"
    etag: str = ""
    source_size: int = 0
    source_etag: str | None = None  # the upstream's, for conditional refreshes
    immutable: bool = False
    width: int = 0
    height: int = 0
    body_size: int = 0  # of the body, in the metadata stored without it
    provisional: bool = False  # the upstream's original, stored while the encoders were busy

    @property
    def size(self) -> int:
        return max(len(self.body), self.body_size) + 200

    @property
    def expires_at(self) -> float:
        return self.stored_at + self.ttl + max(self.stale_while_revalidate, self.stale_if_error)


class ImageStore:
    """diskcache bounded in bytes, least recently used evicted first. Blocking: call from threads.

    Each image is two items written in one transaction: the body (raw bytes, a file of its own
    when large) and its metadata (small, read at start-up to rebuild the LRU index).
    """

    def __init__(self, directory: Path, max_bytes: int) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        # diskcache's own culling is only a backstop (its volume counts SQLite pages too).
        self.cache = diskcache.Cache(str(directory), size_limit=int(max_bytes * 1.5) + 2**24,
                                     eviction_policy="least-recently-stored", cull_limit=10, **SQLITE_MEMORY)
        self.max_bytes = max_bytes
        self.bytes = 0
        self.evictions = 0
        self.writes = DiskWrites(f"image cache {directory}")
        self._lock = threading.Lock()
        # key -> (size, expires_at, route, partition), least recently used first
        self._lru: OrderedDict[str, tuple[int, float, str, str]] = OrderedDict()
        self._load()

    def _load(self) -> None:
        found = []
        for item in self.cache.iterkeys():
            if isinstance(item, tuple) and len(item) == 2 and item[0] == "m":
                meta = self.cache.get(item)
                if isinstance(meta, ImageEntry):
                    found.append((meta.stored_at, item[1], meta))
        for _, key, meta in sorted(found, key=lambda f: f[0]):
            self._lru[key] = (meta.size, meta.expires_at, meta.route, meta.partition)
            self.bytes += meta.size

    def index(self) -> list[tuple[str, str, str]]:
        """(key, route, partition) of every stored entry."""
        with self._lock:
            return [(k, v[2], v[3]) for k, v in self._lru.items()]

    def get(self, key: str) -> ImageEntry | None:
        meta = self.cache.get(("m", key))
        if meta is None:
            return None
        body = self.cache.get(("b", key))
        if body is None:  # culled by the backstop: the entry is gone
            self.delete([key])
            return None
        self.touch(key)
        return dataclasses.replace(meta, body=bytes(body))

    def touch(self, key: str) -> None:
        with self._lock:
            if key in self._lru:
                self._lru.move_to_end(key)

    def put(self, key: str, entry: ImageEntry) -> list[str]:
        """Store; returns the keys evicted to stay under the cap (never the one just stored)."""
        if entry.size > self.max_bytes:
            return []  # would evict everything else and still not fit
        def write() -> None:
            with self.cache.transact():
                self.cache.set(("b", key), entry.body)
                self.cache.set(("m", key), dataclasses.replace(entry, body=b"", body_size=len(entry.body)))

        if not self.writes.attempt(write):  # disk full or read-only: served, not stored
            return []
        with self._lock:
            old = self._lru.pop(key, None)
            if old is not None:
                self.bytes -= old[0]
            self._lru[key] = (entry.size, entry.expires_at, entry.route, entry.partition)
            self.bytes += entry.size
            victims = self._over_cap(keep=key)
        self._remove(victims)
        self.evictions += len(victims)
        return victims

    def set_max_bytes(self, max_bytes: int) -> list[str]:
        with self._lock:
            self.max_bytes = max_bytes
            victims = self._over_cap()
        self._remove(victims)
        self.evictions += len(victims)
        return victims

    def _over_cap(self, keep: str | None = None) -> list[str]:
        if self.bytes <= self.max_bytes:
            return []  # the common case: no copy of the index under the lock hits also take
        victims = []
        for victim, (size, *_rest) in list(self._lru.items()):
            if self.bytes <= self.max_bytes:
                break
            if victim == keep:
                continue
            del self._lru[victim]
            self.bytes -= size
            victims.append(victim)
        return victims

    def expired(self, now: float) -> tuple[list[str], int]:
        """Remove the entries past their last usable moment; returns their keys and bytes freed."""
        with self._lock:
            gone = [(k, v[0]) for k, v in self._lru.items() if v[1] <= now]
            for key, size in gone:
                del self._lru[key]
                self.bytes -= size
        self._remove([k for k, _ in gone])
        return [k for k, _ in gone], sum(size for _, size in gone)

    def delete(self, keys: Iterable[str]) -> None:
        keys = list(keys)
        with self._lock:
            for key in keys:
                old = self._lru.pop(key, None)
                if old is not None:
                    self.bytes -= old[0]
        self._remove(keys)

    def _remove(self, keys: list[str]) -> None:
        for key in keys:
            with self.cache.transact():
                self.cache.delete(("m", key))
                self.cache.delete(("b", key))

    def keys(self) -> list[str]:
        with self._lock:
            return list(self._lru)

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return key in self._lru

    def close(self) -> None:
        self.cache.close()


# --- pure helpers ------------------------------------------------------------------------------------

def negotiate(accept: str | None, offered: Sequence[str]) -> str | None:
    """The first of `offered` ("webp", "avif") that `Accept` names explicitly with q > 0.

    Wildcards do not count: `*/*` (curl, fetch(), most libraries) gets the source's own format,
    only clients that say they decode WebP/AVIF (every browser's <img>) get it.
    """
    if not accept or not offered:
        return None
    quality: dict[str, float] = {}
    for part in accept.lower().split(","):
        media_type, *params = part.strip().split(";")
        q = 1.0
        for param in params:
            name, _, value = param.strip().partition("=")
            if name.strip() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        quality[media_type.strip()] = max(q, quality.get(media_type.strip(), 0.0))
    return next((fmt for fmt in offered if quality.get(f"image/{fmt}", 0.0) > 0), None)


def etag_matches(if_none_match: str, etag: str) -> bool:
    """RFC 9110 weak comparison of an `If-None-Match` list against our ETag."""
    if if_none_match.strip() == "*":
        return True
    ours = etag.removeprefix("W/")
    return any(tag.strip().removeprefix("W/") == ours for tag in if_none_match.split(","))


def check_source_url(value: str, named_host: Callable[[str], str | None],
                     plex_servers: set[tuple[str, int]]) -> str | None:
    """Why an upstream must not be asked to fetch `value` (None: it may).

    Allowed: a path on the server itself ("/library/..."), a declared Plex server (host and port
    of its base_url or override; private addresses included), or an http(s) URL whose host is
    named in rules.yaml and is not a loopback, link-local, private or otherwise non-global IP.
    Servers may percent-decode the value again: every decoding of it must pass.
    """
    stages = [value.strip()]
    while len(stages) < 5 and (decoded := unquote(stages[-1])) != stages[-1]:
        stages.append(decoded.strip())
    if len(stages) == 5:
        return "the image URL is encoded too many times"
    for stage in stages:
        if "\\" in stage or any(ord(c) < 0x20 or ord(c) == 0x7f for c in stage):
            return "the image URL contains a backslash or a control character"
        parts = urlsplit(stage)
        if parts.scheme or parts.netloc or stage.startswith("//"):
            if reason := _check_url(parts, named_host, plex_servers):
                return reason
    final = stages[-1]
    if final and not urlsplit(final).scheme and not final.startswith("/"):
        return "the image URL is neither a server path nor an http(s) URL"
    return None


def _check_url(parts, named_host, plex_servers) -> str | None:
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        return "the image URL is neither a server path nor an http(s) URL"
    host = parts.hostname.lower().rstrip(".")
    try:
        port = parts.port or (443 if parts.scheme.lower() == "https" else 80)
    except ValueError:
        return "the image URL has an invalid port"
    if (host, port) in plex_servers:
        return None
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        address = None
    if address is not None and not address.is_global:
        return f"the image URL points at a non-public address ({host}) that is not a declared Plex server"
    if address is not None or named_host(host) is None:
        return f"the image URL's host {host} is not named in rules.yaml"
    return None
