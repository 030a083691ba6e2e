"""One sign-in: the control plane's Plex session admits its admins to the dashboard (issue 19).

Browsers scope cookies by host name, not port, so the control plane's session cookie (`pj_session`,
HttpOnly) reaches the dashboard too when both are opened on the same host (as `projectionist run`
serves them). Each request's cookie is checked against the sessions table as the control plane
checks it: not revoked (signing out there ends it here at once), not expired, its user not disabled
and an admin (`users.is_admin`, which the control plane keeps in line with its admin rule). The
actor is then the dashboard's one admin actor, so every permission in datasette_metadata.yml
stays as it is.

The dashboard password (HTTP Basic, datasette-auth-passwords) still works, for scripts and as a
fallback; credentials sent are judged on their own (a wrong password is a 401, counted by
dashboard_guard, whatever cookie comes with it). Without either, a browser gets a page that links to
the control plane's sign-in instead of a password prompt, a signed-in user who is not an admin a
403 saying so, and other clients Basic's 401 challenge. Nothing else of Datasette answers.

This gate replaces the auth plugin's own `http_basic_auth` gate (which knows only passwords):
projectionist.dashboard.metadata_problems requires that to be off and this module registered.
"""

from __future__ import annotations

import asyncio
import binascii
import hashlib
import html
import re
import sqlite3
from datetime import UTC, datetime

from datasette import hookimpl
from datasette.utils.asgi import Response
from datasette_auth_passwords.utils import scope_has_valid_authorization

from .config import Config
from .dashboard import ADMIN_USER, DATABASE

SESSION_COOKIE = "pj_session"  # control/sessions.py sets it
_SESSION_ID = re.compile(r"[A-Za-z0-9_-]{43}")  # secrets.token_urlsafe(32)
_HOST = re.compile(r"[A-Za-z0-9.-]{1,253}|\[[0-9A-Fa-f:.]{2,45}\]")
ACTOR = {"id": ADMIN_USER, "name": "Projectionist admin"}


def _cookie(scope, name: str) -> str | None:
    for key, value in scope.get("headers") or ():
        if key == b"cookie":
            for part in value.decode("latin-1").split(";"):
                k, _, v = part.strip().partition("=")
                if k == name:
                    return v
    return None


def session_user(db_path: str, session_id: str | None) -> tuple[str, bool] | None:
    """(username, is admin) of a live session, else None. Only the id's hash is stored."""
    if not session_id or not _SESSION_ID.fullmatch(session_id):
        return None
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=5)
    try:
        row = conn.execute(
            "SELECT u.username, u.is_admin FROM sessions s JOIN users u ON u.id = s.user_id WHERE s.id_hash = ? "
            "AND s.revoked_at IS NULL AND s.expires_at > ? AND u.disabled_at IS NULL",
            (hashlib.sha256(session_id.encode()).hexdigest(), datetime.now(UTC).isoformat())).fetchone()
    finally:
        conn.close()
    return (row[0], bool(row[1])) if row else None


def _db_path(datasette) -> str:
    return datasette.get_database(DATABASE).path


def _control_url(scope, control_port: int) -> str:
    """The control plane on the host name the browser used (its cookie is that host's)."""
    host = dict(scope.get("headers") or {}).get(b"host", b"").decode("latin-1")
    name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
    if not _HOST.fullmatch(name or ""):
        name = "127.0.0.1"
    return f"http://{name}:{control_port}/"


def _valid_password(scope, datasette) -> bool:
    try:
        return scope_has_valid_authorization(scope, datasette) is not None
    except (ValueError, binascii.Error, UnicodeDecodeError):  # not Basic's format: not valid
        return False


def _page(status: int, title: str, text: str, link: tuple[str, str] | None) -> Response:
    anchor = f'<p><a href="{html.escape(link[0])}">{html.escape(link[1])}</a></p>' if link else ""
    body = (f"<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            "<meta name=\"viewport\" content=\"width=device-width\"></head><body style=\"font-family:system-ui,"
            f"sans-serif;max-width:36rem;margin:4rem auto;padding:0 1rem\"><h1>{html.escape(title)}</h1>"
            f"<p>{html.escape(text)}</p>{anchor}</body></html>")
    return Response.html(body, status=status, headers={"Cache-Control": "no-store"})


def _wants_html(scope) -> bool:
    accept = dict(scope.get("headers") or {}).get(b"accept", b"").decode("latin-1")
    return "text/html" in accept


async def _refuse(scope, send, user: tuple[str, bool] | None, control_port: int) -> None:
    if user is not None:  # signed in, not an admin
        response = _page(403, "Admins only", f"You are signed in as {user[0]}, who is not an admin of this "
                         "Projectionist. An admin can make you one.", None)
    elif _wants_html(scope) and not dict(scope.get("headers") or {}).get(b"authorization"):
        response = _page(401, "Sign in to the dashboard", "The dashboard is for Projectionist's admins. Sign in "
                         "with Plex on the control plane, then come back to this page.",
                         (_control_url(scope, control_port), "Sign in with Plex"))
    else:
        response = Response.text("401 Authorization Required", status=401,
                                 headers={"www-authenticate": 'Basic realm="Datasette", charset="UTF-8"'})
    await response.asgi_send(send)


_ADMITTED = "projectionist.dashboard_session"  # scope key: the session's username, for actor_from_request


def gate(app, datasette, control_port: int):
    async def gated(scope, receive, send):
        if scope["type"] != "http":
            return await app(scope, receive, send)
        if dict(scope.get("headers") or {}).get(b"authorization"):
            if await asyncio.to_thread(_valid_password, scope, datasette):  # PBKDF2: off the loop
                return await app(scope, receive, send)
            return await _refuse(scope, send, None, control_port)
        user = await asyncio.to_thread(session_user, _db_path(datasette), _cookie(scope, SESSION_COOKIE))
        if user is not None and user[1]:
            return await app(dict(scope, **{_ADMITTED: user[0]}), receive, send)
        return await _refuse(scope, send, user, control_port)
    return gated


@hookimpl
def asgi_wrapper(datasette):
    control_port = Config.from_env().control_port
    return lambda app: gate(app, datasette, control_port)


@hookimpl
def actor_from_request(datasette, request):
    username = request.scope.get(_ADMITTED)  # the gate checked the session of this very request
    return dict(ACTOR, username=username) if username else None
