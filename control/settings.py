"""Per-user settings: preferences, Plex servers, watchlist provider and sync, a custom TMDB key, and the
import of a player's `localStorage` (the migration path for players that held every secret).

A custom TMDB key is checked against TMDB (`/3/configuration`) before it is stored, encrypted, as
the user's credential "tmdb"; from then on the proxy uses it for every TMDB call that carries one
of the user's surrogates as its bearer. `Settings.tmdb.bearer` is such a surrogate (kind "tmdb",
one per user): the value to put in the player's TMDB field.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any

import aiohttp
from aiohttp import web

from projectionist.redact import RedactSecrets
from projectionist.vault import Vault, is_surrogate

from . import trakt
from .errors import ApiError, upstream_failed
from .keys import HTTP, UPSTREAMS, VAULT
from .models import (
    MAX_PREFERENCES_BYTES,
    ErrorField,
    LocalStorageSettings,
    PlexServer,
    Settings,
    SettingsUpdate,
    TmdbKeyUpdate,
    TmdbStatus,
)
from .openapi import USER, Api, Call
from .sessions import iso, now_utc, parse_iso
from .vault_executor import transaction

log = logging.getLogger("control.settings")

api = Api("settings")
routes = api.routes

TMDB_CREDENTIAL = "tmdb"  # user_credentials.name the proxy reads (proxy_addons/tmdb_key.py)
TMDB_KIND = "tmdb"  # vault kind of the per-user TMDB bearer surrogate
PLEX_KIND = "plex"
# What the per-user TMDB surrogate "stands for": nothing secret, it only names the user to the proxy.
TMDB_IDENTITY = "projectionist:tmdb-identity"
_V3_KEY = re.compile(r"^[0-9a-f]{32}$")
TMDB_TIMEOUT = aiohttp.ClientTimeout(total=10)
# localStorage fields that carry secrets or servers, handled one by one; the rest are preferences.
_SECRET_FIELDS = {"plexToken", "plexAccountToken", "tmdbBearer", "traktTokens", "plexServer", "plexServers"}
_PLEX_TOKEN_FIELDS = ("accessToken", "authToken", "token")


# --- blocking store operations ------------------------------------------------------------------

def tmdb_bearer(vault: Vault, user_id: int) -> str:
    return vault.surrogate_for(TMDB_KIND, TMDB_IDENTITY, user_id)


def read_settings(vault: Vault, user_id: int) -> Settings:
    row = vault.conn.execute("SELECT preferences, plex_servers, watchlist_provider, watchlist_sync, updated_at "
                             "FROM user_settings WHERE user_id = ?", (user_id,)).fetchone()
    preferences, servers, provider, sync, updated = row if row else ("{}", "[]", None, "off", None)
    tmdb = vault.conn.execute("SELECT updated_at FROM user_credentials WHERE user_id = ? AND name = ?",
                              (user_id, TMDB_CREDENTIAL)).fetchone()
    trakt_linked = vault.conn.execute("SELECT 1 FROM user_credentials WHERE user_id = ? AND name = ?",
                                      (user_id, trakt.CREDENTIAL)).fetchone()
    return Settings(
        preferences=json.loads(preferences or "{}"),
        plex_servers=[PlexServer.model_validate(s) for s in json.loads(servers or "[]")],
        watchlist_provider=provider,
        watchlist_sync=sync or "off",
        tmdb=TmdbStatus(custom_key=tmdb is not None, updated_at=parse_iso(tmdb[0]) if tmdb else None,
                        bearer=tmdb_bearer(vault, user_id)),
        trakt_connected=trakt_linked is not None,
        updated_at=parse_iso(updated),
        sign_in_again=sign_in_again(vault, user_id),
    )


# Vault kinds the token-health job checks (control/token_health.py), as the user knows them.
SIGN_IN_AGAIN = {PLEX_KIND: "Plex", trakt.ACCESS_KIND: "Trakt"}


def sign_in_again(vault: Vault, user_id: int) -> list[str]:
    """The services this user must sign in to again: their stored token was found revoked."""
    return [SIGN_IN_AGAIN[kind] for kind in vault.needs_sign_in(user_id, SIGN_IN_AGAIN)]


def write_settings(vault: Vault, user_id: int, update: SettingsUpdate) -> Settings:
    with transaction(vault.conn) as conn:
        conn.execute("INSERT OR IGNORE INTO user_settings (user_id, updated_at) VALUES (?, ?)", (user_id, iso(now_utc())))
        changes: dict[str, Any] = {"updated_at": iso(now_utc())}
        if update.preferences is not None:
            changes["preferences"] = json.dumps(update.preferences)
        if update.plex_servers is not None:
            changes["plex_servers"] = json.dumps([s.model_dump(mode="json") for s in update.plex_servers])
        if "watchlist_provider" in update.model_fields_set:
            changes["watchlist_provider"] = update.watchlist_provider
        if update.watchlist_sync is not None:
            changes["watchlist_sync"] = update.watchlist_sync
        assignments = ", ".join(f"{column} = ?" for column in changes)  # column names are ours, not the client's
        conn.execute(f"UPDATE user_settings SET {assignments} WHERE user_id = ?", (*changes.values(), user_id))
    return read_settings(vault, user_id)


def store_tmdb_key(vault: Vault, user_id: int, key: str) -> Settings:
    vault.set_user_credential(user_id, TMDB_CREDENTIAL, key)
    return read_settings(vault, user_id)


def delete_tmdb_key(vault: Vault, user_id: int) -> Settings:
    vault.delete_user_credential(user_id, TMDB_CREDENTIAL)
    return read_settings(vault, user_id)


def import_settings(vault: Vault, user_id: int, data: dict[str, Any], tmdb_key_valid: bool) -> dict[str, Any]:
    """Vault every secret of a player's settings; answer them with surrogates in place."""
    out = dict(data)
    with transaction(vault.conn) as conn:
        server_id = _server_id(data.get("plexServer"))
        if _real(data.get("plexAccountToken")):
            out["plexAccountToken"] = vault.surrogate_for(PLEX_KIND, data["plexAccountToken"], user_id)
        if _real(data.get("plexToken")):
            out["plexToken"] = vault.surrogate_for(PLEX_KIND, data["plexToken"], user_id, server_id)
        for field in ("plexServer", "plexServers"):
            if data.get(field) is not None:
                out[field] = _vault_plex_tokens(vault, user_id, data[field], None)
        bearer = data.get("tmdbBearer")
        if isinstance(bearer, str) and bearer:
            if is_surrogate(bearer):
                entry = vault.resolve(bearer)
                out["tmdbBearer"] = bearer if entry and entry.user_id == user_id else tmdb_bearer(vault, user_id)
            else:
                if tmdb_key_valid:
                    vault.set_user_credential(user_id, TMDB_CREDENTIAL, bearer)
                out["tmdbBearer"] = tmdb_bearer(vault, user_id)
        tokens = data.get("traktTokens")
        if isinstance(tokens, dict) and _real(tokens.get("access_token")) and _real(tokens.get("refresh_token")):
            surrogates = trakt.save_tokens(vault, user_id, tokens)
            out["traktTokens"] = {**tokens, "access_token": surrogates.access_token,
                                  "refresh_token": surrogates.refresh_token}
        _store_imported_preferences(conn, user_id, data)
    return out


def _real(value: Any) -> bool:
    return isinstance(value, str) and bool(value) and not is_surrogate(value)


def _server_id(server: Any) -> str | None:
    return server.get("clientIdentifier") if isinstance(server, dict) and isinstance(
        server.get("clientIdentifier"), str) else None


def _vault_plex_tokens(vault: Vault, user_id: int, value: Any, server_id: str | None) -> Any:
    """plex.tv resources as the player keeps them: every accessToken becomes a surrogate."""
    if isinstance(value, list):
        return [_vault_plex_tokens(vault, user_id, v, server_id) for v in value]
    if not isinstance(value, dict):
        return value
    server_id = _server_id(value) or server_id
    out = {}
    for key, item in value.items():
        if key in _PLEX_TOKEN_FIELDS and _real(item):
            out[key] = vault.surrogate_for(PLEX_KIND, item, user_id, server_id)
        else:
            out[key] = _vault_plex_tokens(vault, user_id, item, server_id)
    return out


def _store_imported_preferences(conn, user_id: int, data: dict[str, Any]) -> None:
    preferences = {k: v for k, v in data.items() if k not in _SECRET_FIELDS and not _looks_secret(k, v)}
    servers = [s for s in (_plex_server(x, data.get("plexBaseUrl")) for x in
                           (data.get("plexServers") or ([data["plexServer"]] if data.get("plexServer") else [])))
               if s is not None]
    row = conn.execute("SELECT preferences FROM user_settings WHERE user_id = ?", (user_id,)).fetchone()
    merged = {**json.loads(row[0] if row else "{}"), **preferences}
    if len(json.dumps(merged)) > MAX_PREFERENCES_BYTES:
        raise ApiError(400, "preferences_too_large", f"preferences are limited to {MAX_PREFERENCES_BYTES} bytes")
    now = iso(now_utc())
    conn.execute("INSERT OR IGNORE INTO user_settings (user_id, updated_at) VALUES (?, ?)", (user_id, now))
    conn.execute("UPDATE user_settings SET preferences = ?, updated_at = ? WHERE user_id = ?",
                 (json.dumps(merged), now, user_id))
    if servers:
        conn.execute("UPDATE user_settings SET plex_servers = ? WHERE user_id = ?",
                     (json.dumps([s.model_dump(mode="json") for s in servers]), user_id))


def _looks_secret(key: str, value: Any) -> bool:
    text = json.dumps({key: value})
    return RedactSecrets.redact(text) != text


def _plex_server(resource: Any, base_url: Any) -> PlexServer | None:
    if not isinstance(resource, dict):
        return None
    uris = [c.get("uri") for c in resource.get("connections") or [] if isinstance(c, dict)]
    uri = next((u for u in uris if isinstance(u, str)), None) or base_url
    try:
        return PlexServer(name=str(resource.get("name") or "Plex Media Server")[:200],
                          client_identifier=_server_id(resource), uri=uri,
                          owned=resource.get("owned") if isinstance(resource.get("owned"), bool) else None)
    except ValueError:  # not a server we can describe (no usable URL): its tokens were still vaulted
        return None


# --- TMDB ---------------------------------------------------------------------------------------

async def tmdb_key_is_valid(request: web.Request, key: str) -> bool:
    """Ask TMDB: 200 valid, 401 invalid; anything else means TMDB could not tell us now."""
    url = request.app[UPSTREAMS].url("tmdb", "/3/configuration")
    if _V3_KEY.match(key):
        params, headers = {"api_key": key}, {"Accept": "application/json"}
    else:  # a v4 read access token
        params, headers = {}, {"Accept": "application/json", "Authorization": f"Bearer {key}"}
    try:
        async with request.app[HTTP].get(url, params=params, headers=headers, timeout=TMDB_TIMEOUT,
                                          allow_redirects=False) as response:
            await response.read()
            status = response.status
    except (aiohttp.ClientError, TimeoutError) as exc:
        log.warning("TMDB key check failed: %s", type(exc).__name__)
        raise upstream_failed("TMDB") from None
    if status == 200:
        return True
    if status in (401, 403):
        return False
    raise upstream_failed("TMDB")


# --- routes -------------------------------------------------------------------------------------

@api.get("/api/settings", summary="The signed-in user's settings", access=USER, response=Settings)
async def get_settings(request: web.Request, call: Call) -> Settings:
    return await request.app[VAULT].run(read_settings, call.user.user_id)


@api.put("/api/settings", summary="Change settings (fields left out keep their value)", access=USER,
         body=SettingsUpdate, response=Settings)
async def put_settings(request: web.Request, call: Call) -> Settings:
    return await request.app[VAULT].run(write_settings, call.user.user_id, call.body)


@api.put("/api/settings/tmdb-key", summary="Use your own TMDB key", access=USER, body=TmdbKeyUpdate,
         response=Settings, responses={400: "Invalid request, or TMDB rejected the key (it was not stored)",
                                       502: "TMDB could not check the key now (it was not stored)"})
async def put_tmdb_key(request: web.Request, call: Call) -> Settings:
    """The key is checked with TMDB first and stored encrypted only if TMDB accepts it. The proxy
    uses it for TMDB calls whose bearer is one of your surrogates (`tmdb.bearer`)."""
    key = call.body.key
    if not await tmdb_key_is_valid(request, key):
        raise ApiError(400, "invalid_tmdb_key", "TMDB rejected this key; it was not stored",
                       [ErrorField(field="key", location="body", message="TMDB says the key is invalid")])
    log.info("custom TMDB key stored", extra={"fields": {"user_id": call.user.user_id}})
    return await request.app[VAULT].run(store_tmdb_key, call.user.user_id, key)


@api.delete("/api/settings/tmdb-key", summary="Go back to the server's TMDB key", access=USER, response=Settings)
async def delete_tmdb_key_route(request: web.Request, call: Call) -> Settings:
    return await request.app[VAULT].run(delete_tmdb_key, call.user.user_id)


@api.post("/api/import/local-storage", summary="Import a player's localStorage settings", access=USER,
          body=LocalStorageSettings, response=LocalStorageSettings,
          responses={502: "TMDB could not check the imported key now"})
async def import_local_storage(request: web.Request, call: Call) -> web.Response:
    """Send the player's `localStorage["app.settings.v1"]` object. Every secret in it is vaulted
    for you (Plex tokens, the TMDB key as your custom key if TMDB accepts it, Trakt tokens), the
    rest is kept as preferences, and the same object comes back with surrogates in place of the
    secrets: write it back to the player's localStorage."""
    data = call.body.model_dump(mode="json", exclude_unset=True)
    bearer = data.get("tmdbBearer")
    valid = bool(isinstance(bearer, str) and bearer and not is_surrogate(bearer)
                 and re.fullmatch(r"[A-Za-z0-9._-]{16,1024}", bearer) and await tmdb_key_is_valid(request, bearer))
    out = await request.app[VAULT].run(import_settings, call.user.user_id, data, valid)
    log.info("localStorage imported", extra={"fields": {"user_id": call.user.user_id, "custom_tmdb_key": valid}})
    return web.json_response(out)
