"""Request and response models of the control plane's JSON API.

The same classes validate requests (a 400 names the field) and generate `/api/openapi.json`.
Request models forbid unknown fields, so a typo is an error instead of a silently ignored setting.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, JsonValue, field_validator

from projectionist.redact import RedactSecrets


class Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Response(BaseModel):
    pass


# --- errors -------------------------------------------------------------------------------------

class ErrorField(Response):
    field: str = Field(description="Dotted path of the offending field, e.g. `plex_servers.0.uri`.")
    location: Literal["body", "query", "path", "header", "cookie"]
    message: str


class ErrorResponse(Response):
    error: str = Field(description="Machine-readable code, e.g. `validation_error`, `unauthenticated`.")
    message: str
    fields: list[ErrorField] = Field(default_factory=list)


# --- identity -----------------------------------------------------------------------------------

class UserInfo(Response):
    id: int
    username: str
    thumb: str | None = None
    plex_account_id: str | None = None
    is_admin: bool


class SessionInfo(Response):
    created_at: datetime
    expires_at: datetime


class SessionResponse(Response):
    user: UserInfo
    session: SessionInfo
    csrf_token: str = Field(description="Send it as `X-CSRF-Token` with every POST, PUT and DELETE.")


class ValidateResponse(Response):
    valid: Literal[True] = True
    user_id: int
    username: str
    is_admin: bool


class PlexLoginStarted(Response):
    pin_id: int
    auth_url: str = Field(description="Send the browser here to approve the sign-in on app.plex.tv.")
    expires_at: datetime


class PinPath(Request):
    pin: Annotated[str, Field(pattern=r"^[0-9]{1,12}$", description="The PIN id from `POST /api/auth/plex`.")]


class PlexLoginStatus(Response):
    status: Literal["pending", "complete"]
    user: UserInfo | None = None


class LogoutResponse(Response):
    sessions_revoked: int
    surrogates_revoked: int = Field(description="Proxy surrogates of this user that stopped working.")


# --- settings -----------------------------------------------------------------------------------

_CREDENTIAL_NAME = re.compile(r"token|secret|password|passwd|bearer|api[_-]?key|authorization|cookie", re.I)
MAX_PREFERENCES_BYTES = 16 * 1024


def _check_preferences(value: dict[str, Any], path: str = "preferences") -> None:
    """Preferences are shown back to the user and stored in clear: no credential may hide in them."""
    for key, item in value.items():
        where = f"{path}.{key}"
        if _CREDENTIAL_NAME.search(key):
            raise ValueError(f"{where} looks like a credential; use the credential endpoints instead")
        if isinstance(item, dict):
            _check_preferences(item, where)
        elif isinstance(item, list):
            for i, element in enumerate(item):
                if isinstance(element, dict):
                    _check_preferences(element, f"{where}.{i}")
                elif isinstance(element, str) and RedactSecrets.redact(element) != element:
                    raise ValueError(f"{where}.{i} looks like a credential")
        elif isinstance(item, str) and RedactSecrets.redact(item) != item:
            raise ValueError(f"{where} looks like a credential")


HttpUrl = Annotated[str, Field(pattern=r"^https?://[^\s/?#]+(/[^\s]*)?$", max_length=2048)]


class PlexServer(Request):
    name: Annotated[str, Field(min_length=1, max_length=200)]
    client_identifier: Annotated[str, Field(pattern=r"^[A-Za-z0-9._:-]{1,200}$")] | None = None
    uri: HttpUrl
    owned: bool | None = None


WatchlistSync = Literal["off", "on", "dry-run"]
WATCHLIST_SYNC_HELP = ("Mirror your Plex and Trakt watchlists both ways (the watchlist-sync job): `on`, `dry-run` "
                       "(only log what it would change), or `off` (the default). Needs Trakt connected.")


class SettingsUpdate(Request):
    """Fields left out keep their value."""

    preferences: dict[str, JsonValue] | None = Field(
        default=None, description="Free-form display preferences (no credentials; at most 16 KiB).")
    plex_servers: Annotated[list[PlexServer], Field(max_length=50)] | None = None
    watchlist_provider: Literal["plex", "trakt", "none"] | None = None
    watchlist_sync: WatchlistSync | None = Field(default=None, description=WATCHLIST_SYNC_HELP)

    @field_validator("preferences")
    @classmethod
    def _preferences(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is None:
            return value
        if len(json.dumps(value)) > MAX_PREFERENCES_BYTES:
            raise ValueError(f"preferences are limited to {MAX_PREFERENCES_BYTES} bytes of JSON")
        _check_preferences(value)
        return value


class TmdbStatus(Response):
    custom_key: bool = Field(description="Whether TMDB calls of this user use their own key.")
    updated_at: datetime | None = None
    bearer: str = Field(description="What the player should send as its TMDB bearer: a surrogate that "
                                    "tells the proxy who is calling (never a real key).")


class Settings(Response):
    preferences: dict[str, JsonValue]
    plex_servers: list[PlexServer]
    watchlist_provider: Literal["plex", "trakt", "none"] | None
    watchlist_sync: WatchlistSync = Field(default="off", description=WATCHLIST_SYNC_HELP)
    tmdb: TmdbStatus
    trakt_connected: bool
    updated_at: datetime | None = None
    # Services whose stored token the token-health job found revoked ("Plex", "Trakt"): sign in again.
    sign_in_again: list[Literal["Plex", "Trakt"]] = []


class TmdbKeyUpdate(Request):
    key: Annotated[str, Field(pattern=r"^[A-Za-z0-9._-]{16,1024}$",
                              description="A TMDB v3 API key or v4 read access token.")]


class LocalStorageSettings(BaseModel):
    """The player's `localStorage["app.settings.v1"]`; unknown fields are kept as they are."""

    model_config = ConfigDict(extra="allow")

    plexBaseUrl: Annotated[str, Field(max_length=2048)] | None = None
    plexToken: Annotated[str, Field(max_length=4096)] | None = None
    plexAccountToken: Annotated[str, Field(max_length=4096)] | None = None
    plexClientId: Annotated[str, Field(max_length=200)] | None = None
    plexServer: dict[str, JsonValue] | None = None
    plexServers: Annotated[list[dict[str, JsonValue]], Field(max_length=50)] | None = None
    tmdbBearer: Annotated[str, Field(max_length=4096)] | None = None
    traktTokens: dict[str, JsonValue] | None = None


# --- Trakt --------------------------------------------------------------------------------------

class TraktTokens(Response):
    """The shape the player keeps as `traktTokens`, with surrogates for both tokens."""

    access_token: str
    refresh_token: str
    token_type: str = "bearer"
    expires_in: int
    created_at: int
    scope: str | None = None


class TraktStatus(Response):
    connected: bool
    expires_at: datetime | None = None
    tokens: TraktTokens | None = None


class TraktDeviceStarted(Response):
    user_code: str
    verification_url: str
    expires_in: int
    interval: int


class TraktDevicePoll(Response):
    status: Literal["pending", "slow_down", "connected", "denied", "expired"]
    tokens: TraktTokens | None = None


class TraktDisconnected(Response):
    connected: Literal[False] = False


# --- usage and administration -------------------------------------------------------------------

class DaysQuery(Request):
    days: int = Field(default=30, ge=1, le=366, description="How many days back to count.")


class HoursQuery(Request):
    hours: int = Field(default=24, ge=1, le=24 * 90, description="How many hours back to look.")


class ErrorsQuery(Request):
    hours: int = Field(default=24, ge=1, le=24 * 90)
    limit: int = Field(default=100, ge=1, le=1000)


class RouteUsage(Response):
    upstream: str
    route: str
    requests: int = Field(description="Every request the player made, answered by the upstream, the cache or "
                                      "the proxy itself (a refused one included).")
    errors: int
    bytes_out: int
    cache_hits: int
    rate_limited: int = Field(description="Requests answered 429: refused by the proxy's rate limits, or by the "
                                          "upstream.")
    avg_latency_ms: float | None = None


class CredentialUsage(Response):
    default: int = Field(description="TMDB requests made with the server's key.")
    custom: int = Field(description="TMDB requests made with the user's own key.")


class UsageResponse(Response):
    user_id: int
    since: datetime
    requests: int
    errors: int
    rate_limited: int
    routes: list[RouteUsage]
    tmdb: CredentialUsage


class AdminUser(Response):
    id: int
    username: str
    plex_account_id: str | None
    is_admin: bool
    created_at: datetime | None
    last_seen_at: datetime | None
    active_sessions: int
    custom_tmdb_key: bool
    trakt_connected: bool
    disabled: bool = False


class AdminUsers(Response):
    users: list[AdminUser]


class UserPath(Request):
    user_id: Annotated[int, Field(ge=1, le=2**53, description="A user's id (`GET /api/admin/users`).")]


class SessionPath(Request):
    session_id: Annotated[int, Field(ge=1, le=2**53, description="A session's id (`GET /api/admin/users/{user_id}/sessions`).")]


class AdminGrant(Request):
    admin: bool = Field(description="true: make the user an admin; false: take back an admin grant.")


class AdminSession(Response):
    id: int
    created_at: datetime | None
    last_seen_at: datetime | None
    expires_at: datetime | None
    revoked_at: datetime | None
    active: bool
    user_agent: str | None
    ip: str | None


class AdminSessions(Response):
    user_id: int
    sessions: list[AdminSession]
    surrogates: int = Field(description="Live proxy surrogates (the players' tokens) of the user.")


class AdminUserChange(Response):
    user: AdminUser
    sessions_revoked: int = 0
    surrogates_revoked: int = 0
    cache_flush_id: int | None = Field(None, description="The queued flush of the user's cache partition.")


class UserUsage(Response):
    user_id: int | None
    username: str | None
    requests: int
    errors: int
    bytes_out: int


class AdminUsage(Response):
    since: datetime
    requests: int
    errors: int
    rate_limited: int
    bytes_out: int
    routes: list[RouteUsage]
    users: list[UserUsage]
    tmdb: CredentialUsage


class RoutePerformance(Response):
    upstream: str
    route: str
    requests: int
    p50_ms: float | None
    p90_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    max_ms: float | None
    avg_ms: float | None
    cache_hit_ratio: float | None = Field(description="hits / (hits + misses + stale); null when never looked up.")


class CacheSummary(Response):
    hits: int
    misses: int
    stale: int
    hit_ratio: float | None


class AdminPerformance(Response):
    since: datetime
    routes: list[RoutePerformance]
    cache: CacheSummary


class ErrorEvent(Response):
    id: int
    ts: datetime
    listener: str
    upstream: str
    route: str
    method: str
    status: int | None
    latency_ms: float | None
    user_id: int | None
    error: str | None = Field(description="What went wrong, with anything that looks like a credential redacted.")


class AdminErrors(Response):
    since: datetime
    errors: list[ErrorEvent]
