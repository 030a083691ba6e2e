"""Administration: users, usage, performance and errors. Admins only (403 for everyone else).

Admins are the Plex account ids in PROJECTIONIST_ADMINS; without any, the first user who signed in.
"""

from __future__ import annotations

import sqlite3

from aiohttp import web

from .keys import OPTIONS
from .models import AdminErrors, AdminPerformance, AdminUsage, AdminUser, AdminUsers, DaysQuery, ErrorsQuery, HoursQuery
from .openapi import ADMIN, Api, Call
from .sessions import is_admin, iso, now_utc, parse_iso
from .usage import all_usage, performance, query, recent_errors

api = Api("admin")
routes = api.routes


def list_users(conn: sqlite3.Connection, admins: frozenset[str]) -> AdminUsers:
    first = conn.execute("SELECT min(id) FROM users").fetchone()[0]
    rows = conn.execute(
        "SELECT u.id, u.username, u.plex_account_id, u.created_at, u.last_seen_at, "
        "(SELECT count(*) FROM sessions s WHERE s.user_id = u.id AND s.revoked_at IS NULL AND s.expires_at > ?), "
        "EXISTS (SELECT 1 FROM user_credentials c WHERE c.user_id = u.id AND c.name = 'tmdb'), "
        "EXISTS (SELECT 1 FROM user_credentials c WHERE c.user_id = u.id AND c.name = 'trakt') "
        "FROM users u ORDER BY u.id", (iso(now_utc()),)).fetchall()
    return AdminUsers(users=[
        AdminUser(id=r[0], username=r[1], plex_account_id=r[2], is_admin=is_admin(admins, r[2], r[0], first),
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
