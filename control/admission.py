"""Who may sign in: the owner of the served Plex server(s) and the users it is shared with.

At every sign-in the account's own plex.tv `resources` are read with its token: a server whose
`clientIdentifier` is one of the served machine identifiers admits it (owner when `owned`, else a
user it is shared with). The served servers are `PROJECTIONIST_PLEX_SERVERS` (machine
identifiers) when set; otherwise the Plex servers of rules.yaml as they identify themselves
(`GET /identity`); if none answers, the servers owned by the first owner who signs in. Whatever
was found is remembered in `control_state`.
An optional allow-list (`PROJECTIONIST_ALLOWED_USERS`: Plex account ids, usernames or e-mails)
narrows it further; the servers' owners are always admitted. Disabled users are refused.

Everyone else gets 403 ("this Projectionist serves <server name>; ask its owner for access"), as
JSON or, for a browser coming back from app.plex.tv, a page; the refusal is logged (account id, no
token) and counted per hour and reason in `sign_in_refusals`.

`refresh_members` (the `plex-members` job, and after each owner's sign-in) reads the owner's
shared users (plex.tv `/api/v2/friends`, their `sharedServers`) and revokes the sessions and
surrogates of signed-up users who lost access (no longer shared, not an owner).
"""

from __future__ import annotations

import html
import json
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aiohttp
from aiohttp import web

from projectionist.vault import Vault

from .errors import ApiError, upstream_failed
from .jobs import JobContext, job
from .keys import HTTP, OPTIONS, PLEX_CLIENT_ID, UPSTREAMS, VAULT
from .upstreams import plex_headers
from .sessions import iso, now_utc, revoke_user_sessions
from .vault_executor import transaction

log = logging.getLogger("control.admission")

SERVED_STATE = "served_plex_servers"  # control_state: {machine id: name}
MEMBERS_STATE = "plex_server_members"  # control_state: {"owners": [...], "shared": [...], "refreshed_at": ...}
PLEX_KIND = "plex"


@dataclass(frozen=True)
class Admission:
    role: str  # "owner" | "shared"
    servers: dict[str, str]  # machine id -> name, of the served servers this account reaches


class NotAdmitted(ApiError):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(403, "not_admitted", message)
        self.reason = reason


# --- blocking store operations ------------------------------------------------------------------

def served_servers(vault: Vault) -> dict[str, str]:
    row = vault.conn.execute("SELECT value FROM control_state WHERE name = ?", (SERVED_STATE,)).fetchone()
    return json.loads(row[0]) if row else {}


def remember_served(vault: Vault, servers: dict[str, str]) -> None:
    known = served_servers(vault)
    known.update(servers)
    vault.conn.execute("INSERT OR REPLACE INTO control_state (name, value) VALUES (?, ?)",
                       (SERVED_STATE, json.dumps(known, sort_keys=True)))


def is_disabled(vault: Vault, plex_account_id: str) -> bool:
    row = vault.conn.execute("SELECT disabled_at FROM users WHERE plex_account_id = ?",
                             (plex_account_id,)).fetchone()
    return bool(row and row[0])


def count_refusal(vault: Vault, reason: str) -> None:
    hour = datetime.now(UTC).strftime("%Y-%m-%dT%H:00")
    vault.conn.execute("INSERT INTO sign_in_refusals (hour, reason, refusals) VALUES (?, ?, 1) "
                       "ON CONFLICT (hour, reason) DO UPDATE SET refusals = refusals + 1", (hour, reason))


def owner_token(vault: Vault, served: dict[str, str]) -> str | None:
    """The newest vaulted Plex token of a user who owns a served server (recorded at sign-in)."""
    members = _members(vault)
    for account_id in members.get("owners", []):
        row = vault.conn.execute("SELECT id FROM users WHERE plex_account_id = ? AND disabled_at IS NULL",
                                 (account_id,)).fetchone()
        if row:
            newest = vault.newest(PLEX_KIND, row[0])
            if newest:
                return newest[0]
    return None


def _members(vault: Vault) -> dict[str, Any]:
    row = vault.conn.execute("SELECT value FROM control_state WHERE name = ?", (MEMBERS_STATE,)).fetchone()
    return json.loads(row[0]) if row else {}


def record_owner(vault: Vault, account_id: str) -> None:
    members = _members(vault)
    owners = set(members.get("owners", [])) | {account_id}
    members["owners"] = sorted(owners)
    vault.conn.execute("INSERT OR REPLACE INTO control_state (name, value) VALUES (?, ?)",
                       (MEMBERS_STATE, json.dumps(members, sort_keys=True)))


def apply_members(vault: Vault, shared: list[str]) -> int:
    """Remember who the servers are shared with; revoke users who are neither owner nor shared.
    Returns how many users lost their sessions and surrogates."""
    members = _members(vault)
    members.update(shared=sorted(set(shared)), refreshed_at=iso(now_utc()))
    allowed = set(members.get("owners", [])) | set(shared)
    revoked = 0
    with transaction(vault.conn) as conn:
        conn.execute("INSERT OR REPLACE INTO control_state (name, value) VALUES (?, ?)",
                     (MEMBERS_STATE, json.dumps(members, sort_keys=True)))
        for user_id, account_id in conn.execute("SELECT id, plex_account_id FROM users").fetchall():
            if account_id is not None and account_id not in allowed:
                if revoke_user_sessions(vault, user_id) + vault.revoke_user(user_id):
                    revoked += 1
                    log.warning("access withdrawn at plex.tv: sessions and surrogates revoked",
                                extra={"fields": {"user_id": user_id}})
    return revoked


# --- the decision ---------------------------------------------------------------------------------

def _servers(resources: Any) -> list[dict[str, Any]]:
    if not isinstance(resources, list):
        return []
    return [r for r in resources if isinstance(r, dict) and "server" in str(r.get("provides") or "").split(",")
            and r.get("clientIdentifier")]


def _allowed(allow_list: frozenset[str], account: dict[str, Any]) -> bool:
    names = {str(account.get(k)).lower() for k in ("id", "username", "email", "title") if account.get(k)}
    return bool(names & {a.lower() for a in allow_list})


def server_label(servers: dict[str, str]) -> str:
    names = sorted({name for name in servers.values() if name})
    return ", ".join(names) if names else "its own Plex server"


async def admit(request: web.Request, account: dict[str, Any], resources: Any) -> Admission:
    """The account's admission, or NotAdmitted (counted and logged) with the message to show."""
    vault = request.app[VAULT]
    options = request.app[OPTIONS]
    account_id = str(account["id"])
    configured = {machine: "" for machine in options.plex_servers}
    served = {**configured, **(await vault.run(served_servers))}
    if not served:  # the servers of rules.yaml, as they identify themselves
        served = await identify_configured_servers(request.app)
        if served:
            await vault.run(remember_served, served)
    if configured:
        served = {k: v for k, v in served.items() if k in configured}
    reachable = {str(s["clientIdentifier"]): s for s in _servers(resources)}
    try:
        if await vault.run(is_disabled, account_id):
            raise NotAdmitted("disabled", f"this Projectionist serves {server_label(served)}; an administrator "
                                          "disabled your account here: ask the server's owner")
        if not served:  # nobody has signed in yet: the first sign-in is the owner's
            owned = {machine: str(s.get("name") or "") for machine, s in reachable.items() if s.get("owned")}
            if not owned:
                raise NotAdmitted("no_server", "this Projectionist is not set up yet: its Plex server's owner signs "
                                               "in first (this account owns no Plex server)")
            await vault.run(remember_served, owned)
            await vault.run(record_owner, account_id)
            return Admission("owner", owned)
        mine = {machine: str(s.get("name") or served[machine]) for machine, s in reachable.items() if machine in served}
        if not mine:
            raise NotAdmitted("not_shared", f"this Projectionist serves {server_label(served)}, which is not shared "
                                            "with your Plex account; ask its owner for access")
        owner = any(reachable[m].get("owned") for m in mine)
        if not owner and options.allowed_users and not _allowed(options.allowed_users, account):
            raise NotAdmitted("not_allowed", f"this Projectionist serves {server_label(served)} to a list of "
                                             "users you are not on; ask its owner for access")
        await vault.run(remember_served, mine)  # learn the names
        if owner:
            await vault.run(record_owner, account_id)
        return Admission("owner" if owner else "shared", mine)
    except NotAdmitted as refused:
        await vault.run(count_refusal, refused.reason)
        log.warning("sign-in refused", extra={"fields": {"plex_account_id": account_id, "reason": refused.reason}})
        raise


async def identify_configured_servers(app: web.Application) -> dict[str, str]:
    """Machine identifier of each Plex server in rules.yaml (`GET /identity` needs no token); {} when
    none answers (then the first owner to sign in names them)."""
    from .library import plex_server_bases  # library imports auth, which imports this module

    found: dict[str, str] = {}
    for base in plex_server_bases(app).values():
        try:
            async with app[HTTP].get(base + "/identity", headers={"Accept": "application/json"},
                                     timeout=aiohttp.ClientTimeout(total=5)) as response:
                body = await response.json(content_type=None) if response.status == 200 else None
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            log.warning("could not identify the Plex server at %s: %s", base, type(exc).__name__)
            continue
        machine = ((body or {}).get("MediaContainer") or {}).get("machineIdentifier") if isinstance(body, dict) else None
        if machine:
            found[str(machine)] = ""
    return found


def refusal_page(message: str) -> web.Response:
    body = ("<!doctype html><html lang=en><meta charset=utf-8><title>No access - Projectionist</title>"
            "<link rel=stylesheet href=/static/settings.css>"
            f"<main><h1>No access</h1><p role=alert>{html.escape(message)}</p>"
            "<p><a href=/>Back</a></p></main></html>")
    return web.Response(status=403, text=body, content_type="text/html")


# --- the periodic refresh ---------------------------------------------------------------------------

async def refresh_members(app: web.Application, fetch) -> int | None:
    """Re-reads who the served servers are shared with (the owner's plex.tv friends) and revokes
    users who lost access. `fetch(method, path, token)` -> (status, body) calls plex.tv. None when
    there is nothing to refresh yet (no owner signed in)."""
    vault = app[VAULT]
    served = await vault.run(served_servers)
    token = await vault.run(owner_token, served) if served else None
    if token is None:
        return None
    status, friends = await fetch("GET", "/api/v2/friends", token)
    if status != 200 or not isinstance(friends, list):
        raise upstream_failed("plex.tv")
    shared = [str(f["id"]) for f in friends if isinstance(f, dict) and f.get("id") and any(
        isinstance(s, dict) and str(s.get("machineIdentifier")) in served for s in f.get("sharedServers") or [])]
    return await vault.run(apply_members, shared)


async def _plextv_get(app: web.Application, method: str, path: str, token: str) -> tuple[int, Any]:
    async with app[HTTP].request(method, app[UPSTREAMS].url("plextv", path),
                                 headers=plex_headers(app[PLEX_CLIENT_ID], token),
                                 timeout=aiohttp.ClientTimeout(total=20)) as response:
        return response.status, (await response.json(content_type=None) if response.status == 200 else None)


@job("plex-members", every=3600, timeout=120,
     summary="Re-read who the served Plex servers are shared with; revoke users who lost access")
async def plex_members(ctx: JobContext) -> int | None:
    return await refresh_members(ctx.app, lambda method, path, token: _plextv_get(ctx.app, method, path, token))
