"""Starts Datasette over the live store, locked down: SQL off, downloads off, metadata-driven.

The lock-down does not rely on the metadata file alone: Datasette reads `allow_sql` from the
metadata before its `default_allow_sql` setting, so an edit could turn arbitrary SQL (which
ignores every table permission) back on. `datasette_command` refuses such metadata.
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

from .config import Config
from .store import SECRET_TABLES

DATABASE = "projectionist"  # Datasette names the database after the file's stem

LOCKED_SETTINGS = {
    "default_allow_sql": "off",
    "allow_download": "off",
    "allow_csv_stream": "off",
    "template_debug": "off",
    "trace_debug": "off",
    "sql_time_limit_ms": "3000",
}


class UnsafeMetadata(ValueError):
    pass


def metadata_problems(metadata: dict) -> list[str]:
    """What in a datasette_metadata.yml would expose a secret."""
    problems = []
    if metadata.get("allow_sql", False) is not False:
        problems.append("allow_sql must be false (arbitrary SQL bypasses table permissions)")
    for name, database in (metadata.get("databases") or {}).items():
        if (database or {}).get("allow_sql", False) is not False:
            problems.append(f"databases.{name}.allow_sql must be false")
    tables = ((metadata.get("databases") or {}).get(DATABASE) or {}).get("tables") or {}
    for table in SECRET_TABLES:
        if (tables.get(table) or {}).get("allow") is not False:
            problems.append(f"databases.{DATABASE}.tables.{table} holds secrets: it needs `allow: false`")
    return problems


def datasette_command(config: Config, port: int | None = None) -> list[str]:
    metadata_path = Path(config.datasette_metadata)
    problems = metadata_problems(yaml.safe_load(metadata_path.read_text()) or {})
    if problems:
        raise UnsafeMetadata(f"{metadata_path}: refusing to serve the dashboard:\n  " + "\n  ".join(problems))
    # Served mutable (not -i): immutable mode misreads a WAL file under a concurrent writer.
    cmd = [
        sys.executable, "-m", "datasette", "serve", str(config.db_path),
        "--metadata", str(metadata_path),
        "--host", config.host,
        "--port", str(config.dashboard_port if port is None else port),
    ]
    for name, value in LOCKED_SETTINGS.items():
        cmd += ["--setting", name, value]
    return cmd
