"""TMDB: whatever credential the browser sent is removed and the server's is injected.

The user's own key (set through the control plane) when their placeholder bearer is one of
their surrogates; otherwise the server's default key. Usage rows record which kind was used,
never the value.
"""

from __future__ import annotations

import re

from mitmproxy import http

from projectionist.vault import is_surrogate

from . import flowinfo
from .credentials import CredentialStore

_V3_KEY = re.compile(r"^[0-9a-f]{32}$")
TMDB_KEY_NAME = "tmdb"  # user_credentials.name of a user's custom key


class TmdbKey:
    def __init__(self, store: CredentialStore) -> None:
        self.store = store

    async def request(self, flow: http.HTTPFlow) -> None:
        info = flowinfo.get(flow)
        if info is None or info.match.credentials != "tmdb" or flow.response is not None:
            return
        request = flow.request
        sent = request.headers.pop("Authorization", "")
        if "api_key=" in request.path:  # editing the query re-encodes the path: only when needed
            request.query.pop("api_key", None)
        user_id = info.user_id
        placeholder = sent.removeprefix("Bearer ").strip()
        if user_id is None and is_surrogate(placeholder):
            entry = await self.store.call(self.store.vault.resolve, placeholder)
            user_id = entry.user_id if entry else None
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
