"""Sign-in with Plex (PIN flow, run server-side), sessions, sign-out.

1. `POST /api/auth/plex` creates a PIN at plex.tv under the server's stable client identifier and
   answers the app.plex.tv URL to send the browser to, whose `forwardUrl` is
   `GET /api/auth/plex/{pin}` here. The PIN is bound to the browser that asked for it by a random
   nonce in an HttpOnly cookie (only its hash is stored): knowing a PIN id is not enough to
   finish someone else's sign-in.
2. `GET /api/auth/plex/{pin}` (the browser coming back, or the page polling) asks plex.tv whether
   the PIN was approved; if so it fetches the account, creates or updates the user, vaults the
   account token (so the proxy knows it as this user's), and starts a session.

The user is the same `users` row the proxy attributes traffic to: both key it on the Plex account id.
"""

from __future__ import annotations

import hmac
import logging
import secrets
import sqlite3
import uuid
from datetime import timedelta
from typing import Any
from urllib.parse import urlencode

import aiohttp
from aiohttp import web

from projectionist.vault import Vault, upsert_plex_user

from .admission import NotAdmitted, admit, refusal_page
from .errors import ApiError, upstream_failed
from .keys import HTTP, OPTIONS, PLEX_CLIENT_ID, UPSTREAMS, VAULT
from .models import (
    LogoutResponse,
    PinPath,
    PlexLoginStarted,
    PlexLoginStatus,
    SessionInfo,
    SessionResponse,
    UserInfo,
    ValidateResponse,
)
from .openapi import PUBLIC, USER, Api, Call
from .security import browser_origin, client_ip, is_https
from .sessions import (
    FALLBACK_ADMIN_SQL,
    Identity,
    clear_session_cookie,
    create_session,
    csrf_token_for,
    is_admin,
    iso,
    now_utc,
    revoke_session,
    revoke_user_sessions,
    set_session_cookie,
    token_hash,
)
from .upstreams import PLEX_APP_AUTH, PRODUCT, plex_headers
from .vault_executor import transaction

log = logging.getLogger("control.auth")

api = Api("auth")
routes = api.routes

LOGIN_COOKIE = "pj_login"
LOGIN_COOKIE_PATH = "/api/auth/plex"
PIN_KIND = "plex_pin"
PLEX_TOKEN_KIND = "plex"  # vault kind of Plex tokens (proxy_addons/plex_tokens.py)
DEFAULT_PIN_LIFETIME = 1800
UPSTREAM_TIMEOUT = aiohttp.ClientTimeout(total=10)


# --- blocking store operations ------------------------------------------------------------------

def plex_client_identifier(vault: Vault) -> str:
    """Created once and kept: plex.tv lists every client identifier as a device of the account."""
    vault.conn.execute("INSERT OR IGNORE INTO control_state (name, value) VALUES ('plex_client_identifier', ?)",
                       (f"projectionist-{uuid.uuid4()}",))
    return vault.conn.execute("SELECT value FROM control_state WHERE name = 'plex_client_identifier'").fetchone()[0]


def record_pin(vault: Vault, pin_id: int, code: str, nonce: str, lifetime: int) -> None:
    now = now_utc()
    with transaction(vault.conn) as conn:
        conn.execute("DELETE FROM auth_flows WHERE expires_at < ?", (iso(now - timedelta(days=1)),))
        conn.execute(
            "INSERT OR REPLACE INTO auth_flows (kind, external_id, binding_hash, secret_enc, created_at, expires_at) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (PIN_KIND, str(pin_id), token_hash(nonce), vault.box.encrypt(code), iso(now),
             iso(now + timedelta(seconds=lifetime))),
        )


def pending_pin_code(vault: Vault, pin_id: str, nonce: str | None) -> str | None:
    """The PIN's code when it is pending, unexpired and was started by this browser."""
    row = vault.conn.execute(
        "SELECT binding_hash, secret_enc FROM auth_flows WHERE kind = ? AND external_id = ? "
        "AND completed_at IS NULL AND expires_at > ?", (PIN_KIND, pin_id, iso(now_utc()))).fetchone()
    if row is None or not nonce or not hmac.compare_digest(row[0] or "", token_hash(nonce)):
        return None
    return vault.box.decrypt(row[1])


def forget_pin(vault: Vault, pin_id: str) -> None:
    vault.conn.execute("DELETE FROM auth_flows WHERE kind = ? AND external_id = ?", (PIN_KIND, pin_id))


def complete_sign_in(vault: Vault, pin_id: str, account: dict[str, Any], account_token: str, ttl: int,
                     user_agent: str | None, ip: str | None, admins: frozenset[str],
                     owner: bool = False) -> tuple[str, Any, UserInfo]:
    with transaction(vault.conn) as conn:
        claimed = conn.execute("UPDATE auth_flows SET completed_at = ? WHERE kind = ? AND external_id = ? "
                               "AND completed_at IS NULL", (iso(now_utc()), PIN_KIND, pin_id)).rowcount
        if claimed != 1:  # two requests raced to finish the same sign-in: one session only
            raise ApiError(409, "login_already_completed", "this sign-in was already completed")
        username = str(account.get("username") or account.get("title") or account["id"])
        user_id = upsert_plex_user(conn, str(account["id"]), username, account.get("email"), account.get("thumb"))
        vault.surrogate_for(PLEX_TOKEN_KIND, account_token, user_id)
        _sync_admin_flags(conn, admins)
        session_id, expires = create_session(vault, user_id, ttl, user_agent, ip)
        if owner and not admins and not conn.execute("SELECT 1 FROM users WHERE admin_granted").fetchone():
            # The first owner to sign in is the admin, even if a user the server is shared with came first.
            conn.execute("UPDATE users SET admin_granted = 1 WHERE id = ?", (user_id,))
            _sync_admin_flags(conn, admins)
        first = conn.execute(f"SELECT {FALLBACK_ADMIN_SQL}").fetchone()[0]
        granted = conn.execute("SELECT admin_granted FROM users WHERE id = ?", (user_id,)).fetchone()[0]
    user = UserInfo(id=user_id, username=username, thumb=account.get("thumb"), plex_account_id=str(account["id"]),
                    is_admin=is_admin(admins, str(account["id"]), user_id, first, granted=bool(granted)))
    return session_id, expires, user


def _sync_admin_flags(conn: sqlite3.Connection, admins: frozenset[str]) -> None:
    """users.is_admin mirrors the rule (shown by the dashboard's user directory)."""
    if admins:
        marks = ", ".join("?" for _ in admins)
        conn.execute(f"UPDATE users SET is_admin = (admin_granted OR plex_account_id IN ({marks}))", tuple(admins))
    else:
        conn.execute(f"UPDATE users SET is_admin = (admin_granted OR id IS {FALLBACK_ADMIN_SQL})")


def sign_out(vault: Vault, identity: Identity, everywhere: bool) -> tuple[int, int]:
    with transaction(vault.conn):
        sessions = (revoke_user_sessions(vault, identity.user_id) if everywhere
                    else revoke_session(vault, identity.session_id))
        # The proxy checks the vault on every request: the user's surrogates stop working now.
        surrogates = vault.revoke_user(identity.user_id)
    return sessions, surrogates


# --- plex.tv ------------------------------------------------------------------------------------

def _plex_headers(request: web.Request, token: str | None = None) -> dict[str, str]:
    return plex_headers(request.app[PLEX_CLIENT_ID], token)


async def _plextv(request: web.Request, method: str, path: str, token: str | None = None,
                  params: dict[str, str] | None = None) -> tuple[int, Any]:
    url = request.app[UPSTREAMS].url("plextv", path)
    try:
        async with request.app[HTTP].request(method, url, headers=_plex_headers(request, token), params=params,
                                             timeout=UPSTREAM_TIMEOUT, allow_redirects=False) as response:
            body = await response.json(content_type=None) if response.status < 500 else None
            return response.status, body
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        log.warning("plex.tv %s %s failed: %s", method, path, type(exc).__name__)
        raise upstream_failed("plex.tv") from None


# --- routes -------------------------------------------------------------------------------------

def _user_info(identity: Identity) -> UserInfo:
    return UserInfo(id=identity.user_id, username=identity.username, thumb=identity.thumb,
                    plex_account_id=identity.plex_account_id, is_admin=identity.is_admin)


@api.post("/api/auth/plex", summary="Start signing in with Plex", access=PUBLIC, response=PlexLoginStarted,
          responses={502: "plex.tv did not answer"})
async def start_plex_login(request: web.Request, call: Call) -> web.StreamResponse:
    """Creates a PIN at plex.tv and answers the app.plex.tv URL to send the browser to. After the
    user approves, app.plex.tv sends the browser back to `GET /api/auth/plex/{pin}`."""
    status, pin = await _plextv(request, "POST", "/api/v2/pins", params={"strong": "true"})
    if status not in (200, 201) or not isinstance(pin, dict) or not pin.get("id") or not pin.get("code"):
        raise upstream_failed("plex.tv")
    lifetime = int(pin.get("expiresIn") or DEFAULT_PIN_LIFETIME)
    nonce = secrets.token_urlsafe(32)
    await request.app[VAULT].run(record_pin, int(pin["id"]), str(pin["code"]), nonce, lifetime)
    forward = f"{browser_origin(request)}/api/auth/plex/{int(pin['id'])}"
    auth_url = PLEX_APP_AUTH + urlencode({
        "clientID": request.app[PLEX_CLIENT_ID], "code": pin["code"], "forwardUrl": forward,
        "context[device][product]": PRODUCT,
    })
    body = PlexLoginStarted(pin_id=int(pin["id"]), auth_url=auth_url, expires_at=now_utc() + timedelta(seconds=lifetime))
    response = web.json_response(body.model_dump(mode="json"))
    response.set_cookie(LOGIN_COOKIE, nonce, max_age=lifetime, path=LOGIN_COOKIE_PATH, httponly=True,
                        samesite="Lax", secure=is_https(request))
    return response


def _wants_html(request: web.Request) -> bool:
    accept = request.headers.get("Accept", "")
    return "text/html" in accept and "application/json" not in accept


def _to_page(query: str) -> web.Response:
    return web.Response(status=303, headers={"Location": f"/?{query}"})


@api.get("/api/auth/plex/{pin}", summary="Finish signing in with Plex", access=PUBLIC, path_params=PinPath,
         response=PlexLoginStatus, html=True,
         responses={403: "This Plex account has no access to the served Plex server (or was disabled here)",
                    404: "No sign-in with this PIN was started by this browser", 410: "The PIN expired at plex.tv",
                    409: "Already completed", 502: "plex.tv did not answer"})
async def complete_plex_login(request: web.Request, call: Call) -> web.StreamResponse:
    """Where app.plex.tv sends the browser back (then it is redirected to the settings page), and
    what the page polls. Answers `pending` until the PIN is approved, then starts the session."""
    pin_id = call.path.pin
    html = _wants_html(request)
    vault = request.app[VAULT]
    code = await vault.run(pending_pin_code, pin_id, request.cookies.get(LOGIN_COOKIE))
    if code is None:
        if html:
            return _to_page("login=failed")
        raise ApiError(404, "login_not_found", "no sign-in with this PIN is pending for this browser")
    status, pin = await _plextv(request, "GET", f"/api/v2/pins/{pin_id}", params={"code": code})
    if status == 404:
        await vault.run(forget_pin, pin_id)
        if html:
            return _to_page("login=expired")
        raise ApiError(410, "login_expired", "the PIN expired; start again")
    if status != 200 or not isinstance(pin, dict):
        raise upstream_failed("plex.tv")
    account_token = pin.get("authToken")
    if not account_token:
        return _to_page(f"login=pending&pin={pin_id}") if html else PlexLoginStatus(status="pending")
    status, account = await _plextv(request, "GET", "/api/v2/user", token=account_token)
    if status != 200 or not isinstance(account, dict) or not account.get("id"):
        raise upstream_failed("plex.tv")
    # Admission: only the served servers' owner and the users they are shared with (admission.py).
    status, resources = await _plextv(request, "GET", "/api/v2/resources", token=account_token,
                                      params={"includeHttps": "1", "includeRelay": "1"})
    if status != 200:
        raise upstream_failed("plex.tv")
    try:
        admission = await admit(request, account, resources)
    except NotAdmitted as refused:
        await vault.run(forget_pin, pin_id)
        if html:
            response = refusal_page(refused.message)
            response.del_cookie(LOGIN_COOKIE, path=LOGIN_COOKIE_PATH)
            return response
        raise
    options = request.app[OPTIONS]
    session_id, expires, user = await vault.run(
        complete_sign_in, pin_id, account, str(account_token), options.session_ttl,
        request.headers.get("User-Agent"), client_ip(request), options.admins, admission.role == "owner")
    log.info("signed in", extra={"fields": {"user_id": user.id, "role": admission.role}})
    if html:
        response: web.Response = _to_page("login=ok")
    else:
        response = web.json_response(PlexLoginStatus(status="complete", user=user).model_dump(mode="json"))
    set_session_cookie(request, response, session_id, expires)
    response.del_cookie(LOGIN_COOKIE, path=LOGIN_COOKIE_PATH)
    return response


@api.get("/api/auth/session", summary="The current session", access=USER, response=SessionResponse)
async def get_session(request: web.Request, call: Call) -> SessionResponse:
    """Who is signed in, until when, and the CSRF token for state-changing calls."""
    me = call.user
    return SessionResponse(user=_user_info(me), session=SessionInfo(created_at=me.created_at, expires_at=me.expires_at),
                           csrf_token=csrf_token_for(me.session_id))


@api.get("/api/auth/validate", summary="Check a session (for a reverse proxy's forward auth)", access=USER,
         response=ValidateResponse)
async def validate_session(request: web.Request, call: Call) -> web.Response:
    """200 with the user in `X-Projectionist-User-Id` / `X-Projectionist-User` headers, or 401."""
    me = call.user
    body = ValidateResponse(user_id=me.user_id, username=me.username, is_admin=me.is_admin)
    return web.json_response(body.model_dump(mode="json"), headers={
        "X-Projectionist-User-Id": str(me.user_id),
        "X-Projectionist-User": me.username.encode("ascii", "replace").decode(),
        "X-Projectionist-Admin": "1" if me.is_admin else "0"})


async def _sign_out(request: web.Request, identity: Identity, everywhere: bool) -> web.Response:
    sessions, surrogates = await request.app[VAULT].run(sign_out, identity, everywhere)
    log.info("signed out", extra={"fields": {"user_id": identity.user_id, "everywhere": everywhere,
                                             "surrogates_revoked": surrogates}})
    response = web.json_response(LogoutResponse(sessions_revoked=sessions, surrogates_revoked=surrogates)
                                 .model_dump(mode="json"))
    clear_session_cookie(request, response)
    return response


@api.post("/api/auth/logout", summary="Sign out", access=USER, response=LogoutResponse)
async def logout(request: web.Request, call: Call) -> web.Response:
    """Ends this session and revokes every proxy surrogate of the user: players holding them get
    401 until they sign in again."""
    return await _sign_out(request, call.user, everywhere=False)


@api.post("/api/auth/logout-everywhere", summary="Sign out on every device", access=USER, response=LogoutResponse)
async def logout_everywhere(request: web.Request, call: Call) -> web.Response:
    """Ends every session of the user and revokes every proxy surrogate of theirs."""
    return await _sign_out(request, call.user, everywhere=True)
