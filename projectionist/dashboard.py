"""Starts Datasette over the live store, locked down: SQL off, downloads off, metadata-driven."""

from __future__ import annotations

import sys

from .config import Config

# Settings that keep secrets unreachable however datasette_metadata.yml is edited: arbitrary SQL
# would bypass every table permission, and the download would hand out the whole file.
LOCKED_SETTINGS = {
    "default_allow_sql": "off",
    "allow_download": "off",
    "allow_csv_stream": "off",
    "template_debug": "off",
    "trace_debug": "off",
    "sql_time_limit_ms": "3000",
}


def datasette_command(config: Config, port: int | None = None) -> list[str]:
    # Served mutable (not -i): immutable mode misreads a WAL file under a concurrent writer.
    cmd = [
        sys.executable, "-m", "datasette", "serve", str(config.db_path),
        "--metadata", str(config.datasette_metadata),
        "--host", config.host,
        "--port", str(config.dashboard_port if port is None else port),
    ]
    for name, value in LOCKED_SETTINGS.items():
        cmd += ["--setting", name, value]
    return cmd
