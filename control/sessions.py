"""Sessions of the control plane: random ids in an HttpOnly cookie, stored only as hashes.

A session expires `session_ttl` after its last use (sliding: using it renews it, at most once per
tenth of the TTL, so reads do not turn into a write each) and never later than `session_max_age`
after sign-in. Sessions live in SQLite and survive restarts. Each has a CSRF token, handed to the
page by `GET /api/auth/session` and required as `X-CSRF-Token` on every state-changing call.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from aiohttp import web

from projectionist.vault import Vault

from .keys import OPTIONS, VAULT
from .security import is_https

SESSION_COOKIE = "pj_session"
# Without PROJECTIONIST_ADMINS: the id of the first user, the admin until some user holds an admin
# grant (the first owner to sign in gets one, admission.py; an admin granting admin keeps theirs).
FALLBACK_ADMIN_SQL = ("(SELECT CASE WHEN EXISTS (SELECT 1 FROM users WHERE admin_granted) THEN NULL "
                      "ELSE min(id) END FROM users)")
CSRF_HEADER = "X-CSRF-Token"
_SESSION_ID_LENGTH = 43  # secrets.token_urlsafe(32)
_RENEWED = "control.renewed_session"  # request key: (session id, new expiry) for the response cookie


def now_utc() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="seconds")


def parse_iso(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


def token_hash(token: str) -> str:
    # Session ids and CSRF tokens are 256 random bits: a plain hash cannot be reversed by guessing.
    return hashlib.sha256(token.encode()).hexdigest()


def csrf_token_for(session_id: str) -> str:
    """Derived from the session id, so the page can ask for it again after a reload."""
    return hmac.new(session_id.encode(), b"projectionist-csrf", hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class Identity:
    """Who is calling: the session's user."""

    user_id: int
    username: str
    plex_account_id: str | None
    thumb: str | None
    is_admin: bool
    session_id: str
    created_at: datetime
    expires_at: datetime

    @property
    def session_hash(self) -> str:
        return token_hash(self.session_id)


# --- blocking store operations (run on the vault executor) ---------------------------------------

def create_session(vault: Vault, user_id: int, ttl: int, user_agent: str | None, ip: str | None) -> tuple[str, datetime]:
    session_id = secrets.token_urlsafe(32)
    now = now_utc()
    expires = now + timedelta(seconds=ttl)
    vault.conn.execute(
        "INSERT INTO sessions (id_hash, user_id, csrf_hash, created_at, expires_at, last_seen_at, user_agent, ip) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (token_hash(session_id), user_id, token_hash(csrf_token_for(session_id)), iso(now), iso(expires),
         iso(now), (user_agent or "")[:300] or None, ip),
    )
    return session_id, expires


def load_session(vault: Vault, session_id: str, admins: frozenset[str]) -> Identity | None:
    row = vault.conn.execute(
        "SELECT u.id, u.username, u.plex_account_id, u.thumb, s.created_at, s.expires_at, "
        f"{FALLBACK_ADMIN_SQL}, u.admin_granted FROM sessions s JOIN users u ON u.id = s.user_id "
        "WHERE s.id_hash = ? AND s.revoked_at IS NULL AND s.expires_at > ? AND u.disabled_at IS NULL",
        (token_hash(session_id), iso(now_utc())),
    ).fetchone()
    if row is None:
        return None
    user_id, username, account_id, thumb, created, expires, first_user, granted = row
    return Identity(user_id, username, account_id, thumb,
                    is_admin(admins, account_id, user_id, first_user, granted=bool(granted)),
                    session_id, parse_iso(created), parse_iso(expires))


def is_admin(admins: frozenset[str], plex_account_id: str | None, user_id: int, first_user_id: int | None,
             granted: bool = False) -> bool:
    """Configured Plex account ids are the admins; without any, the first user who signed in is.
    Either way, so is anyone an admin made admin (users.admin_granted)."""
    if granted:
        return True
    if admins:
        return plex_account_id is not None and plex_account_id in admins
    return user_id == first_user_id


def renew_session(vault: Vault, session_id: str, expires: datetime) -> None:
    now = iso(now_utc())
    id_hash = token_hash(session_id)
    vault.conn.execute("UPDATE sessions SET expires_at = ?, last_seen_at = ? WHERE id_hash = ? AND revoked_at IS NULL",
                       (iso(expires), now, id_hash))
    vault.conn.execute("UPDATE users SET last_seen_at = ? WHERE id = (SELECT user_id FROM sessions WHERE id_hash = ?)",
                       (now, id_hash))


def check_csrf(vault: Vault, session_id: str, presented: str) -> bool:
    row = vault.conn.execute("SELECT csrf_hash FROM sessions WHERE id_hash = ?", (token_hash(session_id),)).fetchone()
    return bool(row and row[0]) and hmac.compare_digest(row[0], token_hash(presented))


def revoke_session(vault: Vault, session_id: str) -> int:
    return vault.conn.execute("UPDATE sessions SET revoked_at = ? WHERE id_hash = ? AND revoked_at IS NULL",
                              (iso(now_utc()), token_hash(session_id))).rowcount


def revoke_user_sessions(vault: Vault, user_id: int) -> int:
    return vault.conn.execute("UPDATE sessions SET revoked_at = ? WHERE user_id = ? AND revoked_at IS NULL",
                              (iso(now_utc()), user_id)).rowcount


def purge_expired(vault: Vault, keep_days: int = 30) -> int:
    """Expired and revoked sessions are kept a while (for the record), then deleted."""
    cutoff = iso(now_utc() - timedelta(days=keep_days))
    return vault.conn.execute("DELETE FROM sessions WHERE expires_at < ? OR revoked_at < ?", (cutoff, cutoff)).rowcount


# --- in a request -------------------------------------------------------------------------------

def _plausible_session_id(value: str | None) -> bool:
    return bool(value) and len(value) == _SESSION_ID_LENGTH and all(c.isalnum() or c in "-_" for c in value)


async def authenticate(request: web.Request) -> Identity | None:
    """The caller's session, renewed if due; None without a valid one (forged, expired, revoked)."""
    session_id = request.cookies.get(SESSION_COOKIE)
    if not _plausible_session_id(session_id):
        return None
    options = request.app[OPTIONS]
    identity = await request.app[VAULT].run(load_session, session_id, options.admins)
    if identity is None:
        return None
    now = now_utc()
    renewed = min(now + timedelta(seconds=options.session_ttl),
                  identity.created_at + timedelta(seconds=options.session_max_age))
    if renewed - identity.expires_at > timedelta(seconds=options.session_ttl / 10):
        await request.app[VAULT].run(renew_session, session_id, renewed)
        identity = Identity(**{**identity.__dict__, "expires_at": renewed})
        request[_RENEWED] = (session_id, renewed)
    return identity


async def csrf_ok(request: web.Request, identity: Identity) -> bool:
    presented = request.headers.get(CSRF_HEADER, "")
    if not presented or len(presented) > 128:
        return False
    return await request.app[VAULT].run(check_csrf, identity.session_id, presented)


def set_session_cookie(request: web.Request, response: web.StreamResponse, session_id: str, expires: datetime) -> None:
    response.set_cookie(SESSION_COOKIE, session_id, max_age=max(0, int((expires - now_utc()).total_seconds())),
                        path="/", httponly=True, samesite="Lax", secure=is_https(request))


def clear_session_cookie(request: web.Request, response: web.StreamResponse) -> None:
    response.del_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="Lax", secure=is_https(request))


def apply_renewal(request: web.Request, response: web.StreamResponse) -> None:
    """A renewed session's cookie gets the new expiry too (unless the handler set cookies itself)."""
    renewed = request.get(_RENEWED)
    if renewed and SESSION_COOKIE not in response.cookies:
        set_session_cookie(request, response, *renewed)
