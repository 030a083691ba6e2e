"""Datasette's `serve`, in a process that logs like the others: `python -m projectionist.dashboard_server
serve DB ...` takes Datasette's own arguments (projectionist.dashboard.datasette_command builds them).
Its server (uvicorn) hands its records to the shared handlers: one format, redacted."""

from __future__ import annotations

import functools
import sys

import uvicorn

from .logs import setup_logging, uvicorn_log_config


def main(argv: list[str]) -> None:
    setup_logging("dashboard")
    uvicorn.run = functools.partial(uvicorn.run, log_config=uvicorn_log_config())  # datasette calls uvicorn.run
    from datasette.cli import cli
    from datasette.plugins import pm

    from . import dashboard_charts, dashboard_guard, dashboard_live, dashboard_session

    pm.register(dashboard_guard, name="projectionist-dashboard-guard")  # password guessing is throttled
    pm.register(dashboard_session, name="projectionist-dashboard-session")  # admins: Plex session or password
    pm.register(dashboard_charts, name="projectionist-dashboard-charts")  # the home's charts, SQL still off
    pm.register(dashboard_live, name="projectionist-dashboard-live")  # the home's "Playing now", refreshed

    cli.main(args=argv, prog_name="datasette")


if __name__ == "__main__":
    main(sys.argv[1:])
