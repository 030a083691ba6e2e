"""Recommendations per user, from what they watched and want to watch: refreshed daily by the
`recommendations` job, served at `GET /api/recommendations` and shown on the settings page.

Seeds are the user's plays (timeline, Plex history, Trakt history) of items the library sync knows
the TMDB id of (an episode counts for its show), most recent first, at most SEEDS of them, and
the titles on their watchlists (Plex discover with their own plex.tv token, Trakt if connected;
read as the watchlist-sync job reads them), newest first, at most WATCHLIST_SEEDS. Each seed's
TMDB `/recommendations` (the server's own TMDB credential) votes for what it lists, more for what
it lists first; what the user has already played and what is already on a watchlist are left
out; the best RESULTS are kept with the titles that led to them. A watchlist that cannot be read
leaves the plays alone to seed.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from datetime import UTC, datetime

import aiohttp
from aiohttp import web
from pydantic import BaseModel, Field

from .jobs import JobContext, job
from .keys import HTTP, OPTIONS, UPSTREAMS, VAULT
from .openapi import USER, Api, Call
from .usage import query
from .watchlist import Entry, Plex, Trakt, Unreadable, user_tokens

log = logging.getLogger("control.recommendations")

SEEDS, WATCHLIST_SEEDS, RESULTS = 10, 5, 20
Seed = tuple[str, int, str]  # (movie | tv, tmdb id, title)


def _tmdb_id(guids: str | None) -> int | None:
    for guid in json.loads(guids or "[]"):
        if guid.startswith("tmdb://") and guid[7:].isdigit():
            return int(guid[7:])
    return None


def seeds_by_user(conn: sqlite3.Connection) -> dict[int, list[tuple[str, int, str]]]:
    """user id -> [(movie|tv, tmdb id, title)], most recently played first."""
    rows = conn.execute(
        "SELECT p.user_id, m.type, m.title, m.guids, s.title, s.guids, max(p.started_at) AS last FROM plays p "
        "JOIN media_items m ON m.rating_key = p.rating_key "
        "LEFT JOIN media_items s ON m.type = 'episode' AND s.type = 'show' AND s.title = m.grandparent_title "
        "WHERE p.user_id IS NOT NULL GROUP BY p.user_id, coalesce(s.rating_key, m.rating_key) ORDER BY last DESC")
    out: dict[int, list[tuple[str, int, str]]] = {}
    for user_id, kind, title, guids, show_title, show_guids, _ in rows:
        if kind == "episode":
            kind, title, guids = "show", show_title, show_guids
        tmdb = _tmdb_id(guids)
        if tmdb is not None and kind in ("movie", "show"):
            out.setdefault(user_id, []).append(("movie" if kind == "movie" else "tv", tmdb, title))
    return out


def active_users(conn: sqlite3.Connection) -> list[int]:
    return [r[0] for r in conn.execute("SELECT id FROM users WHERE disabled_at IS NULL ORDER BY id")]


def watchlist_seeds(entries: list[Entry]) -> list[Seed]:
    """Watchlist entries (Plex and Trakt, duplicates too) as seeds, newest listed first."""
    out: list[Seed] = []
    for entry in sorted(entries, key=lambda e: -(e.listed_at or 0)):
        tmdb = next((int(g[7:]) for g in entry.guids if g.startswith("tmdb://") and g[7:].isdigit()), None)
        seed = ("movie" if entry.media_type == "movie" else "tv", tmdb, entry.title or "")
        if tmdb is not None and all(s[:2] != seed[:2] for s in out):
            out.append(seed)
    return out


def choose_seeds(played: list[Seed], listed: list[Seed]) -> list[Seed]:
    """The plays' seeds, then the watchlist's (each capped): what to ask TMDB about."""
    chosen = list(played[:SEEDS])
    for seed in listed:
        if len(chosen) >= SEEDS + WATCHLIST_SEEDS:
            break
        if all(s[:2] != seed[:2] for s in chosen):
            chosen.append(seed)
    return chosen


def rank(seeds: list[Seed], answers: dict[tuple[str, int], list[dict]],
         exclude: set[tuple[str, int]] | None = None) -> list[dict]:
    """Vote; `exclude`: what was played and what is on a watchlist (the seeds are left out too)."""
    seen = {(kind, tmdb) for kind, tmdb, _ in seeds} | (exclude or set())
    scored: dict[tuple[str, int], dict] = {}
    for kind, tmdb, title in seeds:
        for position, result in enumerate(answers.get((kind, tmdb), [])[:20]):
            key = (kind, result.get("id"))
            if key in seen or not isinstance(key[1], int):
                continue
            entry = scored.setdefault(key, {
                "media_type": kind, "tmdb_id": key[1], "title": result.get("title") or result.get("name") or "",
                "year": int((result.get("release_date") or result.get("first_air_date") or "0")[:4] or 0) or None,
                "score": 0.0, "because": [], "vote": result.get("vote_average") or 0})
            entry["score"] += (20 - position) / 20
            if title not in entry["because"]:
                entry["because"].append(title)
    ordered = sorted(scored.values(), key=lambda e: (-e["score"], -e["vote"], e["title"]))[:RESULTS]
    for entry in ordered:
        del entry["vote"]
        entry["score"] = round(entry["score"], 3)
    return ordered


def store(conn: sqlite3.Connection, user_id: int, items: list[dict]) -> None:
    now = time.time()
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute("DELETE FROM recommendations WHERE user_id = ?", (user_id,))
        conn.executemany(
            "INSERT INTO recommendations (user_id, position, media_type, tmdb_id, title, year, score, because,"
            " refreshed_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [(user_id, i, e["media_type"], e["tmdb_id"], e["title"], e["year"], e["score"], json.dumps(e["because"]),
              now) for i, e in enumerate(items)])
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


async def _recommendations_of(ctx: JobContext, kind: str, tmdb: int) -> list[dict]:
    server = ctx.app[OPTIONS].server
    headers, params = {"Accept": "application/json"}, {}
    if server.tmdb_read_token:
        headers["Authorization"] = f"Bearer {server.tmdb_read_token}"
    else:
        params["api_key"] = server.tmdb_api_key
    url = ctx.app[UPSTREAMS].url("tmdb", f"/3/{kind}/{tmdb}/recommendations")
    async with ctx.app[HTTP].get(url, params=params, headers=headers, allow_redirects=False) as response:
        if response.status == 404:
            return []
        response.raise_for_status()
        return (await response.json()).get("results", [])


async def read_watchlists(ctx: JobContext, user_id: int) -> list[Entry]:
    """The user's Plex and Trakt watchlists; a side that cannot be read is left out (logged)."""
    plex_token, link = await ctx.app[VAULT].run(user_tokens, user_id)
    entries: list[Entry] = []
    sides = [("plex", Plex(ctx, plex_token) if plex_token else None),
             ("trakt", Trakt(ctx, link) if link and ctx.app[OPTIONS].server.trakt_client_id else None)]
    for name, side in sides:
        if side is None:
            continue
        try:
            entries += await side.watchlist()
        except (Unreadable, aiohttp.ClientError, ValueError) as exc:
            log.warning("recommendations: the %s watchlist could not be read (%s)", name,
                        exc if isinstance(exc, Unreadable) else type(exc).__name__, extra={"fields": {"user_id": user_id}})
    return entries


@job("recommendations", cron="30 5 * * *", timeout=900,
     summary="Refresh each user's recommendations from what they watched and their watchlists (TMDB)")
async def refresh_recommendations(ctx: JobContext) -> int:
    stored = 0
    played_by_user = await ctx.db(seeds_by_user)
    for user_id in await ctx.db(active_users):
        played = played_by_user.get(user_id, [])
        listed = watchlist_seeds(await read_watchlists(ctx, user_id))
        seeds = choose_seeds(played, listed)
        if not seeds:
            continue
        answers = {}
        for kind, tmdb, _ in seeds:
            answers[(kind, tmdb)] = await _recommendations_of(ctx, kind, tmdb)
        items = rank(seeds, answers, {s[:2] for s in played + listed})
        await ctx.db(store, user_id, items)
        stored += len(items)
    return stored


# --- API ------------------------------------------------------------------------------------------

class Recommendation(BaseModel):
    media_type: str = Field(description="movie | tv")
    tmdb_id: int
    title: str
    year: int | None = None
    score: float
    because: list[str] = Field(description="what you watched that led here")


class Recommendations(BaseModel):
    refreshed_at: datetime | None = None
    items: list[Recommendation]


def load(conn: sqlite3.Connection, user_id: int) -> Recommendations:
    rows = conn.execute("SELECT media_type, tmdb_id, title, year, score, because, refreshed_at FROM recommendations "
                        "WHERE user_id = ? ORDER BY position", (user_id,)).fetchall()
    return Recommendations(
        refreshed_at=datetime.fromtimestamp(rows[0][6], UTC) if rows else None,
        items=[Recommendation(media_type=r[0], tmdb_id=r[1], title=r[2], year=r[3], score=r[4],
                              because=json.loads(r[5])) for r in rows])


api = Api("recommendations")


@api.get("/api/recommendations", summary="What to watch next, from what you watched", access=USER,
         response=Recommendations)
async def get_recommendations(request: web.Request, call: Call) -> Recommendations:
    """Refreshed daily by the `recommendations` job; empty until it ran after your first plays."""
    return await query(request.app, load, call.user.user_id)

