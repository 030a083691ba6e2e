"""Job schedules follow rules.yaml edits without a restart, through the real stack (`projectionist
run`): the running scheduler is rescheduled (GET /api/jobs shows it), a job disabled there stops
being scheduled, and a bad edit is a line-numbered error that keeps the running schedules."""

from __future__ import annotations

import os
import re
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

import pytest
import yaml
from support import wait_for
from test_jobs import Admin

pytestmark = pytest.mark.e2e


def write(path, text: str) -> None:
    tmp = path.with_suffix(".edit")
    tmp.write_text(text)
    os.replace(tmp, path)  # one atomic change, as an editor's save would be


def test_job_schedules_reload_from_rules_yaml(stack, clean_fakes):
    admin = Admin(SimpleNamespace(url=stack.control_url), clean_fakes)
    original = stack.rules_path.read_text()
    before = admin.jobs()
    assert before["library-sync"]["schedule"] == "every 21600s" and before["weekly-report"]["enabled"]
    try:
        rules = yaml.safe_load(original)
        rules["jobs"] = {"library-sync": {"every": "45m", "timeout": "10m"}, "weekly-report": {"enabled": False},
                         "retention": {"cron": "15 2 * * *"}, "libary-sync": {"every": "1h"}}
        write(stack.rules_path, yaml.safe_dump(rules, sort_keys=False))
        edited = wait_for(lambda: (j := admin.jobs())["library-sync"]["schedule"] == "every 2700s" and j, 10,
                          what="the edited schedule in GET /api/jobs")
        sync = edited["library-sync"]
        assert sync["timeout_seconds"] == 600
        next_run = datetime.fromisoformat(sync["next_run_at"])
        assert timedelta(minutes=44) < next_run - datetime.now(UTC) <= timedelta(minutes=45)  # rescheduled now
        assert edited["weekly-report"]["enabled"] is False and edited["weekly-report"]["next_run_at"] is None
        assert edited["retention"]["schedule"] == "cron 15 2 * * *"
        assert datetime.fromisoformat(edited["retention"]["next_run_at"]).astimezone().strftime("%H:%M") == "02:15"
        assert edited["trakt-refresh"]["next_run_at"] == before["trakt-refresh"]["next_run_at"]  # untouched
        warnings = admin.get("/api/jobs").json()["rules_warnings"]  # a typo is said, not silently ignored
        assert len(warnings) == 1 and warnings[0].startswith("jobs.libary-sync: no such job"), warnings

        # a bad edit: line-numbered errors, the running schedules stay
        bad = yaml.safe_dump(rules, sort_keys=False).replace("every: 45m", "every: 45m\n    cron: 61 * * * *")
        write(stack.rules_path, bad)
        line = next(n for n, text in enumerate(bad.splitlines(), 1) if "61 * * * *" in text)
        problem = wait_for(lambda: admin.get("/api/jobs").json()["rules_problem"], 10, what="the rules problem")
        assert re.search(rf":{line}:\d+: jobs\.library-sync", problem), problem
        still = admin.jobs()
        assert still["library-sync"]["schedule"] == "every 2700s"
        assert still["library-sync"]["next_run_at"] == sync["next_run_at"]

        # fixed: back to the defaults, and the problem is gone
        write(stack.rules_path, original)
        back = wait_for(lambda: (j := admin.jobs())["library-sync"]["schedule"] == "every 21600s" and j, 10,
                        what="the default schedule again")
        assert back["weekly-report"]["enabled"] and back["weekly-report"]["next_run_at"] is not None
        listing = admin.get("/api/jobs").json()
        assert listing["rules_problem"] is None and listing["rules_warnings"] == []
    finally:
        write(stack.rules_path, original)
