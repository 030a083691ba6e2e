"""Analytics beyond the usage rows: viewing history from the player's playback traffic, and the
latency-percentile SQL the dashboard's canned queries use.

Viewing history: the player reports progress with `/:/timeline?ratingKey=…&time=…&duration=…&state=…`
(about four times a second while playing) and marks items watched with `/:/scrobble`. The proxy
addon (`proxy_addons/viewing_history.py`) only queues what it saw; `PlaybackWriter`'s thread turns
the reports into play sessions (`plays`: who, what, when, how long watched/paused, how far) and the
metadata answers that pass through into titles (`media_items`), committing in batches.

Sessions: one open play per (user, client). A report for another item, a `stopped` state or more
than `SESSION_GAP` seconds of silence closes it. Time between two reports counts as watched (or
paused) time of the earlier report's state, at most `MAX_STEP` seconds, so a player that vanished
does not keep accumulating. An item reported past `WATCHED_FRACTION` of its duration is watched.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sqlite3
import time
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass
from pathlib import Path

from .store import LATENCY_BOUNDS_MS, UsageWriter

log = logging.getLogger(__name__)

SESSION_GAP = 30 * 60  # s of silence after which a play is over
MAX_STEP = 120  # s: longer gaps between two reports count as nothing
WATCHED_FRACTION = 0.9
MAX_METADATA_BYTES = 2 * 1024 * 1024
PLAYING_STATES = ("playing", "buffering")


# --- what the addon queues -------------------------------------------------------------------------

@dataclass(slots=True)
class PlaybackReport:
    """One timeline/scrobble/unscrobble request that reached Plex and was answered < 400."""

    ts: float
    kind: str  # timeline | scrobble | unscrobble
    rating_key: str
    user_id: int | None = None
    client: str | None = None  # X-Plex-Client-Identifier: hashed before it is stored
    player: str | None = None  # X-Plex-Product (/ device name): shown as is
    state: str | None = None
    position_ms: int | None = None
    duration_ms: int | None = None
    applied: bool = False


@dataclass(slots=True)
class MetadataBody:
    """A Plex metadata answer, as received (decoded and parsed in the writer thread)."""

    ts: float
    raw: bytes
    content_type: str = ""
    content_encoding: str = ""
    applied: bool = False


def client_hash(client: str | None) -> str | None:
    return hashlib.sha256(b"projectionist-client:" + client.encode()).hexdigest()[:16] if client else None


# --- sessions --------------------------------------------------------------------------------------

@dataclass(slots=True)
class Play:
    user_id: int | None
    rating_key: str
    player: str | None
    client_hash: str | None
    started_at: float
    last_seen_at: float
    state: str
    position_ms: int | None = None
    duration_ms: int | None = None
    watched_ms: float = 0.0
    paused_ms: float = 0.0
    watched: int = 0
    stopped_at: float | None = None
    id: int | None = None
    source: str = "timeline"

    def row(self) -> dict:
        return {"id": self.id, "user_id": self.user_id, "rating_key": self.rating_key, "player": self.player,
                "client_hash": self.client_hash, "source": self.source, "started_at": self.started_at,
                "last_seen_at": self.last_seen_at, "stopped_at": self.stopped_at, "state": self.state,
                "position_ms": self.position_ms, "duration_ms": self.duration_ms,
                "watched_ms": int(self.watched_ms), "paused_ms": int(self.paused_ms), "watched": self.watched}


_PLAY_COLUMNS = ("user_id", "rating_key", "player", "client_hash", "source", "started_at", "last_seen_at",
                 "stopped_at", "state", "position_ms", "duration_ms", "watched_ms", "paused_ms", "watched")
_INSERT_PLAY = (f"INSERT INTO plays ({', '.join(_PLAY_COLUMNS)}) "
                f"VALUES ({', '.join(':' + c for c in _PLAY_COLUMNS)})")
_UPDATE_PLAY = (f"UPDATE plays SET {', '.join(f'{c} = :{c}' for c in _PLAY_COLUMNS)} WHERE id = :id")
_UPSERT_MEDIA = """
INSERT INTO media_items (rating_key, type, title, grandparent_title, parent_index, item_index, year,
                         duration_ms, updated_at)
VALUES (:rating_key, :type, :title, :grandparent_title, :parent_index, :item_index, :year, :duration_ms, :ts)
ON CONFLICT (rating_key) DO UPDATE SET
    type = coalesce(excluded.type, type), title = coalesce(excluded.title, title),
    grandparent_title = coalesce(excluded.grandparent_title, grandparent_title),
    parent_index = coalesce(excluded.parent_index, parent_index),
    item_index = coalesce(excluded.item_index, item_index), year = coalesce(excluded.year, year),
    duration_ms = coalesce(excluded.duration_ms, duration_ms), updated_at = excluded.updated_at
"""


class PlaybackWriter(UsageWriter):
    """UsageWriter's batching thread, writing play sessions and titles instead of usage rows.

    A batch that cannot be written (database locked) is retried with later reports appended:
    each report changes the sessions once (`applied`), the rows written are the sessions' state.
    """

    def __init__(self, db_path: Path | str, *, interval: float = 0.25, batch_size: int = 1000,
                 clock=time.time):
        super().__init__(db_path, interval=interval, batch_size=batch_size)
        self._thread.name = "playback-writer"
        self.clock = clock
        self.open: dict[tuple, Play] = {}  # (user, client) -> the open play
        # (user, client) -> its last stopped play: with workers, a report can reach this writer after
        # the stop that followed it (another worker's batch came first); it belongs to that play.
        self.stopped: dict[tuple, Play] = {}
        self.dirty: dict[int, Play] = {}  # id(play) -> play, rows to write
        self.media: list[dict] = []
        self.marks: list[PlaybackReport] = []  # scrobbles/unscrobbles to apply in SQL
        self._loaded = False

    # The base class runs this in its thread with its own connection.
    def _write(self, conn: sqlite3.Connection, items: list) -> bool:  # type: ignore[override]
        if not self._loaded:
            self._load_open(conn)
        for item in items:
            if not item.applied:
                item.applied = True
                try:
                    self._apply(item)
                except Exception:  # a malformed report must not stop the writer
                    log.exception("playback writer: report ignored")
        self._sweep(self.clock())
        inserted: list[Play] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            self._forget_deleted_users(conn)
            for play in self.dirty.values():
                if play.id is None:
                    play.id = conn.execute(_INSERT_PLAY, play.row()).lastrowid
                    inserted.append(play)
                else:
                    conn.execute(_UPDATE_PLAY, play.row())
            for report in self.marks:
                self._mark(conn, report)
            if self.media:
                conn.executemany(_UPSERT_MEDIA, self.media)
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            log.debug("playback writer: %d plays not written yet (%s); will retry", len(self.dirty), exc)
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            for play in inserted:
                play.id = None
            return False
        self.dirty.clear()
        self.media.clear()
        self.marks.clear()
        return True

    def _forget_deleted_users(self, conn: sqlite3.Connection) -> None:
        """A user deleted meanwhile (foreign key): the play stays, without its user."""
        ids = {p.user_id for p in self.dirty.values() if p.user_id is not None}
        ids |= {r.user_id for r in self.marks if r.user_id is not None}
        if not ids:
            return
        known = {row[0] for row in conn.execute(
            f"SELECT id FROM users WHERE id IN ({', '.join('?' for _ in ids)})", tuple(ids))}
        for play in self.dirty.values():
            if play.user_id is not None and play.user_id not in known:
                play.user_id = None
        for report in self.marks:
            if report.user_id is not None and report.user_id not in known:
                report.user_id = None

    def _load_open(self, conn: sqlite3.Connection) -> None:
        """After a restart: plays still open in the database go on (or are closed if stale)."""
        self._loaded = True
        now = self.clock()
        try:
            conn.execute("UPDATE plays SET stopped_at = last_seen_at WHERE stopped_at IS NULL AND last_seen_at < ?",
                         (now - SESSION_GAP,))
            rows = conn.execute(f"SELECT id, {', '.join(_PLAY_COLUMNS)} FROM plays WHERE stopped_at IS NULL").fetchall()
        except sqlite3.Error as exc:
            log.warning("playback writer: open plays not loaded (%s)", exc)
            return
        names = ("id", *_PLAY_COLUMNS)
        for values in rows:
            row = dict(zip(names, values, strict=True))
            play = Play(**{k: row[k] for k in names})
            self.open[(play.user_id or 0, play.client_hash or f"rk:{play.rating_key}")] = play

    def _apply(self, item) -> None:
        if isinstance(item, MetadataBody):
            self.media.extend(dict(row, ts=item.ts) for row in parse_metadata(item))
        elif item.kind == "timeline":
            self._timeline(item)
        elif item.kind in ("scrobble", "unscrobble"):
            self.marks.append(item)

    def _timeline(self, r: PlaybackReport) -> None:
        chash = client_hash(r.client)
        key = (r.user_id or 0, chash or f"rk:{r.rating_key}")
        play = self.open.get(key)
        if play is not None and (play.rating_key != r.rating_key or r.ts - play.last_seen_at > SESSION_GAP):
            self._close(key, play, play.last_seen_at)
            play = None
        if play is None:
            if r.state == "stopped":
                return  # the end of a play we never saw start
            last = self.stopped.get(key)
            if last is not None and last.rating_key == r.rating_key and r.ts <= (last.stopped_at or 0):
                return  # a late report of a play already stopped: no new play
            play = Play(user_id=r.user_id, rating_key=r.rating_key, player=r.player, client_hash=chash,
                        started_at=r.ts, last_seen_at=r.ts, state=r.state or "playing")
            self.open[key] = play
        else:
            step = r.ts - play.last_seen_at
            if 0 < step <= MAX_STEP:
                if play.state in PLAYING_STATES:
                    play.watched_ms += step * 1000
                elif play.state == "paused":
                    play.paused_ms += step * 1000
            late = r.ts < play.last_seen_at  # older than what this play already knows
            play.last_seen_at = max(play.last_seen_at, r.ts)
            if not late:
                play.state = r.state or play.state
            play.player = play.player or r.player
            if late and r.state != "stopped":
                self.dirty[id(play)] = play
                return
        if r.position_ms is not None:
            play.position_ms = r.position_ms
        if r.duration_ms:
            play.duration_ms = r.duration_ms
        if play.duration_ms and play.position_ms is not None and play.position_ms >= WATCHED_FRACTION * play.duration_ms:
            play.watched = 1
        self.dirty[id(play)] = play
        if r.state == "stopped":
            self._close(key, play, r.ts)

    def _close(self, key: tuple, play: Play, at: float) -> None:
        play.stopped_at = at
        self.dirty[id(play)] = play
        if self.open.get(key) is play:
            del self.open[key]
        self.stopped[key] = play

    def _sweep(self, now: float) -> None:
        for key, play in list(self.open.items()):
            if now - play.last_seen_at > SESSION_GAP:
                self._close(key, play, play.last_seen_at)
        for key, play in list(self.stopped.items()):
            if now - (play.stopped_at or 0) > MAX_STEP:  # later than this, no report is a late one
                del self.stopped[key]

    def _mark(self, conn: sqlite3.Connection, r: PlaybackReport) -> None:
        """Scrobble: the latest play of that item by that user (within 6 h) is watched; without
        one, a 'scrobble' row records that it was marked watched. Unscrobble: unmarks it."""
        watched = 1 if r.kind == "scrobble" else 0
        for play in self.open.values():
            if play.rating_key == r.rating_key and (play.user_id or 0) == (r.user_id or 0):
                play.watched = watched
                if play.id is not None:
                    conn.execute("UPDATE plays SET watched = ? WHERE id = ?", (watched, play.id))
                return
        row = conn.execute(
            "SELECT id FROM plays WHERE rating_key = ? AND coalesce(user_id, 0) = ? AND started_at > ? "
            "ORDER BY started_at DESC LIMIT 1", (r.rating_key, r.user_id or 0, r.ts - 6 * 3600)).fetchone()
        if row:
            conn.execute("UPDATE plays SET watched = ? WHERE id = ?", (watched, row[0]))
        elif watched:
            play = Play(user_id=r.user_id, rating_key=r.rating_key, player=r.player, client_hash=client_hash(r.client),
                        started_at=r.ts, last_seen_at=r.ts, stopped_at=r.ts, state="stopped", watched=1,
                        source="scrobble")
            conn.execute(_INSERT_PLAY, play.row())


# --- metadata answers --------------------------------------------------------------------------------

def _int(value) -> int | None:
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _media_row(item: dict) -> dict | None:
    rating_key = item.get("ratingKey")
    if not rating_key:
        return None
    return {"rating_key": str(rating_key), "type": item.get("type"), "title": item.get("title"),
            "grandparent_title": item.get("grandparentTitle"), "parent_index": _int(item.get("parentIndex")),
            "item_index": _int(item.get("index")), "year": _int(item.get("year")),
            "duration_ms": _int(item.get("duration"))}


def parse_metadata(body: MetadataBody) -> list[dict]:
    """media_items rows from a Plex answer (JSON or XML, any content-encoding); [] if unusable."""
    raw = body.raw
    if body.content_encoding and body.content_encoding != "identity":
        from mitmproxy.net import encoding

        try:
            raw = encoding.decode(raw, body.content_encoding)
        except (ValueError, KeyError):
            return []
    if not raw or len(raw) > 4 * MAX_METADATA_BYTES:
        return []
    rows = []
    try:
        if raw.lstrip()[:1] in (b"{", b"["):
            container = (json.loads(raw) or {}).get("MediaContainer") or {}
            items = container.get("Metadata") or []
        else:
            root = ElementTree.fromstring(raw)
            items = [dict(child.attrib) for child in root]
    except (ValueError, ElementTree.ParseError, AttributeError):
        return []
    for item in items:
        if isinstance(item, dict) and (row := _media_row(item)):
            rows.append(row)
    return rows


# --- latency percentiles from the cumulative histogram -------------------------------------------------

def percentile_sql(p: float, alias: str = "") -> str:
    """SQL estimating the p-quantile (0 < p < 1) of latency from summed histogram columns.

    Expects, in scope, `n` (sum of latency_count), `mx` (max of latency_ms_max) and `le_<bound>`
    (sums of lat_le_<bound>). Linear interpolation inside the bucket that holds the quantile; the
    last, open bucket ends at the maximum seen. The canned queries in datasette_metadata.yml embed
    this expression (tests check that they agree with it).
    """
    prefix = f"{alias}." if alias else ""
    t = f"({p} * {prefix}n)"
    parts = [f"CASE WHEN coalesce({prefix}n, 0) = 0 THEN NULL"]
    lo_bound, lo_count = 0, "0"
    for bound in LATENCY_BOUNDS_MS:
        col = f"{prefix}le_{bound}"
        parts.append(f"WHEN {col} >= {t} THEN {lo_bound} + {bound - lo_bound} * ({t} - {lo_count}) / ({col} - {lo_count})")
        lo_bound, lo_count = bound, col
    parts.append(f"ELSE {lo_bound} + max({prefix}mx - {lo_bound}, 0) * ({t} - {lo_count}) / ({prefix}n - {lo_count}) END")
    return "\n      ".join(parts)


def histogram_sums_sql() -> str:
    """The select-list that feeds `percentile_sql`: sum(latency_count) AS n, max(...) AS mx, le_N..."""
    sums = [f"sum(lat_le_{b}) AS le_{b}" for b in LATENCY_BOUNDS_MS]
    return ",\n         ".join(["sum(latency_count) AS n, max(latency_ms_max) AS mx",
                                *(", ".join(sums[i:i + 4]) for i in range(0, len(sums), 4))])
