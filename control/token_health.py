"""Token health: the vaulted Plex and Trakt tokens are checked before a player runs into them.

The `token-health` job asks plex.tv `GET /api/v2/user` with each live Plex token, and Trakt
`GET /users/me` with each live Trakt access token, one call at a time and spaced (cheap calls,
and never a burst against either service). A token the upstream refuses (401) is marked invalid
in the vault: its surrogates stop resolving, so the proxy answers the player's next request with
a 401 in the upstream's format without calling it, the user's settings and `/setup` say "sign in
again", `token_health_events` (the dashboard) has the event, and PROJECTIONIST_NOTIFY_URLS get an
alert. Anything else (5xx, timeouts, no network) proves nothing and changes nothing. A fresh
sign-in vaults the token again (or a new one) and heals it (projectionist/vault.py).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

import aiohttp
from aiohttp import web

from projectionist.vault import Vault

from . import reports, trakt
from .jobs import JobContext, job
from .keys import HTTP, OPTIONS, PLEX_CLIENT_ID, UPSTREAMS, VAULT
from .settings import PLEX_KIND, SIGN_IN_AGAIN
from .upstreams import plex_headers

log = logging.getLogger("control.token_health")

SPACING = 0.25  # seconds between two checks: at most 4 calls a second to plex.tv or Trakt
TIMEOUT = aiohttp.ClientTimeout(total=15)

Check = Callable[[str], Awaitable[int | None]]  # real token -> the upstream's status, None: no answer


async def _status(app: web.Application, url: str, headers: dict[str, str]) -> int | None:
    try:
        # Never followed: a redirect would carry the token to wherever it points.
        async with app[HTTP].get(url, headers=headers, timeout=TIMEOUT, allow_redirects=False) as response:
            return response.status
    except (aiohttp.ClientError, TimeoutError) as exc:
        log.warning("token check got no answer: %s", type(exc).__name__)
        return None


def checks(app: web.Application) -> dict[str, Check]:
    """How each kind is checked; Trakt only with the server's app credentials (the app's client id)."""
    out: dict[str, Check] = {PLEX_KIND: lambda real: _status(
        app, app[UPSTREAMS].url("plextv", "/api/v2/user"), plex_headers(app[PLEX_CLIENT_ID], real))}
    server = app[OPTIONS].server
    if server.trakt_client_id:
        out[trakt.ACCESS_KIND] = lambda real: _status(
            app, app[UPSTREAMS].url("trakt", "/users/me"),
            {"trakt-api-version": "2", "trakt-api-key": server.trakt_client_id, "Authorization": f"Bearer {real}"})
    return out


async def check_tokens(app: web.Application, spacing: float = SPACING) -> dict[str, int]:
    """One pass over the vault. Returns counts: checked, invalid (newly marked)."""
    vault = app[VAULT]
    by_kind = checks(app)
    tokens = await vault.run(Vault.live_tokens, tuple(by_kind))
    seen: set[tuple[str, str]] = set()
    dead: list[tuple[str, list[int | None]]] = []
    checked = 0
    for _, kind, _, real in tokens:
        if (kind, real) in seen:  # one real token may stand behind several surrogates
            continue
        seen.add((kind, real))
        if checked:
            await asyncio.sleep(spacing)
        checked += 1
        if await by_kind[kind](real) == 401:
            dead.append((kind, await vault.run(Vault.mark_invalid, kind, real)))
    if dead:
        await _alert(app, dead)
    return {"checked": checked, "invalid": len(dead)}


async def _alert(app: web.Application, dead: list[tuple[str, list[int | None]]]) -> None:
    users = sorted({u for _, owners in dead for u in owners if u is not None})
    names = await app[VAULT].run(_usernames, users)
    text = "; ".join(f"{SIGN_IN_AGAIN[kind]} token of {', '.join(names.get(u, '?') for u in set(owners) if u) or 'no user'}"
                     for kind, owners in dead)
    log.warning("token health: %d vaulted token(s) refused by their upstream: their users must sign in again", len(dead))
    if urls := reports.notify_urls():
        when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
        await asyncio.to_thread(reports.send, urls, f"Projectionist: {len(dead)} stored token(s) revoked",
                                f"These users must sign in again: {text}\n({when})")


def _usernames(vault: Vault, users: list[int]) -> dict[int, str]:
    if not users:
        return {}
    marks = ", ".join("?" for _ in users)
    return dict(vault.conn.execute(f"SELECT id, username FROM users WHERE id IN ({marks})", users).fetchall())


@job("token-health", every=6 * 3600, timeout=900,
     summary="Check every vaulted Plex and Trakt token with plex.tv and Trakt; mark refused ones (sign in again)")
async def token_health(ctx: JobContext) -> int:
    counts = await check_tokens(ctx.app)
    return counts["checked"]
