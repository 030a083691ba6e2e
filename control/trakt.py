"""Trakt for a signed-in user: the OAuth device flow, run server-side with authlib's OAuth 2 client.

The real tokens are kept encrypted as the user's credential "trakt" (with their expiry); the user
and their player get surrogates (vault kinds `trakt_access` / `trakt_refresh`, the ones the proxy
swaps on api.trakt.tv). Tokens are refreshed before they expire, by a periodic sweep and whenever
the status is read, and the user's live surrogates are re-pointed at the new tokens, so a player
keeps working with the surrogates it already holds.

Trakt's device endpoints are not RFC 8628: JSON bodies, and the outcome in the status code
(400 pending, 404 unknown code, 409 already used, 410 expired, 418 denied, 429 slow down). A client
auth method and a compliance hook adapt authlib to that.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx2
from aiohttp import web
from authlib.common.urls import url_decode
from authlib.integrations.base_client import OAuthError
from authlib.integrations.httpx_client import AsyncOAuth2Client

from projectionist.vault import Vault

from .errors import ApiError, upstream_failed
from .jobs import JobContext, job
from .keys import OPTIONS, UPSTREAMS, VAULT
from .models import TraktDevicePoll, TraktDeviceStarted, TraktDisconnected, TraktStatus, TraktTokens
from .openapi import USER, Api, Call
from .sessions import iso, now_utc, parse_iso, token_hash
from .vault_executor import transaction

log = logging.getLogger("control.trakt")

api = Api("trakt")
routes = api.routes

CREDENTIAL = "trakt"  # user_credentials.name: the real tokens and their expiry, as JSON
ACCESS_KIND = "trakt_access"  # vault kinds (proxy_addons/trakt_credentials.py)
REFRESH_KIND = "trakt_refresh"
DEVICE_KIND = "trakt_device"  # auth_flows.kind
SURROGATE_GRACE = timedelta(days=1)  # as the proxy: the surrogate outlives the real token a little
MAX_REFRESH_MARGIN = timedelta(days=7)
OOB_REDIRECT = "urn:ietf:wg:oauth:2.0:oob"
TIMEOUT = 10.0
_DEVICE_ERRORS = {400: "authorization_pending", 404: "invalid_grant", 409: "invalid_grant",
                  410: "expired_token", 418: "access_denied", 429: "slow_down"}
REFRESH_LOCKS = web.AppKey("trakt_refresh_locks", dict)  # user id -> asyncio.Lock: one refresh at a time


# --- authlib, adapted to Trakt --------------------------------------------------------------------

def encode_client_secret_json(auth, method: str, uri: str, headers, body):
    """Client credentials in a JSON body, which is what Trakt's OAuth endpoints read."""
    text = body.decode() if isinstance(body, bytes) else (body or "")
    fields = dict(url_decode(text)) if text else {}
    fields.update(client_id=auth.client_id, client_secret=auth.client_secret)
    body = json.dumps(fields).encode()
    headers["Content-Type"] = "application/json"
    headers["Content-Length"] = str(len(body))
    return uri, headers, body


def trakt_status_errors(response):
    """Trakt tells the device flow's outcome by status code alone: as OAuth error bodies."""
    if response.status_code in _DEVICE_ERRORS:
        try:
            body = response.json()
        except ValueError:
            body = None
        if not (isinstance(body, dict) and body.get("error")):
            return httpx2.Response(response.status_code, json={"error": _DEVICE_ERRORS[response.status_code]},
                                   request=response.request)
    return response


def oauth_client(request_or_app: web.Request | web.Application) -> AsyncOAuth2Client:
    app = request_or_app.app if isinstance(request_or_app, web.Request) else request_or_app
    server = app[OPTIONS].server
    if not (server.trakt_client_id and server.trakt_client_secret):
        raise ApiError(503, "trakt_not_configured",
                       "Trakt is not configured on this server (PROJECTIONIST_TRAKT_CLIENT_ID/SECRET)")
    client = AsyncOAuth2Client(
        server.trakt_client_id, server.trakt_client_secret, token_endpoint_auth_method="client_secret_json",
        revocation_endpoint_auth_method="client_secret_json", redirect_uri=OOB_REDIRECT, timeout=TIMEOUT,
        trust_env=False, headers={"trakt-api-version": "2", "trakt-api-key": server.trakt_client_id})
    client.register_client_auth_method(("client_secret_json", encode_client_secret_json))
    client.register_compliance_hook("access_token_response", trakt_status_errors)
    client.register_compliance_hook("refresh_token_response", trakt_status_errors)
    return client


def _trakt_url(app: web.Application, path: str) -> str:
    return app[UPSTREAMS].url("trakt", path)


# --- blocking store operations ------------------------------------------------------------------

def _link_from_token(token: dict[str, Any]) -> dict[str, Any]:
    access, refresh = token.get("access_token"), token.get("refresh_token")
    if not (isinstance(access, str) and access and isinstance(refresh, str) and refresh):
        raise ApiError(400, "invalid_trakt_tokens", "Trakt tokens need an access_token and a refresh_token")
    created = token.get("created_at")
    issued = (datetime.fromtimestamp(created, UTC) if isinstance(created, int | float) and not isinstance(created, bool)
              and 0 < created < 10**11 else now_utc())
    expires_in = token.get("expires_in")
    lifetime = int(expires_in) if isinstance(expires_in, int | float) and not isinstance(expires_in, bool) \
        and 0 < expires_in < 10**9 else 90 * 86400
    return {"access_token": access, "refresh_token": refresh, "issued_at": iso(issued),
            "expires_at": iso(issued + timedelta(seconds=lifetime)),
            "scope": token.get("scope") if isinstance(token.get("scope"), str) else None}


def load_link(vault: Vault, user_id: int) -> dict[str, Any] | None:
    stored = vault.user_credential(user_id, CREDENTIAL)
    return json.loads(stored) if stored else None


def _surrogates(vault: Vault, user_id: int, link: dict[str, Any]) -> TraktTokens:
    expires = parse_iso(link["expires_at"])
    access = vault.surrogate_for(ACCESS_KIND, link["access_token"], user_id, None, iso(expires + SURROGATE_GRACE))
    refresh = vault.surrogate_for(REFRESH_KIND, link["refresh_token"], user_id)
    return TraktTokens(access_token=access, refresh_token=refresh,
                       expires_in=max(0, int((expires - now_utc()).total_seconds())),
                       created_at=int(parse_iso(link["issued_at"]).timestamp()), scope=link.get("scope"))


def save_tokens(vault: Vault, user_id: int, token: dict[str, Any]) -> TraktTokens:
    """Keep new tokens (a device sign-in, an import) for the user; answer their surrogates."""
    link = _link_from_token(token)
    with transaction(vault.conn):
        vault.set_user_credential(user_id, CREDENTIAL, json.dumps(link))
        return _surrogates(vault, user_id, link)


def surrogates_for_link(vault: Vault, user_id: int) -> TraktTokens | None:
    link = load_link(vault, user_id)
    return _surrogates(vault, user_id, link) if link else None


def replace_tokens(vault: Vault, user_id: int, old: dict[str, Any], token: dict[str, Any]) -> TraktTokens:
    """After a refresh: the same surrogates now stand for the new tokens."""
    new = _link_from_token(token)
    with transaction(vault.conn):
        vault.set_user_credential(user_id, CREDENTIAL, json.dumps(new))
        vault.repoint(ACCESS_KIND, user_id, old["access_token"], new["access_token"],
                      iso(parse_iso(new["expires_at"]) + SURROGATE_GRACE))
        vault.repoint(REFRESH_KIND, user_id, old["refresh_token"], new["refresh_token"], None)
        return _surrogates(vault, user_id, new)


def newest_vaulted_tokens(vault: Vault, user_id: int) -> dict[str, Any] | None:
    """The user's newest live Trakt tokens in the vault: when their player refreshed through the
    proxy, these replaced the ones we kept (Trakt refresh tokens are single use)."""
    found: dict[str, Any] = {}
    for kind, field in ((ACCESS_KIND, "access_token"), (REFRESH_KIND, "refresh_token")):
        newest = vault.newest(kind, user_id)
        if newest is None:
            return None
        found[field], expires_at = newest
        if kind == ACCESS_KIND and expires_at:
            expires = parse_iso(expires_at) - SURROGATE_GRACE
            found["expires_in"] = max(1, int((expires - now_utc()).total_seconds()))
    return found


def forget_link(vault: Vault, user_id: int) -> dict[str, Any] | None:
    with transaction(vault.conn) as conn:
        link = load_link(vault, user_id)
        vault.delete_user_credential(user_id, CREDENTIAL)
        vault.revoke_user(user_id, (ACCESS_KIND, REFRESH_KIND))
        conn.execute("DELETE FROM auth_flows WHERE kind = ? AND user_id = ?", (DEVICE_KIND, user_id))
    return link


def linked_users(vault: Vault) -> list[int]:
    return [r[0] for r in vault.conn.execute("SELECT user_id FROM user_credentials WHERE name = ?", (CREDENTIAL,))]


def record_device_code(vault: Vault, user_id: int, device_code: str, expires_in: int) -> None:
    now = now_utc()
    with transaction(vault.conn) as conn:  # one device sign-in per user at a time
        conn.execute("DELETE FROM auth_flows WHERE kind = ? AND (user_id = ? OR expires_at < ?)",
                     (DEVICE_KIND, user_id, iso(now)))
        conn.execute("INSERT INTO auth_flows (kind, external_id, user_id, secret_enc, created_at, expires_at) "
                     "VALUES (?, ?, ?, ?, ?, ?)", (DEVICE_KIND, token_hash(device_code), user_id,
                                                   vault.box.encrypt(device_code), iso(now),
                                                   iso(now + timedelta(seconds=expires_in))))


def pending_device_code(vault: Vault, user_id: int) -> str | None:
    row = vault.conn.execute("SELECT secret_enc FROM auth_flows WHERE kind = ? AND user_id = ? AND completed_at IS NULL "
                             "AND expires_at > ? ORDER BY id DESC LIMIT 1", (DEVICE_KIND, user_id, iso(now_utc()))
                             ).fetchone()
    return vault.box.decrypt(row[0]) if row else None


def end_device_flow(vault: Vault, user_id: int) -> None:
    vault.conn.execute("DELETE FROM auth_flows WHERE kind = ? AND user_id = ?", (DEVICE_KIND, user_id))


# --- refreshing ---------------------------------------------------------------------------------

def refresh_due(link: dict[str, Any], now: datetime | None = None) -> bool:
    """Due once less than a quarter of the token's life (at most 7 days) is left."""
    now = now or now_utc()
    issued, expires = parse_iso(link["issued_at"]), parse_iso(link["expires_at"])
    margin = min(MAX_REFRESH_MARGIN, (expires - issued) / 4)
    return now >= expires - margin


async def _refresh_with(app: web.Application, refresh_token: str) -> dict[str, Any]:
    async with oauth_client(app) as client:
        return dict(await client.refresh_token(_trakt_url(app, "/oauth/token"), refresh_token=refresh_token))


async def refresh_link(app: web.Application, user_id: int, force: bool = False) -> bool:
    """Refresh the user's Trakt tokens if due (or forced). True when they were refreshed."""
    locks: dict[int, asyncio.Lock] = app[REFRESH_LOCKS]
    async with locks.setdefault(user_id, asyncio.Lock()):
        vault = app[VAULT]
        link = await vault.run(load_link, user_id)
        if link is None or not (force or refresh_due(link)):
            return False
        try:
            try:
                token = await _refresh_with(app, link["refresh_token"])
            except OAuthError as exc:
                if exc.error != "invalid_grant":
                    raise
                # Probably spent by the player through the proxy: continue from the tokens it got.
                newer = await vault.run(newest_vaulted_tokens, user_id)
                if not newer or newer["refresh_token"] == link["refresh_token"]:
                    raise
                link = {**link, **_link_from_token(newer)}
                token = await _refresh_with(app, link["refresh_token"])
        except OAuthError as exc:
            log.warning("trakt refresh refused", extra={"fields": {"user_id": user_id, "oauth_error": exc.error}})
            raise ApiError(409, "trakt_reauthorize", "Trakt refused to refresh the tokens; connect Trakt again") from None
        except httpx2.HTTPError as exc:
            log.warning("trakt refresh failed: %s", type(exc).__name__)
            raise upstream_failed("Trakt") from None
        await vault.run(replace_tokens, user_id, link, token)
        log.info("trakt tokens refreshed", extra={"fields": {"user_id": user_id}})
        return True



def _refresh_interval(app: web.Application) -> float:
    return app[OPTIONS].trakt_refresh_interval


@job("trakt-refresh", every=_refresh_interval, timeout=600, run_at_start=True,
     summary="Refresh every user's Trakt tokens that are due")
async def refresh_job(ctx: JobContext) -> int:
    return await sweep(ctx.app)


async def sweep(app: web.Application) -> int:
    refreshed = 0
    server = app[OPTIONS].server
    if not (server.trakt_client_id and server.trakt_client_secret):
        return 0
    for user_id in await app[VAULT].run(linked_users):
        try:
            refreshed += await refresh_link(app, user_id)
        except ApiError as exc:
            log.warning("trakt refresh for a user failed", extra={"fields": {"user_id": user_id, "error": exc.code}})
        except Exception:
            log.exception("trakt refresh sweep failed for a user")
    return refreshed


# --- routes -------------------------------------------------------------------------------------

@api.get("/api/trakt", summary="Trakt connection of the signed-in user", access=USER, response=TraktStatus,
         responses={409: "Trakt refused to refresh: connect again", 502: "Trakt did not answer",
                    503: "Trakt is not configured on this server"})
async def trakt_status(request: web.Request, call: Call) -> TraktStatus:
    """Whether Trakt is connected, until when, and the surrogate tokens for the player's
    `traktTokens`. Tokens that are due are refreshed first."""
    user_id = call.user.user_id
    vault = request.app[VAULT]
    link = await vault.run(load_link, user_id)
    if link is None:
        return TraktStatus(connected=False)
    if refresh_due(link):
        await refresh_link(request.app, user_id)
        link = await vault.run(load_link, user_id)
    tokens = await vault.run(surrogates_for_link, user_id)
    return TraktStatus(connected=True, expires_at=parse_iso(link["expires_at"]), tokens=tokens)


@api.post("/api/trakt/refresh", summary="Refresh the Trakt tokens now", access=USER, response=TraktStatus,
          responses={404: "Trakt is not connected", 409: "Trakt refused to refresh: connect again",
                     502: "Trakt did not answer", 503: "Trakt is not configured on this server"})
async def trakt_refresh(request: web.Request, call: Call) -> TraktStatus:
    user_id = call.user.user_id
    vault = request.app[VAULT]
    if await vault.run(load_link, user_id) is None:
        raise ApiError(404, "trakt_not_connected", "Trakt is not connected")
    await refresh_link(request.app, user_id, force=True)
    link = await vault.run(load_link, user_id)
    return TraktStatus(connected=True, expires_at=parse_iso(link["expires_at"]),
                       tokens=await vault.run(surrogates_for_link, user_id))


@api.post("/api/trakt/device", summary="Start connecting Trakt (device code)", access=USER,
          response=TraktDeviceStarted, responses={502: "Trakt did not answer",
                                                  503: "Trakt is not configured on this server"})
async def trakt_device_start(request: web.Request, call: Call) -> TraktDeviceStarted:
    """Show the user `user_code` and `verification_url`; then poll `POST /api/trakt/device/poll`
    every `interval` seconds."""
    app = request.app
    client_id = app[OPTIONS].server.trakt_client_id
    try:
        async with oauth_client(request) as client:
            response = await client.request("POST", _trakt_url(app, "/oauth/device/code"), withhold_token=True,
                                            json={"client_id": client_id})
        code = response.json() if response.status_code == 200 else None
    except (httpx2.HTTPError, ValueError) as exc:
        log.warning("trakt device code failed: %s", type(exc).__name__)
        raise upstream_failed("Trakt") from None
    if not isinstance(code, dict) or not code.get("device_code") or not code.get("user_code"):
        raise upstream_failed("Trakt")
    expires_in = int(code.get("expires_in") or 600)
    await app[VAULT].run(record_device_code, call.user.user_id, str(code["device_code"]), expires_in)
    return TraktDeviceStarted(user_code=str(code["user_code"]),
                              verification_url=str(code.get("verification_url") or "https://trakt.tv/activate"),
                              expires_in=expires_in, interval=int(code.get("interval") or 5))


@api.post("/api/trakt/device/poll", summary="Check whether the Trakt device code was approved", access=USER,
          response=TraktDevicePoll, responses={404: "No device sign-in is pending", 502: "Trakt did not answer",
                                               503: "Trakt is not configured on this server"})
async def trakt_device_poll(request: web.Request, call: Call) -> TraktDevicePoll:
    app = request.app
    user_id = call.user.user_id
    vault = app[VAULT]
    device_code = await vault.run(pending_device_code, user_id)
    if device_code is None:
        raise ApiError(404, "no_pending_trakt_sign_in", "start with POST /api/trakt/device")
    try:
        async with oauth_client(request) as client:
            token = dict(await client.fetch_token(_trakt_url(app, "/oauth/device/token"), grant_type="device_code",
                                                  code=device_code))
    except OAuthError as exc:
        outcome = {"authorization_pending": "pending", "slow_down": "slow_down", "access_denied": "denied"}.get(
            exc.error, "expired")
        if outcome in ("denied", "expired"):
            await vault.run(end_device_flow, user_id)
        return TraktDevicePoll(status=outcome)
    except httpx2.HTTPError as exc:
        log.warning("trakt device token failed: %s", type(exc).__name__)
        raise upstream_failed("Trakt") from None
    tokens = await vault.run(save_tokens, user_id, token)
    await vault.run(end_device_flow, user_id)
    log.info("trakt connected", extra={"fields": {"user_id": user_id}})
    return TraktDevicePoll(status="connected", tokens=tokens)


@api.delete("/api/trakt", summary="Disconnect Trakt", access=USER, response=TraktDisconnected)
async def trakt_disconnect(request: web.Request, call: Call) -> TraktDisconnected:
    """Forgets the tokens, revokes their surrogates, and asks Trakt to revoke the token (best effort)."""
    link = await request.app[VAULT].run(forget_link, call.user.user_id)
    if link is not None:
        try:
            async with oauth_client(request) as client:
                await client.revoke_token(_trakt_url(request.app, "/oauth/revoke"), token=link["access_token"])
        except (ApiError, httpx2.HTTPError, OAuthError) as exc:
            log.warning("trakt revoke failed: %s", type(exc).__name__)
    return TraktDisconnected()
