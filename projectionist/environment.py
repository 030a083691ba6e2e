"""The environment variables each command reads, for `projectionist <command> --help`.

One line per variable here; the code that reads a variable owns its meaning (config.py,
control/options.py, vault.py, ...). A variable a command reads must be listed for that command:
tests/test_setup.py checks the help of every command.
"""

from __future__ import annotations

VARIABLES = {
    "PROJECTIONIST_HOME": "state directory: database, caches, CA, keys (default ~/.config/projectionist)",
    "PROJECTIONIST_RULES": "rules.yaml to use (default: the shipped one)",
    "PROJECTIONIST_DATASETTE_METADATA": "Datasette metadata file (default: the shipped one)",
    "PROJECTIONIST_HOST": "address every service listens on (default 127.0.0.1)",
    "PROJECTIONIST_PROXY_PORT": "explicit HTTPS proxy port (default 8080)",
    "PROJECTIONIST_CONTROL_PORT": "control plane port (default 3001)",
    "PROJECTIONIST_DASHBOARD_PORT": "dashboard port (default 8001)",
    "PROJECTIONIST_UPSTREAMS": "name=url,... sends an upstream's traffic elsewhere",
    "PROJECTIONIST_LOG_LEVEL": "DEBUG | INFO | WARNING | ERROR (default INFO)",
    "PROJECTIONIST_LOG_FORMAT": "json | text | auto (default auto)",
    "PROJECTIONIST_LOG_DIR": "also write each service's log to a file here",
    "PROJECTIONIST_SECRET_KEY": "vault key(s), comma-separated, newest first (default: <home>/secret.key)",
    "PROJECTIONIST_REDIS_URL": "Redis shared by several processes (rate-limit budgets, job leases)",
    "PROJECTIONIST_PROXY_METRICS_PORT": "port of the proxy's Prometheus metrics (worker i: this + i)",
    "PROJECTIONIST_PROXY_METRICS_HOST": "address of that listener (default 127.0.0.1; with Redis, other machines "
                                        "fetch cached bodies too big for Redis there)",
    "PROJECTIONIST_PEER_HOST": "the name or address other machines reach that listener at (default: its address)",
    "PROJECTIONIST_PROXY_WORKERS": "proxy processes sharing its ports (as --workers; more than 1 needs Redis)",
    "PROJECTIONIST_TMDB_API_KEY": "the server's TMDB v3 key (default: the player's public one)",
    "PROJECTIONIST_TMDB_READ_TOKEN": "the server's TMDB v4 read token (preferred when set)",
    "PROJECTIONIST_TRAKT_CLIENT_ID": "the server's Trakt app client id",
    "PROJECTIONIST_TRAKT_CLIENT_SECRET": "the server's Trakt app client secret",
    "PROJECTIONIST_ADMINS": "comma-separated Plex account ids of admins (default: the first user)",
    "PROJECTIONIST_SESSION_TTL": "idle lifetime of a session, seconds (default 14 days)",
    "PROJECTIONIST_SESSION_MAX_AGE": "absolute lifetime of a session, seconds (default 90 days)",
    "PROJECTIONIST_AUTH_RATE_LIMIT": "sign-in requests per IP, COUNT/SECONDS (default 20/60)",
    "PROJECTIONIST_CONTROL_URL": "the control plane's public origin, e.g. https://projectionist.lan",
    "PROJECTIONIST_TRUST_FORWARDED": "1: behind a reverse proxy, trust X-Forwarded-*",
    "PROJECTIONIST_TRAKT_REFRESH_INTERVAL": "seconds between Trakt token refresh sweeps (default 3600)",
    "PROJECTIONIST_METRICS_TOKEN": "bearer token /metrics asks for",
    "PROJECTIONIST_BACKUP_PASSPHRASE": "encrypts backups (scheduled and `backup`)",
    "PROJECTIONIST_DASHBOARD_PASSWORD": "dashboard admin password (default: <home>/dashboard-password)",
    "PROJECTIONIST_DEMO_PORT": "first port of the --demo fake upstreams (default 18100)",
}

_CONFIG = ["PROJECTIONIST_HOME", "PROJECTIONIST_RULES", "PROJECTIONIST_HOST", "PROJECTIONIST_PROXY_PORT",
           "PROJECTIONIST_CONTROL_PORT", "PROJECTIONIST_DASHBOARD_PORT", "PROJECTIONIST_UPSTREAMS"]
_LOGS = ["PROJECTIONIST_LOG_LEVEL", "PROJECTIONIST_LOG_FORMAT", "PROJECTIONIST_LOG_DIR"]
_CREDENTIALS = ["PROJECTIONIST_SECRET_KEY", "PROJECTIONIST_TMDB_API_KEY", "PROJECTIONIST_TMDB_READ_TOKEN",
                "PROJECTIONIST_TRAKT_CLIENT_ID", "PROJECTIONIST_TRAKT_CLIENT_SECRET"]
_PROXY = [*_CONFIG, *_LOGS, *_CREDENTIALS, "PROJECTIONIST_REDIS_URL", "PROJECTIONIST_PROXY_METRICS_PORT",
          "PROJECTIONIST_PROXY_METRICS_HOST", "PROJECTIONIST_PEER_HOST", "PROJECTIONIST_PROXY_WORKERS"]
_CONTROL = [*_CONFIG, *_LOGS, *_CREDENTIALS, "PROJECTIONIST_REDIS_URL", "PROJECTIONIST_ADMINS",
            "PROJECTIONIST_SESSION_TTL", "PROJECTIONIST_SESSION_MAX_AGE", "PROJECTIONIST_AUTH_RATE_LIMIT",
            "PROJECTIONIST_CONTROL_URL", "PROJECTIONIST_TRUST_FORWARDED", "PROJECTIONIST_TRAKT_REFRESH_INTERVAL",
            "PROJECTIONIST_METRICS_TOKEN", "PROJECTIONIST_BACKUP_PASSPHRASE"]
_DASHBOARD = ["PROJECTIONIST_HOME", "PROJECTIONIST_HOST", "PROJECTIONIST_DASHBOARD_PORT",
              "PROJECTIONIST_DATASETTE_METADATA", "PROJECTIONIST_DASHBOARD_PASSWORD", *_LOGS]

BY_COMMAND = {
    "run": list(dict.fromkeys([*_PROXY, *_CONTROL, *_DASHBOARD, "PROJECTIONIST_DEMO_PORT"])),
    "proxy": _PROXY,
    "control": _CONTROL,
    "dashboard": _DASHBOARD,
    "check-rules": ["PROJECTIONIST_RULES (when FILE is not given)"],
    "migrate": ["PROJECTIONIST_HOME"],
    "rotate-key": ["PROJECTIONIST_HOME", "PROJECTIONIST_SECRET_KEY"],
    "backup": ["PROJECTIONIST_HOME", "PROJECTIONIST_SECRET_KEY", "PROJECTIONIST_BACKUP_PASSPHRASE"],
    "restore": ["PROJECTIONIST_HOME", "PROJECTIONIST_SECRET_KEY", "PROJECTIONIST_BACKUP_PASSPHRASE"],
}


def help_for(command: str) -> str | None:
    """The `environment:` section of a command's --help (None: the command reads none)."""
    names = BY_COMMAND.get(command)
    if not names:
        return None
    width = max(len(n.split(" ")[0]) for n in names) + 2
    lines = ["environment:"]
    for entry in names:
        name, _, note = entry.partition(" ")
        text = VARIABLES[name] + (f" {note}" if note else "")
        lines.append(f"  {name.ljust(width)}{text}")
    return "\n".join(lines)
