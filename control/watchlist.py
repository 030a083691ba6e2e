"""The watchlist-sync job: each opted-in user's Plex watchlist and Trakt watchlist, mirrored both ways.

Opt-in per user (`watchlist_sync` in `PUT /api/settings`: `on`, `dry-run`, default `off`), and only
for users with Trakt connected. Plex: discover.provider.plex.tv `/library/sections/watchlist/all`
(`includeGuids=1`) with the user's own vaulted plex.tv token, changed with `PUT
/actions/addToWatchlist|removeFromWatchlist?ratingKey=` (a Trakt item's ratingKey comes from discover
`/library/search`, checked by guid). Trakt: `GET /sync/watchlist`, `POST /sync/watchlist[/remove]`
with the user's own tokens. Items are the same when their type matches and a tmdb://, imdb:// or
tvdb:// id is shared.

Removals: `watchlist_sync_items` keeps what was on both sides after the user's last real run, so an
item now missing on one side was removed there (and is removed on the other), while an item never
synced is an addition (and is added on the other). Conflict, an item removed on one side but added
again on the other since the last run (its date there is newer than the one remembered): the latest
change wins, the item stays and comes back. Every change is a `watchlist_sync_events` row
(`dry_run` 1 when the user chose `dry-run`, or an admin started the run with
`POST /api/jobs/watchlist-sync/run?dry_run=true`: nothing is changed, nothing remembered). A user whose
watchlist could not be read in full is skipped: a partial list must not read as removals.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aiohttp

from projectionist.vault import Vault

from .auth import PLEX_TOKEN_KIND
from .jobs import JobContext, job
from .keys import HTTP, OPTIONS, PLEX_CLIENT_ID, UPSTREAMS, VAULT
from .trakt import load_link
from .upstreams import plex_headers

log = logging.getLogger("control.watchlist")

PLEX_PAGE, TRAKT_PAGE = 200, 100
TO_TRAKT, TO_PLEX = "plex->trakt", "trakt->plex"
ID_KINDS = ("tmdb", "imdb", "tvdb")
TRAKT_GROUPS = {"movie": "movies", "show": "shows"}
REFRESHED = 1.0  # seconds: a date newer than the remembered one by more than this is a fresh addition


class Unreadable(Exception):
    """A watchlist could not be read in full (token refused, upstream error): skip the user."""


@dataclass
class Entry:
    media_type: str  # movie | show
    title: str | None
    guids: set[str]
    listed_at: float | None
    plex_key: str | None = None


@dataclass
class Group:
    """One title as seen on Plex, on Trakt and in the snapshot (any of them may be missing)."""
    media_type: str
    guids: set[str] = field(default_factory=set)
    plex: Entry | None = None
    trakt: Entry | None = None
    snapshot: Entry | None = None  # listed_at: (plex, trakt) dates at the last sync, as a tuple

    @property
    def title(self) -> str | None:
        return next((e.title for e in (self.plex, self.trakt, self.snapshot) if e and e.title), None)

    @property
    def plex_key(self) -> str | None:
        return next((e.plex_key for e in (self.plex, self.snapshot) if e and e.plex_key), None)

    def key(self) -> str:
        for kind in ID_KINDS:
            found = sorted(g for g in self.guids if g.startswith(f"{kind}://"))
            if found:
                return f"{self.media_type}:{found[0]}"
        return f"{self.media_type}:{sorted(self.guids)[0] if self.guids else self.title}"


def group(snapshot: list[tuple[Entry, float | None, float | None]], plex: list[Entry], trakt: list[Entry]
          ) -> list[tuple[Group, float | None, float | None]]:
    groups: list[list] = []  # [Group, plex date then, trakt date then]

    def place(side: str, entry: Entry) -> list:
        for slot in groups:
            g = slot[0]
            if g.media_type == entry.media_type and g.guids & entry.guids and getattr(g, side) is None:
                break
        else:
            slot = [Group(entry.media_type), None, None]
            groups.append(slot)
        setattr(slot[0], side, entry)
        slot[0].guids |= entry.guids
        return slot

    for entry, plex_then, trakt_then in snapshot:
        slot = place("snapshot", entry)
        slot[1], slot[2] = plex_then, trakt_then
    for entry in plex:
        place("plex", entry)
    for entry in trakt:
        place("trakt", entry)
    return [(g, p, t) for g, p, t in groups]


def _newer(entry: Entry | None, then: float | None) -> bool:
    return entry is not None and entry.listed_at is not None and then is not None and entry.listed_at > then + REFRESHED


def plan(g: Group, plex_then: float | None, trakt_then: float | None) -> str:
    """What to do with one title: keep | forget | add-trakt | add-plex | remove-trakt | remove-plex."""
    if g.plex and g.trakt:
        return "keep"
    if g.snapshot is None:  # never synced: whichever side has it, it was added there
        return "add-trakt" if g.plex else "add-plex" if g.trakt else "forget"
    if g.plex:  # synced, gone from Trakt since: removed there, unless added again on Plex after it
        return "add-trakt" if _newer(g.plex, plex_then) else "remove-plex"
    if g.trakt:
        return "add-plex" if _newer(g.trakt, trakt_then) else "remove-trakt"
    return "forget"  # removed on both sides


# --- store (blocking) -------------------------------------------------------------------------------

def opted_in(conn: sqlite3.Connection) -> list[tuple[int, str]]:
    return conn.execute("SELECT s.user_id, s.watchlist_sync FROM user_settings s JOIN users u ON u.id = s.user_id "
                        "WHERE s.watchlist_sync IN ('on', 'dry-run') AND u.disabled_at IS NULL ORDER BY s.user_id"
                        ).fetchall()


def load_snapshot(conn: sqlite3.Connection, user_id: int) -> list[tuple[Entry, float | None, float | None]]:
    rows = conn.execute("SELECT media_type, title, guids, plex_key, plex_listed_at, trakt_listed_at "
                        "FROM watchlist_sync_items WHERE user_id = ?", (user_id,)).fetchall()
    return [(Entry(kind, title, set(json.loads(guids)), None, key), plex_at, trakt_at)
            for kind, title, guids, key, plex_at, trakt_at in rows]


def save(conn: sqlite3.Connection, user_id: int, snapshot: list[Group] | None, events: list[tuple]) -> None:
    """Replace the user's snapshot (None: a dry run keeps it) and log the events, in one transaction."""
    now = time.time()
    conn.execute("BEGIN IMMEDIATE")
    try:
        if snapshot is not None:
            conn.execute("DELETE FROM watchlist_sync_items WHERE user_id = ?", (user_id,))
            conn.executemany(
                "INSERT OR REPLACE INTO watchlist_sync_items (user_id, item, media_type, title, guids, plex_key,"
                " plex_listed_at, trakt_listed_at, synced_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [(user_id, g.key(), g.media_type, g.title, json.dumps(sorted(g.guids)), g.plex_key,
                  g.plex.listed_at if g.plex else None, g.trakt.listed_at if g.trakt else None, now)
                 for g in snapshot])
        stamp = datetime.now(UTC).isoformat(timespec="seconds")
        conn.executemany(
            "INSERT INTO watchlist_sync_events (ts, user_id, direction, action, media_type, title, guids, dry_run,"
            " outcome) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", [(stamp, user_id, *e) for e in events])
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def user_tokens(vault: Vault, user_id: int) -> tuple[str | None, dict | None]:
    newest = vault.newest(PLEX_TOKEN_KIND, user_id)
    return (newest[0] if newest else None), load_link(vault, user_id)


# --- Plex (discover.provider.plex.tv) --------------------------------------------------------------------

def _guids(ids: Any) -> set[str]:
    return {g["id"] for g in ids or [] if isinstance(g, dict) and isinstance(g.get("id"), str)
            and g["id"].split("://")[0] in ID_KINDS}


class Plex:
    def __init__(self, ctx: JobContext, token: str) -> None:
        self.ctx, self.headers = ctx, plex_headers(ctx.app[PLEX_CLIENT_ID], token)

    def url(self, path: str) -> str:
        return self.ctx.app[UPSTREAMS].url("discover", path)

    async def get(self, path: str, params: dict[str, Any]) -> dict:
        async with self.ctx.app[HTTP].get(self.url(path), params=params, headers=self.headers,
                                          allow_redirects=False) as response:
            if response.status != 200:
                raise Unreadable(f"Plex {path}: HTTP {response.status}")
            return (await response.json(content_type=None)).get("MediaContainer", {})

    async def watchlist(self) -> list[Entry]:
        out, start = [], 0
        while True:
            page = await self.get("/library/sections/watchlist/all", {
                "includeGuids": 1, "X-Plex-Container-Start": start, "X-Plex-Container-Size": PLEX_PAGE})
            items = page.get("Metadata", [])
            out += [Entry(m["type"], m.get("title"), _guids(m.get("Guid")), m.get("watchlistedAt"), m.get("ratingKey"))
                    for m in items if m.get("type") in TRAKT_GROUPS]
            start += len(items)
            if not items or start >= int(page.get("totalSize", start)):
                return out

    async def find(self, g: Group) -> str | None:
        """The discover ratingKey of a title known by its guids: a title search, checked by guid."""
        if not g.title:
            return None
        page = await self.get("/library/search", {
            "query": g.title, "searchTypes": "movies" if g.media_type == "movie" else "tv",
            "searchProviders": "discover", "includeMetadata": 1, "includeGuids": 1, "limit": 20})
        for m in page.get("Metadata", []):
            if m.get("type") == g.media_type and _guids(m.get("Guid")) & g.guids:
                return m.get("ratingKey")
        return None

    async def change(self, rating_key: str, add: bool) -> bool:
        action = "addToWatchlist" if add else "removeFromWatchlist"
        async with self.ctx.app[HTTP].put(self.url(f"/actions/{action}"), params={"ratingKey": rating_key},
                                          headers=self.headers, allow_redirects=False) as response:
            await response.read()
            return response.status == 200


# --- Trakt --------------------------------------------------------------------------------------------

def _trakt_date(value: Any) -> float | None:
    try:
        return datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def _trakt_ids(guids: set[str]) -> dict[str, Any]:
    ids: dict[str, Any] = {}
    for guid in sorted(guids):
        kind, _, value = guid.partition("://")
        if kind in ID_KINDS and kind not in ids:
            ids[kind] = int(value) if kind != "imdb" and value.isdigit() else value
    return ids


class Trakt:
    def __init__(self, ctx: JobContext, link: dict) -> None:
        self.ctx = ctx
        self.headers = {"trakt-api-version": "2", "trakt-api-key": ctx.app[OPTIONS].server.trakt_client_id,
                        "Authorization": f"Bearer {link['access_token']}", "Content-Type": "application/json"}

    async def watchlist(self) -> list[Entry]:
        out, page = [], 1
        while True:
            url = self.ctx.app[UPSTREAMS].url("trakt", "/sync/watchlist")
            async with self.ctx.app[HTTP].get(url, params={"page": page, "limit": TRAKT_PAGE}, headers=self.headers,
                                              allow_redirects=False) as response:
                if response.status != 200:
                    raise Unreadable(f"Trakt /sync/watchlist: HTTP {response.status}")
                entries = json.loads(await response.text())
                pages = int(response.headers.get("X-Pagination-Page-Count", "1"))
            for e in entries:
                kind = e.get("type")
                obj = e.get(kind) if kind in TRAKT_GROUPS else None
                if isinstance(obj, dict):
                    ids = obj.get("ids") or {}
                    guids = {f"{k}://{ids[k]}" for k in ID_KINDS if ids.get(k)}
                    out.append(Entry(kind, obj.get("title"), guids, _trakt_date(e.get("listed_at"))))
            if not entries or page >= pages:
                return out
            page += 1

    async def change(self, groups: list[Group], add: bool) -> set[int]:
        """Add (or remove) the titles in one call; the indexes of those Trakt did not find."""
        if not groups:
            return set()
        body: dict[str, list] = {"movies": [], "shows": []}
        for g in groups:
            body[TRAKT_GROUPS[g.media_type]].append({"ids": _trakt_ids(g.guids)})
        url = self.ctx.app[UPSTREAMS].url("trakt", "/sync/watchlist" if add else "/sync/watchlist/remove")
        async with self.ctx.app[HTTP].post(url, data=json.dumps(body), headers=self.headers,
                                           allow_redirects=False) as response:
            if response.status not in (200, 201):
                raise Unreadable(f"Trakt {url.rsplit('/', 1)[-1]}: HTTP {response.status}")
            answer = json.loads(await response.text())
        missing = answer.get("not_found") or {}
        lost = [e.get("ids") for group_name in TRAKT_GROUPS.values() for e in missing.get(group_name, [])
                if isinstance(e, dict)]
        return {i for i, g in enumerate(groups) if _trakt_ids(g.guids) in lost}


# --- the job ------------------------------------------------------------------------------------------

def _event(g: Group, direction: str, action: str, dry_run: bool, outcome: str) -> tuple:
    return (direction, action, g.media_type, g.title, json.dumps(sorted(g.guids)), int(dry_run), outcome)


async def sync_user(ctx: JobContext, user_id: int, plex: Plex, trakt: Trakt, dry_run: bool) -> int:
    """Sync one user's watchlists; how many changes were made (or, dry run, would be)."""
    snapshot = await ctx.db(load_snapshot, user_id)
    groups = group(snapshot, await plex.watchlist(), await trakt.watchlist())
    plans = {id(g): plan(g, p, t) for g, p, t in groups}
    events: list[tuple] = []
    synced = [g for g, _, _ in groups if plans[id(g)] == "keep"]
    if dry_run:
        events = [_event(g, TO_TRAKT if plans[id(g)].endswith("trakt") else TO_PLEX, plans[id(g)].split("-")[0],
                         True, "planned") for g, _, _ in groups if plans[id(g)] not in ("keep", "forget")]
        await ctx.db(save, user_id, None, events)
        return len(events)

    for add in (True, False):
        wanted = [g for g, _, _ in groups if plans[id(g)] == ("add-trakt" if add else "remove-trakt")]
        not_found = await trakt.change(wanted, add)
        for i, g in enumerate(wanted):
            events.append(_event(g, TO_TRAKT, "add" if add else "remove", False, "not_found" if i in not_found else "ok"))
            if add and i not in not_found:
                # no date: Trakt's own is read at the next run (its clock, not ours, dates a re-addition)
                g.trakt = Entry(g.media_type, g.title, set(g.guids), None)
                synced.append(g)
    for g, _, _ in groups:
        action = plans[id(g)]
        if action not in ("add-plex", "remove-plex"):
            continue
        add = action == "add-plex"
        key = g.plex_key or (await plex.find(g) if add else None)
        done = bool(key) and await plex.change(key, add)
        events.append(_event(g, TO_PLEX, "add" if add else "remove", False,
                             "ok" if done else "not_found" if not key else "failed"))
        if add and done:
            g.plex = Entry(g.media_type, g.title, set(g.guids), None, key)
            synced.append(g)
        elif not add and not done:
            synced.append(g)  # still on Plex: remembered, so the next run retries the removal
    await ctx.db(save, user_id, synced, events)
    return sum(1 for e in events if e[-1] == "ok")


@job("watchlist-sync", every=1800, timeout=900, dry_run=True,
     summary="Mirror opted-in users' Plex and Trakt watchlists both ways (additions and removals)")
async def watchlist_sync(ctx: JobContext) -> int:
    users = await ctx.db(opted_in)
    if not users:
        return 0
    if not ctx.app[OPTIONS].server.trakt_client_id:
        log.warning("watchlist sync: no Trakt app credentials are configured; nothing synced")
        return 0
    changed = 0
    for user_id, mode in users:
        plex_token, link = await ctx.app[VAULT].run(user_tokens, user_id)
        if not plex_token or not link:
            log.info("watchlist sync skipped: Plex or Trakt not connected", extra={"fields": {"user_id": user_id}})
            continue
        try:
            changed += await sync_user(ctx, user_id, Plex(ctx, plex_token), Trakt(ctx, link),
                                       mode == "dry-run" or ctx.dry_run)
        except (Unreadable, aiohttp.ClientError, ValueError) as exc:
            log.warning("watchlist sync of a user failed: %s", exc if isinstance(exc, Unreadable)
                        else type(exc).__name__, extra={"fields": {"user_id": user_id}})
    return changed
