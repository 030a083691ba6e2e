"""The history-import job: past views from each Plex server and each connected user's Trakt into
`plays`, with their `source` ("plex-history", "trakt"). Idempotent: every imported play carries
its origin's id (`external_id`, unique per source), so a re-run adds nothing; reading stops at the
first page that brings nothing new (both histories come newest first).

Plex: `/status/sessions/history/all` with a server owner's token (the library sync's server list
and tokens); the view's `accountID` names the user (users.plex_account_id), views of accounts that
never signed in here are kept without a user. Trakt: `/users/me/history` with the user's own
tokens (refreshed by the trakt-refresh job); a movie or episode is matched to its Plex item
through the guids and titles the library sync stored, else kept as `trakt:<type>:<trakt id>`.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from datetime import datetime
from typing import Any

import aiohttp

from .jobs import JobContext, job
from .keys import HTTP, OPTIONS, UPSTREAMS, VAULT
from .library import _get, candidate_tokens, plex_servers
from .trakt import linked_users, load_link

log = logging.getLogger("control.history")

PAGE_SIZE = 100


def _insert(conn: sqlite3.Connection, rows: list[tuple]) -> int:
    """rows: (user_id, rating_key, source, external_id, viewed_at, duration_ms); new plays only."""
    added = 0
    conn.execute("BEGIN IMMEDIATE")
    try:
        for user_id, rating_key, source, external_id, viewed_at, duration in rows:
            added += conn.execute(
                "INSERT INTO plays (user_id, rating_key, source, external_id, started_at, last_seen_at, stopped_at,"
                " state, duration_ms, watched) VALUES (?, ?, ?, ?, ?, ?, ?, 'stopped', ?, 1)"
                " ON CONFLICT (source, external_id) DO NOTHING",
                (user_id, rating_key, source, external_id, viewed_at, viewed_at, viewed_at, duration)).rowcount
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return added


def users_by_plex_account(conn: sqlite3.Connection) -> dict[str, int]:
    return {str(account): user_id for user_id, account in
            conn.execute("SELECT id, plex_account_id FROM users WHERE plex_account_id IS NOT NULL")}


def match_trakt(conn: sqlite3.Connection, entry: dict[str, Any]) -> tuple[str, int | None]:
    """The Plex rating key (and duration) of a Trakt history entry, from what the library sync stored."""
    if entry.get("type") == "movie":
        movie = entry.get("movie") or {}
        tmdb = (movie.get("ids") or {}).get("tmdb")
        row = conn.execute("SELECT rating_key, duration_ms FROM media_items WHERE type = 'movie' AND guids LIKE ?",
                           (f'%"tmdb://{tmdb}"%',)).fetchone() if tmdb else None
        return (row[0], row[1]) if row else (f"trakt:movie:{(movie.get('ids') or {}).get('trakt')}", None)
    episode, show = entry.get("episode") or {}, entry.get("show") or {}
    tmdb = (show.get("ids") or {}).get("tmdb")
    shown = conn.execute("SELECT title FROM media_items WHERE type = 'show' AND guids LIKE ?",
                         (f'%"tmdb://{tmdb}"%',)).fetchone() if tmdb else None
    title = shown[0] if shown else show.get("title")
    row = conn.execute("SELECT rating_key, duration_ms FROM media_items WHERE type = 'episode' AND grandparent_title = ?"
                       " AND parent_index = ? AND item_index = ?",
                       (title, episode.get("season"), episode.get("number"))).fetchone()
    return (row[0], row[1]) if row else (f"trakt:episode:{(episode.get('ids') or {}).get('trakt')}", None)


def trakt_rows(conn: sqlite3.Connection, user_id: int, entries: list[dict]) -> list[tuple]:
    rows = []
    for entry in entries:
        watched = entry.get("watched_at")
        if not watched or entry.get("id") is None:
            continue
        rating_key, duration = match_trakt(conn, entry)
        viewed = datetime.fromisoformat(watched.replace("Z", "+00:00")).timestamp()
        rows.append((user_id, rating_key, "trakt", f"{user_id}:{entry['id']}", viewed, duration))
    return rows


async def import_plex(ctx: JobContext, tokens: list[str]) -> int:
    added = 0
    users = await ctx.db(users_by_plex_account)
    for server, base in plex_servers(ctx).items():
        for token in tokens:
            start = 0
            try:
                while True:
                    page = await _get(ctx.app[HTTP], f"{base}/status/sessions/history/all", token, {
                        "sort": "viewedAt:desc", "X-Plex-Container-Start": start, "X-Plex-Container-Size": PAGE_SIZE})
                    entries = page.get("Metadata", [])
                    rows = [(users.get(str(e.get("accountID"))), e["ratingKey"], "plex-history",
                             f"{server}:{e.get('historyKey') or e['ratingKey']}:{e.get('viewedAt')}:{e.get('accountID')}",
                             e.get("viewedAt"), e.get("duration")) for e in entries if e.get("ratingKey")]
                    new = await ctx.db(_insert, rows)
                    added += new
                    start += len(entries)
                    if not entries or new == 0 or start >= page.get("totalSize", start):
                        break
            except PermissionError:
                continue  # not the owner's token: the next one
            break
    return added


async def import_trakt(ctx: JobContext) -> int:
    server = ctx.app[OPTIONS].server
    if not (server.trakt_client_id and server.trakt_client_secret):
        return 0
    added = 0
    for user_id in await ctx.app[VAULT].run(linked_users):
        link = await ctx.app[VAULT].run(load_link, user_id)
        if not link:
            continue
        headers = {"trakt-api-version": "2", "trakt-api-key": server.trakt_client_id,
                   "Authorization": f"Bearer {link['access_token']}"}
        page = 1
        while True:
            url = ctx.app[UPSTREAMS].url("trakt", "/users/me/history")
            async with ctx.app[HTTP].get(url, params={"page": page, "limit": PAGE_SIZE}, headers=headers,
                                         allow_redirects=False) as response:
                if response.status == 401:
                    log.warning("trakt history: the user's token was refused", extra={"fields": {"user_id": user_id}})
                    break
                response.raise_for_status()
                entries = json.loads(await response.text())
                pages = int(response.headers.get("X-Pagination-Page-Count", "1"))
            new = await ctx.db(lambda conn: _insert(conn, trakt_rows(conn, user_id, entries)))
            added += new
            if not entries or new == 0 or page >= pages:
                break
            page += 1
    return added


@job("history-import", every=3600, timeout=1800,
     summary="Import past views from Plex servers and connected Trakt accounts into plays (idempotent)")
async def history_import(ctx: JobContext) -> int:
    tokens = await ctx.app[VAULT].run(candidate_tokens, ctx.app[OPTIONS].admins)
    added = await import_plex(ctx, tokens)
    try:
        added += await import_trakt(ctx)
    except aiohttp.ClientError as exc:
        log.warning("trakt history import failed: %s", type(exc).__name__)
        raise
    return added
