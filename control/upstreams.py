"""Where the control plane reaches plex.tv, TMDB and Trakt.

The same `PROJECTIONIST_UPSTREAMS` overrides ("name=url") that the proxy applies send these calls
elsewhere (tests, the offline demo), so no code path here can reach the real services by accident
when an override is set.
"""

from __future__ import annotations

from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version

from projectionist.config import parse_overrides

# Upstream names as rules.yaml declares them -> their real base URLs.
DEFAULT_BASES = {
    "plextv": "https://plex.tv",
    "tmdb": "https://api.themoviedb.org",
    "trakt": "https://api.trakt.tv",
}
# Where a user approves a Plex PIN. Not an API the server calls: the browser is sent there.
PLEX_APP_AUTH = "https://app.plex.tv/auth/#!?"

PRODUCT = "Projectionist"
try:
    PRODUCT_VERSION = version("projectionist")
except PackageNotFoundError:  # running from a checkout that was never installed
    PRODUCT_VERSION = "0"


def plex_headers(client_id: str, token: str | None = None) -> dict[str, str]:
    """What the control plane sends plex.tv: JSON, its stable client identity, and a token if any."""
    headers = {"Accept": "application/json", "X-Plex-Client-Identifier": client_id,
               "X-Plex-Product": PRODUCT, "X-Plex-Version": PRODUCT_VERSION,
               "X-Plex-Device": "Projectionist control plane", "X-Plex-Platform": "Web"}
    if token:
        headers["X-Plex-Token"] = token
    return headers


# plex.tv's watchlist host: rules.yaml routes it to the `plextv` upstream, so overriding `plextv`
# moves it too (never the real discover host while plex.tv is a fake).
DISCOVER_BASE = "https://discover.provider.plex.tv"


class Upstreams:
    def __init__(self, overrides: Sequence[str] = ()) -> None:
        self.bases = dict(DEFAULT_BASES)
        self.bases.update({name: url for name, url in parse_overrides(overrides).items() if name in DEFAULT_BASES})
        self.bases["discover"] = self.bases["plextv"] if self.bases["plextv"] != DEFAULT_BASES["plextv"] else DISCOVER_BASE

    def url(self, name: str, path: str) -> str:
        return self.bases[name] + path
