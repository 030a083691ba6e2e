"""Administration: users, usage, performance and errors. Admins only (403 for everyone else).

Admins are the Plex account ids in PROJECTIONIST_ADMINS; without any, the first user who signed in;
and anyone an admin made admin. Admins disable and enable users (a disabled user's sessions and
surrogates are revoked at once and their cache partition flushed), grant admin, and list and
revoke any user's sessions.
"""

from __future__ import annotations

import logging
import sqlite3

from aiohttp import web

from projectionist.store import utcnow_iso
from projectionist.vault import Vault

from .auth import _sync_admin_flags
from .errors import ApiError
from .keys import OPTIONS, VAULT
from .models import (
    AdminErrors,
    AdminGrant,
    AdminPerformance,
    AdminSession,
    AdminSessions,
    AdminUsage,
    AdminUser,
    AdminUserChange,
    AdminUsers,
    DaysQuery,
    ErrorsQuery,
    HoursQuery,
    SessionPath,
    UserPath,
)
from .openapi import ADMIN, Api, Call
from .sessions import FALLBACK_ADMIN_SQL, is_admin, iso, now_utc, parse_iso, revoke_user_sessions
from .vault_executor import transaction

log = logging.getLogger("control.admin")
from .usage import all_usage, performance, query, recent_errors

api = Api("admin")
routes = api.routes


def list_users(conn: sqlite3.Connection, admins: frozenset[str]) -> AdminUsers:
    first = conn.execute(f"SELECT {FALLBACK_ADMIN_SQL}").fetchone()[0]
    rows = conn.execute(
        "SELECT u.id, u.username, u.plex_account_id, u.created_at, u.last_seen_at, "
        "(SELECT count(*) FROM sessions s WHERE s.user_id = u.id AND s.revoked_at IS NULL AND s.expires_at > ?), "
        "EXISTS (SELECT 1 FROM user_credentials c WHERE c.user_id = u.id AND c.name = 'tmdb'), "
        "EXISTS (SELECT 1 FROM user_credentials c WHERE c.user_id = u.id AND c.name = 'trakt'), "
        "u.admin_granted, u.disabled_at "
        "FROM users u ORDER BY u.id", (iso(now_utc()),)).fetchall()
    return AdminUsers(users=[
        AdminUser(id=r[0], username=r[1], plex_account_id=r[2], is_admin=is_admin(admins, r[2], r[0], first, granted=bool(r[8])),
                  disabled=r[9] is not None,
                  created_at=parse_iso(r[3]), last_seen_at=parse_iso(r[4]), active_sessions=r[5],
                  custom_tmdb_key=bool(r[6]), trakt_connected=bool(r[7]))
        for r in rows])


@api.get("/api/admin/users", summary="Every user", access=ADMIN, response=AdminUsers)
async def admin_users(request: web.Request, call: Call) -> AdminUsers:
    return await query(request.app, list_users, request.app[OPTIONS].admins)


@api.get("/api/admin/stats/usage", summary="Usage of every user", access=ADMIN, query=DaysQuery, response=AdminUsage)
async def admin_usage(request: web.Request, call: Call) -> AdminUsage:
    return await query(request.app, all_usage, call.query.days)


@api.get("/api/admin/stats/performance", summary="Latency percentiles and cache hit ratio per route",
         access=ADMIN, query=HoursQuery, response=AdminPerformance)
async def admin_performance(request: web.Request, call: Call) -> AdminPerformance:
    return await query(request.app, performance, call.query.hours)


@api.get("/api/admin/stats/errors", summary="Recent upstream and proxy errors (redacted)", access=ADMIN,
         query=ErrorsQuery, response=AdminErrors)
async def admin_errors(request: web.Request, call: Call) -> AdminErrors:
    return await query(request.app, recent_errors, call.query.hours, call.query.limit)


# --- administering users: disable/enable, admin grants, sessions ---------------------------------
# Writes go through the vault executor (one writer thread); reads of the result use its connection.

USER_PARTITION = "u{}"  # the response cache's partition of a user (proxy_addons/response_cache.py)


def _user_row(vault: Vault, user_id: int, admins: frozenset[str]) -> AdminUser:
    users = {u.id: u for u in list_users(vault.conn, admins).users}
    if user_id not in users:
        raise ApiError(404, "user_not_found", "no user with this id")
    return users[user_id]


def _cut_off(vault: Vault, user_id: int, requested_by: int) -> tuple[int, int, int]:
    """Every session and surrogate of the user revoked, and their cache partition's flush queued."""
    sessions = revoke_user_sessions(vault, user_id)
    surrogates = vault.revoke_user(user_id)
    # Inside the caller's transaction (cache_api.queue_flush commits its own).
    flush_id = vault.conn.execute(
        "INSERT INTO cache_flush_requests (target, value, requested_at, requested_by) VALUES (?, ?, ?, ?)",
        ("partition", USER_PARTITION.format(user_id), utcnow_iso(), requested_by)).lastrowid
    return sessions, surrogates, flush_id


def set_disabled(vault: Vault, user_id: int, disabled: bool, admin_id: int,
                 admins: frozenset[str]) -> AdminUserChange:
    if disabled and user_id == admin_id:
        raise ApiError(400, "cannot_disable_self", "an admin cannot disable their own account")
    _user_row(vault, user_id, admins)
    with transaction(vault.conn) as conn:
        sessions = surrogates = 0
        flush_id = None
        if disabled:
            conn.execute("UPDATE users SET disabled_at = coalesce(disabled_at, ?) WHERE id = ?",
                         (iso(now_utc()), user_id))
            sessions, surrogates, flush_id = _cut_off(vault, user_id, admin_id)
        else:
            conn.execute("UPDATE users SET disabled_at = NULL WHERE id = ?", (user_id,))
    return AdminUserChange(user=_user_row(vault, user_id, admins), sessions_revoked=sessions,
                           surrogates_revoked=surrogates, cache_flush_id=flush_id)


def set_admin_grant(vault: Vault, user_id: int, admin: bool, admin_id: int, admins: frozenset[str]) -> AdminUserChange:
    if not admin and user_id == admin_id:
        raise ApiError(400, "cannot_demote_self", "an admin cannot take back their own admin rights")
    _user_row(vault, user_id, admins)
    with transaction(vault.conn) as conn:
        if admin:  # the first grant ends the first-user rule: the granting admin keeps their rights
            conn.execute(f"UPDATE users SET admin_granted = 1 WHERE id = ? AND id = {FALLBACK_ADMIN_SQL}", (admin_id,))
        conn.execute("UPDATE users SET admin_granted = ? WHERE id = ?", (int(admin), user_id))
        _sync_admin_flags(conn, admins)
    return AdminUserChange(user=_user_row(vault, user_id, admins))


def user_sessions(vault: Vault, user_id: int, admins: frozenset[str]) -> AdminSessions:
    _user_row(vault, user_id, admins)
    now = iso(now_utc())
    rows = vault.conn.execute(
        "SELECT rowid, created_at, last_seen_at, expires_at, revoked_at, user_agent, ip FROM sessions "
        "WHERE user_id = ? ORDER BY rowid DESC LIMIT 200", (user_id,)).fetchall()
    surrogates = vault.conn.execute("SELECT count(*) FROM vault_tokens WHERE user_id = ? AND revoked_at IS NULL",
                                    (user_id,)).fetchone()[0]
    return AdminSessions(user_id=user_id, surrogates=surrogates, sessions=[
        AdminSession(id=r[0], created_at=parse_iso(r[1]), last_seen_at=parse_iso(r[2]), expires_at=parse_iso(r[3]),
                     revoked_at=parse_iso(r[4]), active=r[4] is None and r[3] > now, user_agent=r[5], ip=r[6])
        for r in rows])


def revoke_one_session(vault: Vault, session_id: int) -> int:
    return vault.conn.execute("UPDATE sessions SET revoked_at = ? WHERE rowid = ? AND revoked_at IS NULL",
                              (iso(now_utc()), session_id)).rowcount


def revoke_everything(vault: Vault, user_id: int, admin_id: int, admins: frozenset[str]) -> AdminUserChange:
    _user_row(vault, user_id, admins)
    with transaction(vault.conn):
        sessions, surrogates, flush_id = _cut_off(vault, user_id, admin_id)
    return AdminUserChange(user=_user_row(vault, user_id, admins), sessions_revoked=sessions,
                           surrogates_revoked=surrogates, cache_flush_id=flush_id)


def _audit(action: str, call: Call, user_id: int, **fields) -> None:
    log.info(f"admin: {action}", extra={"fields": {"admin_id": call.user.user_id, "user_id": user_id, **fields}})


@api.post("/api/admin/users/{user_id}/disable", summary="Disable a user", access=ADMIN, path_params=UserPath,
          response=AdminUserChange, responses={404: "No such user"})
async def disable_user(request: web.Request, call: Call) -> AdminUserChange:
    """The user can no longer sign in; their sessions and proxy surrogates are revoked now (their
    player's next request gets 401 in Plex's format) and their cache partition is flushed."""
    change = await request.app[VAULT].run(set_disabled, call.path.user_id, True, call.user.user_id,
                                          request.app[OPTIONS].admins)
    _audit("user disabled", call, call.path.user_id, sessions=change.sessions_revoked,
           surrogates=change.surrogates_revoked)
    return change


@api.post("/api/admin/users/{user_id}/enable", summary="Enable a disabled user", access=ADMIN,
          path_params=UserPath, response=AdminUserChange, responses={404: "No such user"})
async def enable_user(request: web.Request, call: Call) -> AdminUserChange:
    """The user may sign in again (if they still have access to the Plex server)."""
    change = await request.app[VAULT].run(set_disabled, call.path.user_id, False, call.user.user_id,
                                          request.app[OPTIONS].admins)
    _audit("user enabled", call, call.path.user_id)
    return change


@api.put("/api/admin/users/{user_id}/admin", summary="Grant or take back admin rights", access=ADMIN,
         path_params=UserPath, body=AdminGrant, response=AdminUserChange, responses={404: "No such user"})
async def grant_admin(request: web.Request, call: Call) -> AdminUserChange:
    """Admins configured in PROJECTIONIST_ADMINS (or the first user) stay admins whatever this says."""
    change = await request.app[VAULT].run(set_admin_grant, call.path.user_id, call.body.admin, call.user.user_id,
                                          request.app[OPTIONS].admins)
    _audit("admin granted" if call.body.admin else "admin grant taken back", call, call.path.user_id)
    return change


@api.get("/api/admin/users/{user_id}/sessions", summary="A user's sessions (browsers) and live surrogates",
         access=ADMIN, path_params=UserPath, response=AdminSessions, responses={404: "No such user"})
async def admin_user_sessions(request: web.Request, call: Call) -> AdminSessions:
    return await request.app[VAULT].run(user_sessions, call.path.user_id, request.app[OPTIONS].admins)


@api.post("/api/admin/users/{user_id}/revoke", summary="Sign a user out everywhere", access=ADMIN,
          path_params=UserPath, response=AdminUserChange, responses={404: "No such user"})
async def revoke_user_access(request: web.Request, call: Call) -> AdminUserChange:
    """Revokes every session and proxy surrogate of the user (they may sign in again)."""
    change = await request.app[VAULT].run(revoke_everything, call.path.user_id, call.user.user_id,
                                          request.app[OPTIONS].admins)
    _audit("user signed out everywhere", call, call.path.user_id, sessions=change.sessions_revoked)
    return change


@api.delete("/api/admin/sessions/{session_id}", summary="Revoke one session", access=ADMIN,
            path_params=SessionPath, status=204, responses={404: "No such live session"})
async def revoke_session_by_id(request: web.Request, call: Call) -> web.Response:
    if not await request.app[VAULT].run(revoke_one_session, call.path.session_id):
        raise ApiError(404, "session_not_found", "no live session with this id")
    log.info("admin: session revoked", extra={"fields": {"admin_id": call.user.user_id,
                                                         "session_id": call.path.session_id}})
    return web.Response(status=204)
