"""Starts Datasette over the live store, locked down: SQL off, downloads off, metadata-driven,
admins only.

The lock-down does not rely on the metadata file alone: Datasette reads `allow_sql` from the
metadata before its `default_allow_sql` setting, so an edit could turn arbitrary SQL (which
ignores every table permission) back on. `datasette_command` refuses such metadata, and metadata
without the admin-only authentication, and canned queries that write or read a secret table.

How an admin gets in: every request to the dashboard needs an admin's control-plane session (the
Plex sign-in; projectionist/dashboard_session.py) or HTTP Basic authentication with the dashboard
password (the `datasette-auth-passwords` plugin's check); anything else gets 401 or 403 and no
data, static files and `/-/` endpoints included. The Basic user is `admin`; the password is
`PROJECTIONIST_DASHBOARD_PASSWORD` if set, else the content of `<config dir>/dashboard-password`,
a random one written on first start with mode 0600. `projectionist run` prints where it is;
change it by editing that file (or the variable) and restarting the dashboard. Only a salted
PBKDF2 hash reaches Datasette, through its environment, never its command line.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import secrets
import sys
from pathlib import Path

import yaml

from .config import Config
from .live_activity import DASHBOARD_QUERIES
from .store import SECRET_TABLES

DATABASE = "projectionist"  # Datasette names the database after the file's stem
ADMIN_USER = "admin"
PASSWORD_FILE = "dashboard-password"
PASSWORD_ENV = "PROJECTIONIST_DASHBOARD_PASSWORD"
PASSWORD_HASH_ENV = "PROJECTIONIST_DASHBOARD_PASSWORD_HASH"  # read by datasette_metadata.yml ($env)
AUTH_PLUGIN = "datasette-auth-passwords"
DASHBOARDS_PLUGIN = "datasette-dashboards"  # the dashboard home, /-/dashboards/home
# Basic auth checks the password on every request: the hash is cheap to check on purpose. The
# generated password is random (144 bits), so the hash's work factor is not what protects it.
PBKDF2_ITERATIONS = 10_000

LOCKED_SETTINGS = {
    "default_allow_sql": "off",
    "allow_download": "off",
    "allow_csv_stream": "off",
    "template_debug": "off",
    "trace_debug": "off",
    "sql_time_limit_ms": "3000",
    # An hourly chart over 14 days for 5 upstreams is 1,680 rows: charts need them all.
    "max_returned_rows": "5000",
    # Facet suggestions run a GROUP BY per column of a 1M-row table on every page view.
    "suggest_facets": "off",
}


class UnsafeMetadata(ValueError):
    pass


def _mentions_table(sql: str, table: str) -> bool:
    return re.search(rf"\b{re.escape(table)}\b", sql, re.IGNORECASE) is not None


def metadata_problems(metadata: dict) -> list[str]:
    """What in a datasette_metadata.yml would expose a secret, or the dashboard to anyone."""
    problems = []
    if metadata.get("allow_sql", False) is not False:
        problems.append("allow_sql must be false (arbitrary SQL bypasses table permissions)")
    for name, database in (metadata.get("databases") or {}).items():
        if (database or {}).get("allow_sql", False) is not False:
            problems.append(f"databases.{name}.allow_sql must be false")
    database = (metadata.get("databases") or {}).get(DATABASE) or {}
    tables = database.get("tables") or {}
    for table in SECRET_TABLES:
        if (tables.get(table) or {}).get("allow") is not False:
            problems.append(f"databases.{DATABASE}.tables.{table} holds secrets: it needs `allow: false`")
    # The plugins' own canned queries (projectionist.live_activity) are held to the same rules.
    queries = {**(database.get("queries") or {}), **DASHBOARD_QUERIES}
    for name, query in queries.items():
        query = {"sql": query} if isinstance(query, str) else (query or {})
        if query.get("write"):
            problems.append(f"databases.{DATABASE}.queries.{name} must not write")
        for table in SECRET_TABLES:
            if _mentions_table(query.get("sql") or "", table):
                problems.append(f"databases.{DATABASE}.queries.{name} reads {table}, which holds secrets")
    problems += _dashboards_problems(metadata, set(queries))
    # Admins only: authentication on every request, and the instance allowed to the admin alone.
    auth = (metadata.get("plugins") or {}).get(AUTH_PLUGIN) or {}
    if auth.get("http_basic_auth") is not False:  # dashboard_session's gate asks for a session or the password
        problems.append(f"plugins.{AUTH_PLUGIN}.http_basic_auth must be false (projectionist.dashboard_session "
                        "gates every request: an admin's Plex session or the dashboard password)")
    if auth.get(f"{ADMIN_USER}_password_hash") != {"$env": PASSWORD_HASH_ENV}:
        problems.append(f"plugins.{AUTH_PLUGIN}.{ADMIN_USER}_password_hash must be {{$env: {PASSWORD_HASH_ENV}}}")
    extra = [k for k in auth if k.endswith("_password_hash") and k != f"{ADMIN_USER}_password_hash"]
    if extra:
        problems.append(f"plugins.{AUTH_PLUGIN}: only the {ADMIN_USER} account is allowed, not {extra}")
    if metadata.get("allow") != {"id": ADMIN_USER}:
        problems.append(f"allow must be {{id: {ADMIN_USER}}} (the instance is for the admin only)")
    return problems


def _dashboards_problems(metadata: dict, canned: set[str]) -> list[str]:
    """datasette-dashboards' charts run as canned queries (projectionist/dashboard_charts.py): each
    chart names one; its filters' option lists run as they are, so they must not read a secret."""
    problems = []
    dashboards = (metadata.get("plugins") or {}).get(DASHBOARDS_PLUGIN) or {}
    for slug, dashboard in dashboards.items():
        where = f"plugins.{DASHBOARDS_PLUGIN}.{slug}"
        for name, chart in ((dashboard or {}).get("charts") or {}).items():
            chart = chart or {}
            if chart.get("library") == "markdown":
                continue
            if chart.get("db") != DATABASE or chart.get("query") not in canned:
                problems.append(f"{where}.charts.{name} must have db: {DATABASE} and a query that names one of "
                                f"databases.{DATABASE}.queries (SQL is off)")
        for name, flt in ((dashboard or {}).get("filters") or {}).items():
            sql = (flt or {}).get("query") or ""
            if sql and (flt or {}).get("db") != DATABASE:
                problems.append(f"{where}.filters.{name} must have db: {DATABASE}")
            for table in SECRET_TABLES:
                if _mentions_table(sql, table):
                    problems.append(f"{where}.filters.{name} reads {table}, which holds secrets")
    return problems


def datasette_command(config: Config, port: int | None = None) -> list[str]:
    metadata_path = Path(config.datasette_metadata)
    problems = metadata_problems(yaml.safe_load(metadata_path.read_text()) or {})
    if problems:
        raise UnsafeMetadata(f"{metadata_path}: refusing to serve the dashboard:\n  " + "\n  ".join(problems))
    # Served mutable (not -i): immutable mode misreads a WAL file under a concurrent writer.
    # Never --crossdb: the _memory database would take SQL across every attached file.
    cmd = [
        # Datasette's CLI, wrapped so that it logs in the shared format (dashboard_server.py).
        sys.executable, "-m", "projectionist.dashboard_server", "serve", str(config.db_path),
        "--metadata", str(metadata_path),
        "--host", config.host,
        "--port", str(config.dashboard_port if port is None else port),
    ]
    for name, value in LOCKED_SETTINGS.items():
        cmd += ["--setting", name, value]
    return cmd


# --- the admin's password ---------------------------------------------------------------------------

def password_path(config: Config) -> Path:
    return config.home / PASSWORD_FILE


def admin_password(config: Config) -> str:
    """The dashboard password: PROJECTIONIST_DASHBOARD_PASSWORD, else the config dir's file
    (created with a random password, mode 0600, on first use)."""
    if os.environ.get(PASSWORD_ENV):
        return os.environ[PASSWORD_ENV]
    path = password_path(config)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    else:
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(18) + "\n")
    if path.stat().st_mode & 0o077:
        path.chmod(0o600)
    password = path.read_text().strip()
    if not password:
        raise UnsafeMetadata(f"{path} is empty: put the dashboard password in it (or delete it for a new one)")
    return password


def hash_password(password: str, salt: str | None = None, iterations: int = PBKDF2_ITERATIONS) -> str:
    """datasette-auth-passwords' format: pbkdf2_sha256$<iterations>$<salt>$<base64 hash>."""
    salt = salt or secrets.token_hex(16)
    digest = hashlib.pbkdf2_hmac("sha256", password.encode(), salt.encode(), iterations)
    return f"pbkdf2_sha256${iterations}${salt}${base64.b64encode(digest).decode()}"


def datasette_env(config: Config, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment Datasette runs with: the admin password's hash for the auth plugin."""
    env = dict(os.environ if base is None else base)
    env.pop(PASSWORD_ENV, None)  # Datasette needs the hash only
    env[PASSWORD_HASH_ENV] = hash_password(admin_password(config))
    return env


def login_hint(config: Config) -> str:
    where = PASSWORD_ENV if os.environ.get(PASSWORD_ENV) else str(password_path(config))
    return f'user "{ADMIN_USER}", password in {where}'
