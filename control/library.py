"""The library sync job: each Plex server's sections into `media_items`, incrementally.

For every upstream of kind `plex-server` with a `base_url` in rules.yaml (PROJECTIONIST_UPSTREAMS
overrides apply), with the Plex token of an admin (else of any user) from the vault: list the
sections, then page through each section's items newest change first (`sort=updatedAt:desc`,
`X-Plex-Container-Start/Size`, `includeGuids=1`; movies, shows, and a show section's episodes)
and stop at the first item not changed since the last run (the watermark, per server, section and
type, in `control_state`). Rows are upserts: re-running adds nothing. Titles, type, year, guids
(tmdb://, imdb://, tvdb://), added/updated times feed the analytics and the cache warmer.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from typing import Any

import aiohttp

from projectionist.config import parse_overrides
from projectionist.store import WARM_AFTER_LIBRARY_CHANGE
from projectionist.vault import Vault

from .auth import PLEX_TOKEN_KIND
from .jobs import JOBS, JobContext, job
from .keys import CONFIG, HTTP, OPTIONS, VAULT
from .sessions import is_admin
from .warming import request_warm

log = logging.getLogger("control.library")

PAGE_SIZE = 200
SECTION_TYPES = {"movie": ((1, "movie"),), "show": ((2, "show"), (4, "episode"))}


def plex_servers(ctx: JobContext) -> dict[str, str]:
    """Upstream name -> base URL of each Plex server of rules.yaml (after the overrides)."""
    return plex_server_bases(ctx.app)


def plex_server_bases(app) -> dict[str, str]:
    """plex_servers for anything holding the app (admission.py too)."""
    rules = app[JOBS].rules if JOBS in app else None
    if rules is None:
        return {}
    overrides = parse_overrides(app[CONFIG].upstream_overrides)
    return {name: (overrides.get(name) or up.base_url).rstrip("/") for name, up in rules.upstreams.items()
            if up.kind == "plex-server" and (up.base_url or name in overrides)}


def candidate_tokens(vault: Vault, admins: frozenset[str]) -> list[str]:
    """Plex tokens to try, admins' first (the server owner can read every section)."""
    rows = vault.conn.execute("SELECT id, plex_account_id FROM users ORDER BY id").fetchall()
    first = rows[0][0] if rows else None
    ordered = sorted(rows, key=lambda r: not is_admin(admins, r[1], r[0], first))
    tokens = []
    for user_id, _ in ordered:
        newest = vault.newest(PLEX_TOKEN_KIND, user_id)
        if newest and newest[0] not in tokens:
            tokens.append(newest[0])
    return tokens


def _watermark_name(server: str, section: str, plex_type: int) -> str:
    return f"library-sync:{server}:{section}:{plex_type}"


def read_watermark(conn: sqlite3.Connection, name: str) -> float:
    row = conn.execute("SELECT value FROM control_state WHERE name = ?", (name,)).fetchone()
    return float(row[0]) if row else 0.0


def save_items(conn: sqlite3.Connection, server: str, section: str, items: list[dict], watermark: tuple[str, float]
               ) -> int:
    """Upsert the items (keeping what the proxy's viewing history wrote) and move the watermark, in
    one transaction. Returns how many rows were new or changed."""
    now = time.time()
    conn.execute("BEGIN IMMEDIATE")
    try:
        changed = 0
        for item in items:
            row = (item["ratingKey"], item.get("type"), item.get("title"), item.get("grandparentTitle"),
                   item.get("parentIndex"), item.get("index"), item.get("year"), item.get("duration"), now,
                   json.dumps(sorted(g["id"] for g in item.get("Guid", []) if "id" in g)), item.get("addedAt"),
                   item.get("updatedAt"), section, server)
            changed += conn.execute(
                "INSERT INTO media_items (rating_key, type, title, grandparent_title, parent_index, item_index, year,"
                " duration_ms, updated_at, guids, added_at, plex_updated_at, section, server)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (rating_key) DO UPDATE SET"
                " type = excluded.type, title = excluded.title, grandparent_title = excluded.grandparent_title,"
                " parent_index = excluded.parent_index, item_index = excluded.item_index, year = excluded.year,"
                " duration_ms = coalesce(excluded.duration_ms, duration_ms), updated_at = excluded.updated_at,"
                " guids = excluded.guids, added_at = excluded.added_at, plex_updated_at = excluded.plex_updated_at,"
                " section = excluded.section, server = excluded.server"
                " WHERE plex_updated_at IS NOT excluded.plex_updated_at OR guids IS NOT excluded.guids", row).rowcount
        name, value = watermark
        conn.execute("INSERT INTO control_state (name, value) VALUES (?, ?) ON CONFLICT (name) DO UPDATE SET "
                     "value = excluded.value WHERE CAST(value AS REAL) < CAST(excluded.value AS REAL)",
                     (name, repr(value)))
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return changed


async def _get(http: aiohttp.ClientSession, url: str, token: str, params: dict[str, Any] | None = None) -> Any:
    headers = {"Accept": "application/json", "X-Plex-Token": token, "X-Plex-Product": "Projectionist"}
    async with http.get(url, params=params, headers=headers, allow_redirects=False) as response:
        if response.status == 401:
            raise PermissionError("token refused")
        response.raise_for_status()
        return (await response.json(content_type=None))["MediaContainer"]


async def sync_section(ctx: JobContext, server: str, base: str, token: str, section: dict) -> int:
    http, changed = ctx.app[HTTP], 0
    for plex_type, _name in SECTION_TYPES.get(section.get("type"), ()):
        mark = _watermark_name(server, section["key"], plex_type)
        since = await ctx.db(read_watermark, mark)
        newest, start = since, 0
        while True:
            page = await _get(http, f"{base}/library/sections/{section['key']}/all", token, {
                "type": plex_type, "sort": "updatedAt:desc", "includeGuids": 1,
                "X-Plex-Container-Start": start, "X-Plex-Container-Size": PAGE_SIZE})
            items = page.get("Metadata", [])
            relevant = [i for i in items if i.get("type") == _name]  # not the clips a movie type also lists
            fresh = [i for i in relevant if (i.get("updatedAt") or 0) >= since]
            newest = max([newest, *(i.get("updatedAt") or 0 for i in fresh)])
            changed += await ctx.db(save_items, server, section["key"], fresh, (mark, newest))
            start += len(items)
            total = page.get("totalSize", start)
            # Sorted newest change first: an item older than the watermark means the rest are too.
            if not items or len(fresh) < len(relevant) or start >= total:
                break
    return changed


@job("library-sync", every=6 * 3600, timeout=1800, run_at_start=False,
     summary="Copy each Plex server's sections into media_items (incremental by updatedAt)")
async def library_sync(ctx: JobContext) -> int:
    servers = plex_servers(ctx)
    if not servers:
        return 0
    tokens = await ctx.app[VAULT].run(candidate_tokens, ctx.app[OPTIONS].admins)
    synced_before = await ctx.db(_synced_before)
    changed = 0
    for server, base in servers.items():
        for token in tokens:
            try:
                sections = (await _get(ctx.app[HTTP], f"{base}/library/sections", token)).get("Directory", [])
            except PermissionError:
                continue  # not this user's server: the next token
            for section in sections:
                changed += await sync_section(ctx, server, base, token, section)
            break
        else:
            log.warning("library sync: no stored Plex token opens server %s", server)
    if changed and synced_before:  # the library changed (the first sync only learns it): refresh the cache
        await ctx.db(request_warm, WARM_AFTER_LIBRARY_CHANGE)
    return changed


def _synced_before(conn: sqlite3.Connection) -> bool:
    return conn.execute("SELECT 1 FROM control_state WHERE name LIKE 'library-sync:%' LIMIT 1").fetchone() is not None
