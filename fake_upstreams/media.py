"""Real, decodable media for the fake Plex: the committed 12 s fragmented MP4s (see make_media.py), looped.

Each file is an init segment (`ftyp` + `moov`) and fragments (`moof` + `mdat`) of 4 s each. Fragment `n` of
an endless stream is fragment `n % N` of the file with its `mfhd` sequence number and every track's `tfdt`
(base media decode time) moved on by whole loops, so a player sees one continuous timeline:

- DASH/HLS: stream 0 = video.mp4, stream 1 = audio.mp4; `segment(stream, n)` for `n.m4s`.
- Direct play: `Part(size)` is muxed.mp4's init followed by its fragments looped up to `size` bytes (the
  last one cut short, as a download that ends there would be); any byte range is computed, never stored.
"""

from __future__ import annotations

import bisect
import functools
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

MEDIA_DIR = Path(__file__).resolve().parent / "media"
SEGMENT_SECONDS = 4
CLIP_SECONDS = 12  # make_media.SECONDS
# What make_media.py encodes (for manifests).
WIDTH, HEIGHT, FRAME_RATE, SAMPLE_RATE = 426, 240, 25, 32000
VIDEO_BANDWIDTH, AUDIO_BANDWIDTH = 120_000, 32_000


def _boxes(data: bytes, start: int = 0, end: int | None = None) -> Iterator[tuple[bytes, int, int]]:
    """(type, offset, size) of the ISO-BMFF boxes in data[start:end]."""
    pos, end = start, len(data) if end is None else end
    while pos + 8 <= end:
        size, kind = struct.unpack_from(">I4s", data, pos)
        if size < 8:
            raise ValueError(f"unsupported box size {size} at {pos}")
        yield kind, pos, size
        pos += size


def _child(data: bytes, kind: bytes, start: int, end: int) -> tuple[int, int]:
    for k, pos, size in _boxes(data, start, end):
        if k == kind:
            return pos, size
    raise ValueError(f"no {kind!r} box")


@dataclass(frozen=True)
class _Fragment:
    data: bytes
    seq_offset: int  # of mfhd's sequence_number
    tfdts: tuple[tuple[int, int, int, int], ...]  # (offset of the value, version, track id, value)


class Stream:
    """One committed file: its init segment and fragments, loopable without end."""

    def __init__(self, path: Path) -> None:
        data = path.read_bytes()
        self.init = b""
        self.timescales: dict[int, int] = {}  # track id -> mdhd timescale
        fragments: list[_Fragment] = []
        moof: tuple[int, int] | None = None
        for kind, pos, size in _boxes(data):
            if kind in (b"ftyp", b"moov"):
                self.init += data[pos:pos + size]
                if kind == b"moov":
                    self._read_tracks(data, pos, size)
            elif kind == b"moof":
                moof = (pos, size)
            elif kind == b"mdat" and moof is not None:
                fragments.append(self._fragment(data, moof[0], pos + size))
                moof = None
        # Only whole segments of the clip loop: the AAC encoder's flush (a last, short fragment) would
        # overlap the next loop.
        self.fragments = fragments[:self._full_segments(fragments)]
        if not self.fragments:
            raise ValueError(f"{path}: no fragments")
        self.loop_seconds = len(self.fragments) * SEGMENT_SECONDS
        self.codec = self._codec(data)

    def _read_tracks(self, data: bytes, pos: int, size: int) -> None:
        for kind, tpos, tsize in _boxes(data, pos + 8, pos + size):
            if kind != b"trak":
                continue
            tkhd, _ = _child(data, b"tkhd", tpos + 8, tpos + tsize)
            version = data[tkhd + 8]
            track_id = struct.unpack_from(">I", data, tkhd + (28 if version else 20))[0]
            mdia, mdia_size = _child(data, b"mdia", tpos + 8, tpos + tsize)
            mdhd, _ = _child(data, b"mdhd", mdia + 8, mdia + mdia_size)
            version = data[mdhd + 8]
            self.timescales[track_id] = struct.unpack_from(">I", data, mdhd + (28 if version else 20))[0]

    @staticmethod
    def _fragment(data: bytes, start: int, end: int) -> _Fragment:
        moof_size = struct.unpack_from(">I", data, start)[0]
        seq_offset, tfdts = -1, []
        for kind, pos, size in _boxes(data, start + 8, start + moof_size):
            if kind == b"mfhd":
                seq_offset = pos + 12 - start
            elif kind == b"traf":
                tfhd, _ = _child(data, b"tfhd", pos + 8, pos + size)
                track_id = struct.unpack_from(">I", data, tfhd + 12)[0]
                tfdt, _ = _child(data, b"tfdt", pos + 8, pos + size)
                version = data[tfdt + 8]
                value = struct.unpack_from(">Q" if version else ">I", data, tfdt + 12)[0]
                tfdts.append((tfdt + 12 - start, version, track_id, value))
        return _Fragment(data[start:end], seq_offset, tuple(tfdts))

    def _full_segments(self, fragments: list[_Fragment]) -> int:
        count = 0
        for fragment in fragments[:CLIP_SECONDS // SEGMENT_SECONDS]:
            _off, _v, track_id, value = fragment.tfdts[0]
            if value != count * SEGMENT_SECONDS * self.timescales[track_id]:
                break
            count += 1
        return count

    @staticmethod
    def _codec(data: bytes) -> str:
        avcc = data.find(b"avcC")
        if avcc >= 0:  # profile, compatibility, level: the RFC 6381 string
            return "avc1." + data[avcc + 5:avcc + 8].hex().upper()
        return "mp4a.40.2"

    @functools.lru_cache(maxsize=64)
    def segment(self, number: int) -> bytes:
        """Fragment `number` of the endless stream (0-based)."""
        loop, index = divmod(number, len(self.fragments))
        fragment = self.fragments[index]
        out = bytearray(fragment.data)
        struct.pack_into(">I", out, fragment.seq_offset, number + 1)
        for offset, version, track_id, value in fragment.tfdts:
            shifted = value + loop * self.loop_seconds * self.timescales[track_id]
            struct.pack_into(">Q" if version else ">I", out, offset, shifted & (2 ** (64 if version else 32) - 1))
        return bytes(out)


@functools.cache
def stream(name: str) -> Stream:
    """`video`, `audio` or `muxed`."""
    return Stream(MEDIA_DIR / f"{name}.mp4")


class Part:
    """A direct-play file of `size` bytes: muxed.mp4's init, then its fragments looped."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.media = stream("muxed")
        self._ends = []  # cumulative end offset of each fragment within one loop
        total = 0
        for fragment in self.media.fragments:
            total += len(fragment.data)
            self._ends.append(total)
        self._loop_bytes = total

    def iter_bytes(self, start: int, end: int, chunk: int = 256 * 1024) -> Iterator[bytes]:
        """Bytes start..end (inclusive, within the size), in pieces of about `chunk`."""
        end = min(end, self.size - 1)
        init = self.media.init
        pos, pending = start, []
        while pos <= end:
            if pos < len(init):
                piece = init[pos:end + 1]
            else:
                loop, within = divmod(pos - len(init), self._loop_bytes)
                index = bisect.bisect_right(self._ends, within)
                begin = self._ends[index] - len(self.media.fragments[index].data)
                data = self.media.segment(loop * len(self.media.fragments) + index)
                piece = data[within - begin:within - begin + (end - pos + 1)]
            pending.append(piece)
            pos += len(piece)
            if sum(map(len, pending)) >= chunk:
                yield b"".join(pending)
                pending = []
        if pending:
            yield b"".join(pending)


__all__ = ["Stream", "Part", "stream", "SEGMENT_SECONDS"]
