"""TMDB: a user's surrogate as the bearer is swapped for a real key.

The user's own key (set through the control plane) when they have one, otherwise the server's
default key. A request without a live surrogate of an enabled user is anonymous: `proxy.anonymous`
says what it gets (proxy_addons/anonymous.py; by default it goes on untouched, with the client's
own key). An unknown, revoked or disabled user's surrogate gets TMDB's 401 without reaching TMDB
(under `lend`: the server's key, as before).
Usage rows record which kind was used, never the value.
"""

from __future__ import annotations

import re

from mitmproxy import http

from projectionist.vault import is_surrogate

from . import anonymous, flowinfo
from .credentials import CredentialStore
from .local_responses import unauthorized
from .rules_watch import RulesWatcher

_V3_KEY = re.compile(r"^[0-9a-f]{32}$")
TMDB_KEY_NAME = "tmdb"  # user_credentials.name of a user's custom key


class TmdbKey:
    def __init__(self, store: CredentialStore, watcher: RulesWatcher) -> None:
        self.store = store
        self.watcher = watcher

    async def request(self, flow: http.HTTPFlow) -> None:
        info = flowinfo.get(flow)
        if (info is None or info.match.credentials != "tmdb" or flow.response is not None
                or flow.request.method == "OPTIONS"):  # preflights carry no credentials
            return
        request = flow.request
        user_id = info.user_id
        placeholder = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        if user_id is None and is_surrogate(placeholder):
            entry = await self.store.call(self.store.vault.resolve, placeholder)
            if entry is None and anonymous.mode(self.watcher) != "lend":
                # Unknown, revoked, or its user disabled: TMDB never sees it (`lend`: as anonymous).
                flow.response = unauthorized(request, info.match.upstream.kind)
                return
            user_id = entry.user_id if entry else None
        if user_id is None and anonymous.handle(flow, info, self.watcher):
            return
        request.headers.pop("Authorization", None)
        if "api_key=" in request.path:  # editing the query re-encodes the path: only when needed
            request.query.pop("api_key", None)
        custom = None
        if user_id is not None:
            custom = await self.store.call(self.store.vault.user_credential, user_id, TMDB_KEY_NAME)
        server = self.store.server
        key = custom or server.tmdb_read_token or server.tmdb_api_key
        if _V3_KEY.match(key):
            request.query["api_key"] = key
        else:  # a v4 read access token
            request.headers["Authorization"] = f"Bearer {key}"
        info.user_id = user_id
        info.credential = "custom" if custom else "default"
