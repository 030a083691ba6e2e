"""Trakt: the server's OAuth app credentials go in, the user's tokens stay in the vault.

Requests to api.trakt.tv: `trakt-api-key` is set to the server's client id, and the OAuth calls
(`/oauth/device/code`, `/oauth/device/token`, `/oauth/token`, `/oauth/revoke`) get the server's
`client_id` / `client_secret` in their body, whatever the frontend's bundle hard-codes. A
surrogate in `Authorization: Bearer`, in `refresh_token` (refresh) or in `token` (revoke) is
swapped for the real token; an unknown, revoked or expired one is answered 401 in Trakt's format
without calling Trakt. A real access token from a client from before Projectionist passes and is
vaulted.

Responses of `/oauth/device/token` and `/oauth/token`: `access_token` and `refresh_token` are
vaulted and replaced by surrogates. A used refresh surrogate and a revoked token's surrogate are
revoked in the vault once Trakt has accepted the call.

Without server credentials (PROJECTIONIST_TRAKT_CLIENT_ID/SECRET unset) the client's own app
credentials pass unchanged; surrogates are still swapped.

A request that names no user (no live surrogate in the bearer or the body) is anonymous:
`proxy.anonymous` says what it gets (proxy_addons/anonymous.py). Forwarded, it goes out exactly as
the client sent it, with its own app credentials, and its answer is not vaulted either.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime, timedelta
from urllib.parse import parse_qsl, urlencode

from mitmproxy import http

from projectionist.vault import is_surrogate

from . import anonymous, flowinfo
from .credentials import CredentialStore
from .local_responses import unauthorized
from .rules_watch import RulesWatcher

log = logging.getLogger(__name__)

TRAKT = "trakt"  # rules.yaml `credentials:` of the Trakt upstream
ACCESS = "trakt_access"  # vault kinds
REFRESH = "trakt_refresh"
API_KEY = "trakt-api-key"
_OAUTH = ("/oauth/device/code", "/oauth/device/token", "/oauth/token", "/oauth/revoke")
_NEEDS_SECRET = ("/oauth/device/token", "/oauth/token", "/oauth/revoke")
_ISSUES_TOKENS = ("/oauth/device/token", "/oauth/token")
_BODY_TOKENS = {"/oauth/token": ("refresh_token", (REFRESH,)), "/oauth/revoke": ("token", (ACCESS, REFRESH))}
_EXPIRY_GRACE = timedelta(days=1)  # the surrogate outlives the real token a little: Trakt says when it expired
_SPENT = "projectionist.trakt_spent"  # flow.metadata: the body surrogate to revoke once Trakt accepted the call
_REDACTED = b"[redacted]"


class TraktCredentials:
    def __init__(self, store: CredentialStore, watcher: RulesWatcher) -> None:
        self.store = store
        self.watcher = watcher

    def running(self) -> None:
        if not self._configured():
            log.warning("Trakt app credentials are not configured (PROJECTIONIST_TRAKT_CLIENT_ID/SECRET): "
                        "the frontend's own client id and secret pass through to Trakt")

    def _configured(self) -> bool:
        server = self.store.server
        return bool(server.trakt_client_id and server.trakt_client_secret)

    # --- requests ---------------------------------------------------------------------------------

    async def request(self, flow: http.HTTPFlow) -> None:
        info = flowinfo.get(flow)
        if (info is None or info.match.credentials != TRAKT or flow.response is not None
                or flow.request.method == "OPTIONS"):  # preflights carry no credentials
            return
        request = flow.request
        as_sent = request.headers.copy(), request.raw_content  # put back if it turns out anonymous
        path = request.path.split("?", 1)[0]
        configured = self._configured()
        if configured:
            request.headers[API_KEY] = self.store.server.trakt_client_id
        credential = "default" if configured else ("client" if request.headers.get(API_KEY) else None)

        users: set[int | None] = set()
        sent = request.headers.get("Authorization", "")
        token = sent[7:].strip() if sent[:7].lower() == "bearer " else ""
        if token:
            if is_surrogate(token):
                entry = await self.store.call(self.store.vault.resolve, token)
                if entry is None or entry.kind != ACCESS:
                    flow.response = unauthorized(request, info.match.upstream.kind)
                    return
                request.headers["Authorization"] = f"Bearer {entry.real}"
                users.add(entry.user_id)
                credential = "vault"
            else:  # a client from before Projectionist: the token passes and is vaulted
                entry = await self.store.call(self.store.vault.find_real, ACCESS, token)
                if entry is None:
                    await self.store.call(self.store.vault.surrogate_for, ACCESS, token, info.user_id)
                users.add(entry.user_id if entry else info.user_id)
                credential = "client"

        if path in _OAUTH and request.method == "POST":
            outcome = await self._rewrite_oauth_body(flow, path, configured)
            if outcome is False:
                flow.response = unauthorized(request, info.match.upstream.kind)
                return
            if outcome is not None:
                users.add(outcome[0])
                credential = outcome[1]

        users.discard(None)
        if info.user_id is not None:
            users.add(info.user_id)
        if len(users) > 1:  # tokens of two different users in one request
            flow.response = unauthorized(request, info.match.upstream.kind)
            return
        if not users and anonymous.handle(flow, info, self.watcher):
            request.headers, request.raw_content = as_sent
            flow.metadata.pop(_SPENT, None)
            return
        info.user_id = users.pop() if users else None
        info.credential = credential

    async def _rewrite_oauth_body(self, flow: http.HTTPFlow, path: str,
                                  configured: bool) -> tuple[int | None, str] | bool | None:
        """Server app credentials in, body surrogate out. False: refuse; (user, credential): a token was sent."""
        request = flow.request
        form = "x-www-form-urlencoded" in request.headers.get("content-type", "")
        try:
            body = dict(parse_qsl(request.get_text(), keep_blank_values=True)) if form else json.loads(
                request.content or b"{}")
        except (ValueError, UnicodeDecodeError):
            return None  # not ours to fix: Trakt answers it
        if not isinstance(body, dict):
            return None
        if configured:
            server = self.store.server
            body["client_id"] = server.trakt_client_id
            if path in _NEEDS_SECRET or "client_secret" in body:
                body["client_secret"] = server.trakt_client_secret
        outcome = None
        field, kinds = _BODY_TOKENS.get(path, (None, ()))
        value = body.get(field) if field else None
        if isinstance(value, str) and value:
            if is_surrogate(value):
                entry = await self.store.call(self.store.vault.resolve, value)
                if entry is None or entry.kind not in kinds:
                    return False
                body[field] = entry.real
                flow.metadata[_SPENT] = value
                outcome = (entry.user_id, "vault")
            else:
                outcome = (None, "client")
        if form:
            request.content = urlencode(body).encode()
        else:
            request.content = json.dumps(body, separators=(",", ":")).encode()
        return outcome

    # --- responses --------------------------------------------------------------------------------

    async def response(self, flow: http.HTTPFlow) -> None:
        info = flowinfo.get(flow)
        response = flow.response
        if info is None or info.match.credentials != TRAKT or response is None or response.stream:
            return
        self._keep_server_credentials_out(response)
        if info.credential == anonymous.CREDENTIAL:  # forwarded as sent: the client's own tokens
            return
        path = flow.request.path.split("?", 1)[0]
        if flow.request.method != "POST" or path not in _OAUTH or not 200 <= response.status_code < 300:
            return
        if spent := flow.metadata.get(_SPENT):  # a used refresh token, or a revoked token
            await self.store.call(self.store.vault.revoke, spent)
        if path in _ISSUES_TOKENS and response.raw_content:
            await self._vault_tokens(flow, info)

    async def _vault_tokens(self, flow: http.HTTPFlow, info: flowinfo.FlowInfo) -> None:
        try:
            body = json.loads(flow.response.content)
        except (ValueError, UnicodeDecodeError):
            return
        if not isinstance(body, dict):
            return
        changed = False
        for field, kind in (("access_token", ACCESS), ("refresh_token", REFRESH)):
            real = body.get(field)
            if isinstance(real, str) and real and not is_surrogate(real):
                expires_at = _expires_at(body) if kind == ACCESS else None
                body[field] = await self.store.call(self.store.vault.surrogate_for, kind, real, info.user_id,
                                                    None, expires_at)
                changed = True
        if changed:
            flow.response.content = json.dumps(body, separators=(",", ":")).encode()
            info.credential = info.credential or "vault"

    def _keep_server_credentials_out(self, response: http.Response) -> None:
        """Trakt never echoes the app credentials; if it ever did, the client would not see them."""
        server = self.store.server
        secrets = [s.encode() for s in (server.trakt_client_secret, server.trakt_client_id) if s]
        if not secrets:
            return
        fields = response.headers.fields
        if any(s in name or s in value for name, value in fields for s in secrets):
            response.headers.fields = tuple((_scrub(name, secrets), _scrub(value, secrets)) for name, value in fields)
        content = response.get_content(strict=False) if response.raw_content else None
        if content and any(s in content for s in secrets):
            response.content = _scrub(content, secrets)


def _scrub(data: bytes, secrets: list[bytes]) -> bytes:
    for secret in secrets:
        data = data.replace(secret, _REDACTED)
    return data


def _expires_at(body: dict) -> str | None:
    """When the access-token surrogate stops resolving: a little after Trakt's own expiry."""
    expires_in, created_at = body.get("expires_in"), body.get("created_at")
    if not isinstance(expires_in, int | float) or isinstance(expires_in, bool) or expires_in <= 0:
        return None
    start = (datetime.fromtimestamp(created_at, UTC) if isinstance(created_at, int | float)
             and not isinstance(created_at, bool) else datetime.now(UTC))
    return (start + timedelta(seconds=expires_in) + _EXPIRY_GRACE).isoformat(timespec="seconds")
