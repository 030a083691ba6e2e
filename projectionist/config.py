"""Where Projectionist keeps its state, and the defaults every process agrees on.

Everything generated at run time (SQLite file, disk caches, mitmproxy's CA, keys) lives under one
config directory so that the proxy, the control plane and Datasette (and the docker-compose services
sharing a volume) see the same files. Environment variables override each default.
"""

from __future__ import annotations

import os
import shutil
import stat
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Sequence
from urllib.parse import urlsplit

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_ROOT = PACKAGE_DIR.parent
# A source checkout keeps the files the user edits, rules.yaml and datasette_metadata.yml, at its top
# level. An installed package ships them as package data (projectionist/defaults/, copied there by
# setup.py's build) and copies them to PROJECTIONIST_HOME on first start: the user edits that copy.
SOURCE_CHECKOUT = (REPO_ROOT / "pyproject.toml").is_file() and (REPO_ROOT / "rules.yaml").is_file()
SHIPPED_DEFAULTS = REPO_ROOT if SOURCE_CHECKOUT else PACKAGE_DIR / "defaults"
DEFAULT_RULES = SHIPPED_DEFAULTS / "rules.yaml"
DEFAULT_DATASETTE_METADATA = SHIPPED_DEFAULTS / "datasette_metadata.yml"


def _env_path(name: str, default: Path) -> Path:
    value = os.environ.get(name)
    return Path(value).expanduser() if value else default


class ConfigError(ValueError):
    """A PROJECTIONIST_* value that cannot be used: names the variable, the value and what is allowed."""


def _env_port(name: str, default: int, allow_zero: bool = False) -> int:
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    low = 0 if allow_zero else 1
    if not value.isdigit() or not low <= int(value) <= 65535:
        allowed = "a port number from 1 to 65535" + (", or 0 for none" if allow_zero else "")
        raise ConfigError(f"{name}={value!r} is not valid: use {allowed}")
    return int(value)


# Which variable moves each service's port (for "port already in use" messages).
PORT_VARIABLES = {"proxy": "PROJECTIONIST_PROXY_PORT", "control plane": "PROJECTIONIST_CONTROL_PORT",
                  "dashboard": "PROJECTIONIST_DASHBOARD_PORT", "proxy metrics": "PROJECTIONIST_PROXY_METRICS_PORT"}


# Files 0600, directories 0700: the home holds the database, tokens' ciphertext, caches of
# private answers, logs and backups. Set for the whole process: its threads and pools create files too.
PRIVATE_UMASK = 0o077


def make_private(top: Path) -> None:
    """chmod go-rwx everything under `top` (symlinks are not followed: they may point outside)."""
    for root, dirs, files in os.walk(top):
        for name in (*dirs, *files):
            path = os.path.join(root, name)
            try:
                mode = os.lstat(path).st_mode
                if not stat.S_ISLNK(mode) and mode & 0o077:
                    os.chmod(path, stat.S_IMODE(mode) & 0o700)
            except FileNotFoundError:  # a cache file removed while we walk
                continue
    mode = os.stat(top).st_mode
    if mode & 0o077:
        os.chmod(top, stat.S_IMODE(mode) & 0o700)


@dataclass(frozen=True)
class Config:
    home: Path
    rules_path: Path
    datasette_metadata: Path
    host: str = "127.0.0.1"
    proxy_port: int = 8080
    control_port: int = 3001
    dashboard_port: int = 8001
    # The proxy's operations listener: /metrics, /health and, with Redis, the cached bodies other
    # machines fetch (0: none; loopback unless the proxies of other machines must reach it).
    proxy_metrics_port: int = 0
    proxy_metrics_host: str = "127.0.0.1"
    # "name=url" pairs that send an upstream's traffic somewhere else (offline demo, tests).
    upstream_overrides: tuple[str, ...] = field(default_factory=tuple)

    @property
    def db_path(self) -> Path:
        return self.home / "projectionist.db"

    @property
    def cache_dir(self) -> Path:
        return self.home / "cache"

    @property
    def mitmproxy_confdir(self) -> Path:
        """mitmproxy keeps its CA here (mitmproxy-ca-cert.pem is the one to trust)."""
        return self.home / "mitmproxy"

    @property
    def ca_cert_path(self) -> Path:
        return self.mitmproxy_confdir / "mitmproxy-ca-cert.pem"

    def ensure_dirs(self) -> None:
        """Create the home, private to this account: what the process creates from now on is
        0600/0700 (umask), and what an older version or another tool left readable is fixed."""
        os.umask(PRIVATE_UMASK)
        for d in (self.home, self.cache_dir, self.mitmproxy_confdir):
            d.mkdir(parents=True, exist_ok=True)
        make_private(self.home)

    def install_defaults(self) -> list[Path]:
        """First start of an installed package: copy the shipped rules.yaml and datasette_metadata.yml
        to the home, where the user edits them. Returns what it wrote (nothing in a checkout, nothing
        over an existing file, nothing where PROJECTIONIST_RULES/_DATASETTE_METADATA point)."""
        written = []
        for path in (self.rules_path, self.datasette_metadata):
            shipped = SHIPPED_DEFAULTS / path.name
            if path.parent == self.home and not path.exists() and shipped.is_file() and shipped != path:
                self.ensure_dirs()  # private, as every file of the home
                shutil.copyfile(shipped, path)
                written.append(path)
        return written

    @classmethod
    def from_env(cls, **overrides) -> Config:
        overrides_env = os.environ.get("PROJECTIONIST_UPSTREAMS", "")
        home = overrides.get("home") or _env_path("PROJECTIONIST_HOME", Path("~/.config/projectionist").expanduser())
        values = dict(
            home=home,
            rules_path=_env_path("PROJECTIONIST_RULES", DEFAULT_RULES if SOURCE_CHECKOUT else home / "rules.yaml"),
            datasette_metadata=_env_path("PROJECTIONIST_DATASETTE_METADATA", DEFAULT_DATASETTE_METADATA
                                         if SOURCE_CHECKOUT else home / "datasette_metadata.yml"),
            host=os.environ.get("PROJECTIONIST_HOST", "127.0.0.1"),
            proxy_port=_env_port("PROJECTIONIST_PROXY_PORT", 8080),
            control_port=_env_port("PROJECTIONIST_CONTROL_PORT", 3001),
            dashboard_port=_env_port("PROJECTIONIST_DASHBOARD_PORT", 8001),
            proxy_metrics_port=_env_port("PROJECTIONIST_PROXY_METRICS_PORT", 0, allow_zero=True),
            proxy_metrics_host=os.environ.get("PROJECTIONIST_PROXY_METRICS_HOST", "").strip() or "127.0.0.1",
            upstream_overrides=tuple(p for p in overrides_env.split(",") if p.strip()),
        )
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


# The public default key the player ships with; operators override it.
DEFAULT_TMDB_API_KEY = "db55323b8d3e4154498498a75642b381"


@dataclass(frozen=True)
class ServerCredentials:
    """Credentials the server injects on the clients' behalf. Read from the environment only, so
    they never sit in a file that is committed or shown by the dashboard."""

    tmdb_api_key: str = DEFAULT_TMDB_API_KEY  # v3, sent as api_key=
    tmdb_read_token: str | None = None  # v4, sent as Authorization: Bearer (preferred when set)
    trakt_client_id: str | None = None
    trakt_client_secret: str | None = None

    @classmethod
    def from_env(cls) -> ServerCredentials:
        env = os.environ
        return cls(
            tmdb_api_key=env.get("PROJECTIONIST_TMDB_API_KEY") or DEFAULT_TMDB_API_KEY,
            tmdb_read_token=env.get("PROJECTIONIST_TMDB_READ_TOKEN") or None,
            trakt_client_id=env.get("PROJECTIONIST_TRAKT_CLIENT_ID") or None,
            trakt_client_secret=env.get("PROJECTIONIST_TRAKT_CLIENT_SECRET") or None,
        )

    def __repr__(self) -> str:  # never print a secret, even in a traceback
        return "ServerCredentials(<redacted>)"


def parse_overrides(pairs: Sequence[str]) -> dict[str, str]:
    """PROJECTIONIST_UPSTREAMS pairs (the proxy and the control plane both read them):
    ["tmdb=http://127.0.0.1:9000", ...] -> {"tmdb": "http://127.0.0.1:9000"}."""
    out: dict[str, str] = {}
    for pair in pairs:
        name, sep, url = pair.partition("=")
        parts = urlsplit(url.strip())
        if not sep or not name.strip() or parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"upstream override must look like name=http(s)://host[:port], got {pair!r}")
        out[name.strip()] = url.strip().rstrip("/")
    return out
