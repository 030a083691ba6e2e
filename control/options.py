"""The control plane's own settings, read from the environment next to `projectionist.config.Config`.

    PROJECTIONIST_ADMINS             comma-separated Plex account ids that are admins
                                     (unset: the first user who ever signed in is the admin)
    PROJECTIONIST_SESSION_TTL        idle lifetime of a session in seconds (default 14 days; each use renews it)
    PROJECTIONIST_SESSION_MAX_AGE    absolute lifetime of a session in seconds (default 90 days; never renewed past)
    PROJECTIONIST_AUTH_RATE_LIMIT    sign-in requests per IP, "COUNT/SECONDS" (default 20/60)
    PROJECTIONIST_CONTROL_URL        the control plane's public origin, e.g. https://projectionist.lan
                                     (default: the name of this machine the browser used, at the
                                     listener's port; else the listener's address: never any Host)
    PROJECTIONIST_PLEX_SERVERS       comma-separated machine identifiers of the Plex servers served
                                     (default: the servers the first owner to sign in owns)
    PROJECTIONIST_ALLOWED_USERS      optional allow-list: Plex account ids, usernames or e-mails that may
                                     sign in (besides needing access to a served server; owners always may)
    PROJECTIONIST_TRUST_FORWARDED    1: behind a reverse proxy, trust X-Forwarded-For/-Proto/-Host
    PROJECTIONIST_TRAKT_REFRESH_INTERVAL  seconds between sweeps that refresh Trakt tokens (default 3600)
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from projectionist.config import ServerCredentials

DAY = 86400


def _int(name: str, default: int, minimum: int = 1) -> int:
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    if not value.isdigit() or int(value) < minimum:
        raise ValueError(f"{name}={value!r} is not valid: use a whole number of at least {minimum}")
    return int(value)


def _names(name: str) -> frozenset[str]:
    return frozenset(a.strip() for a in os.environ.get(name, "").split(",") if a.strip())


def parse_rate(value: str) -> tuple[int, float]:
    """"20/60" -> (20, 60.0): at most 20 requests in a burst, refilled over 60 seconds."""
    count, sep, seconds = value.partition("/")
    try:
        parsed = int(count), float(seconds) if sep else 60.0
    except ValueError:
        raise ValueError(f"a rate limit looks like COUNT/SECONDS (e.g. 20/60), got {value!r}") from None
    if parsed[0] < 1 or parsed[1] <= 0:
        raise ValueError(f"a rate limit needs a positive count and period, got {value!r}")
    return parsed


def _rate(name: str, default: str) -> tuple[int, float]:
    value = os.environ.get(name, "").strip() or default
    try:
        return parse_rate(value)
    except ValueError as exc:
        raise ValueError(f"{name}={value!r} is not valid: {exc}") from None


@dataclass(frozen=True)
class ControlOptions:
    admins: frozenset[str] = frozenset()
    session_ttl: int = 14 * DAY
    session_max_age: int = 90 * DAY
    auth_rate: tuple[int, float] = (20, 60.0)
    public_origin: str | None = None
    trust_forwarded: bool = False
    plex_servers: frozenset[str] = frozenset()
    allowed_users: frozenset[str] = frozenset()
    trakt_refresh_interval: int = 3600
    server: ServerCredentials = field(default_factory=ServerCredentials)

    @classmethod
    def from_env(cls, **overrides) -> ControlOptions:
        env = os.environ
        public = env.get("PROJECTIONIST_CONTROL_URL", "").strip().rstrip("/") or None
        if public:
            parts = urlsplit(public)
            if parts.scheme not in ("http", "https") or not parts.netloc or parts.path:
                raise ValueError(f"PROJECTIONIST_CONTROL_URL={public!r} is not valid: use an origin like https://host[:port]")
        values = dict(
            admins=frozenset(a.strip() for a in env.get("PROJECTIONIST_ADMINS", "").split(",") if a.strip()),
            session_ttl=_int("PROJECTIONIST_SESSION_TTL", 14 * DAY, minimum=60),
            session_max_age=_int("PROJECTIONIST_SESSION_MAX_AGE", 90 * DAY, minimum=60),
            auth_rate=_rate("PROJECTIONIST_AUTH_RATE_LIMIT", "20/60"),
            public_origin=public,
            plex_servers=_names("PROJECTIONIST_PLEX_SERVERS"),
            allowed_users=_names("PROJECTIONIST_ALLOWED_USERS"),
            trust_forwarded=env.get("PROJECTIONIST_TRUST_FORWARDED", "").strip().lower() in ("1", "true", "yes"),
            trakt_refresh_interval=_int("PROJECTIONIST_TRAKT_REFRESH_INTERVAL", 3600, minimum=1),
            server=ServerCredentials.from_env(),
        )
        values.update(overrides)
        return cls(**values)
