"""What Projectionist knows about one flow, shared between its addons through `flow.metadata`.

The router fills it in `requestheaders`; later addons (credentials, cache, limits) add the user,
the credential kind and the cache outcome; the usage recorder turns it into a usage row. Flows
without it are not ours: they pass through untouched and are not recorded.
"""

from __future__ import annotations

from dataclasses import dataclass

from mitmproxy import http

from projectionist.rules import Match

METADATA_KEY = "projectionist"


@dataclass(slots=True)
class FlowInfo:
    match: Match
    listener: str  # "regular" (explicit proxy) or "reverse"
    user_id: int | None = None
    credential: str | None = None  # which kind was injected ("default", "custom", "vault"): never a value
    credential_ref: int | None = None  # the vault row of the surrogate presented, if any
    cache: str = "none"  # none | miss | hit | stale | bypass
    cache_reason: str | None = None
    warm: bool = False  # the cache warmer's own request: background work, recorded as listener "warm"  # why not a fresh hit: "<fwd>[:<detail>]" of Cache-Status (RFC 9211)
    bytes_streamed: int = 0
    refused: str | None = None  # why the proxy refused it before routing (e.g. "misdirected")
    user_specific: bool = False  # the answer belongs to one account (rules.Rules.user_specific)
    # The machine id of the Plex server this request goes to when it is not the upstream's
    # configured one (another server of the account, through the explicit proxy): caches and
    # limits keep it apart. "" for the configured server and every other upstream.
    server: str = ""

    def scope(self, declared: str) -> str:
        """A cache or image rule's scope as applied: never `shared` for an answer that belongs to one account."""
        return "user" if self.user_specific else declared

    @property
    def upstream(self) -> str:
        return self.match.upstream_name

    @property
    def cache_upstream(self) -> str:
        """The upstream as cache keys name it: one Plex server's answers never answer another's."""
        return f"{self.upstream}@{self.server}" if self.server else self.upstream

    @property
    def route(self) -> str:
        return f"{self.upstream}:{self.refused}" if self.refused else self.match.route_name


def get(flow: http.HTTPFlow) -> FlowInfo | None:
    return flow.metadata.get(METADATA_KEY)


def attach(flow: http.HTTPFlow, info: FlowInfo) -> None:
    flow.metadata[METADATA_KEY] = info
