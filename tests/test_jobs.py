"""The job scheduler (control/jobs.py) and the housekeeping jobs (control/maintenance.py), through
the real control plane (its own thread and home), its SQLite file, the fakes, and for the caches'
expiry sweep the real embedded proxy on the same home."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from datetime import UTC, datetime, timedelta

import pytest
import requests
from support import FAKE_TO_RULES, free_port, wait_for, write_test_rules
from test_control_schemathesis import ControlThread

from control import jobs
from control.jobs import JOBS, Job
from fake_upstreams.data import PLEX_ACCOUNT_TOKEN, PLEX_ACCOUNT_TOKEN_2
from projectionist.redact import RedactSecrets
from projectionist.store import connect

SECRET = "sk-live-job-secret-0123456789"


async def _slow(ctx) -> int:
    await asyncio.sleep(30)  # longer than its timeout in the tests
    return 1


async def _failing(ctx) -> int:
    raise RuntimeError(f"upstream refused token={SECRET} for {SECRET}")


@pytest.fixture
def test_jobs():
    """Two jobs of the tests' own in the registry, for the time of a test."""
    added = [jobs.register(Job("test-slow", _slow, every=3600, timeout=30)),
             jobs.register(Job("test-failing", _failing, every=3600, timeout=30))]
    RedactSecrets.register(SECRET)
    yield
    for definition in added:
        jobs.REGISTRY.pop(definition.name, None)


def rules_with_jobs(home, section: dict, retention: dict | None = None) -> None:
    def edit(rules: dict) -> None:
        rules["jobs"] = section
        if retention:
            rules["retention"] = retention
    home.mkdir(parents=True, exist_ok=True)
    write_test_rules(home / "rules.yaml", free_port(), edit)


def control_plane(home, fakes) -> ControlThread:
    """The control plane on `home`, talking to the fakes."""
    return ControlThread(home, overrides=tuple(f"{FAKE_TO_RULES[name]}={url}" for name, url in fakes.urls.items()
                                               if name in FAKE_TO_RULES))


class Admin:
    def __init__(self, control: ControlThread, fakes, token: str = PLEX_ACCOUNT_TOKEN) -> None:
        self.url = control.url
        self.session = requests.Session()
        self.session.trust_env = False
        pin = self.session.post(self.url + "/api/auth/plex", timeout=10).json()["pin_id"]
        fakes.plextv.link_pin(pin, account_token=token)
        assert self.session.get(f"{self.url}/api/auth/plex/{pin}", timeout=10).json()["status"] == "complete"
        self.csrf = self.session.get(self.url + "/api/auth/session", timeout=10).json()["csrf_token"]

    def get(self, path: str) -> requests.Response:
        return self.session.get(self.url + path, timeout=10)

    def post(self, path: str, csrf: bool = True) -> requests.Response:
        headers = {"X-CSRF-Token": self.csrf} if csrf else {}
        return self.session.post(self.url + path, headers=headers, timeout=10)

    def jobs(self) -> dict[str, dict]:
        r = self.get("/api/jobs")
        assert r.status_code == 200, r.text
        return {j["name"]: j for j in r.json()["jobs"]}

    def run(self, name: str, timeout: float = 30) -> dict:
        wait_for(lambda: not self.jobs()[name]["running"], timeout, what=f"an earlier run of {name} to end")
        r = self.post(f"/api/jobs/{name}/run")
        assert r.status_code == 202, r.text
        run_id = r.json()["id"]

        def finished():
            last = self.jobs()[name]["last_run"]
            return last if last and last["id"] == run_id and last["status"] != "running" else None
        return wait_for(finished, timeout, what=f"job {name} to finish")


def test_jobs_are_listed_with_their_schedules_and_rules_overrides(tmp_path, fakes, test_jobs):
    rules_with_jobs(tmp_path, {"retention": {"cron": "30 3 * * *", "timeout": "20m"},
                               "trakt-refresh": {"every": "2h"}, "test-failing": {"enabled": False}})
    with control_plane(tmp_path, fakes) as control:
        assert requests.get(control.url + "/api/jobs", timeout=10).status_code == 401
        admin = Admin(control, fakes)
        listing = admin.jobs()
        assert {"retention", "trakt-refresh", "cache-cleanup", "test-slow"} <= set(listing)
        assert listing["retention"]["schedule"] == "cron 30 3 * * *"
        assert listing["retention"]["timeout_seconds"] == 1200
        assert listing["trakt-refresh"]["schedule"] == "every 7200s"
        assert listing["cache-cleanup"]["schedule"] == "every 600s"  # images.cleanup_interval
        assert listing["test-failing"]["enabled"] is False and listing["test-failing"]["next_run_at"] is None
        assert listing["test-slow"]["next_run_at"] is not None
        # retention and trakt-refresh also ran at start-up
        runs = wait_for(lambda: (j := admin.jobs())["retention"]["last_run"] and j["trakt-refresh"]["last_run"] and j,
                        20, what="the start-up runs")
        assert runs["retention"]["last_run"]["trigger"] == "schedule"
        assert runs["retention"]["last_run"]["status"] == "ok"

        # admins only, and with the CSRF token
        other = Admin(control, fakes, PLEX_ACCOUNT_TOKEN_2)
        assert other.get("/api/jobs").status_code == 403
        assert other.post("/api/jobs/retention/run").status_code == 403
        assert admin.post("/api/jobs/retention/run", csrf=False).status_code == 403
        assert admin.post("/api/jobs/no-such-job/run").status_code == 404


def test_manual_runs_are_single_instance_time_out_and_record_redacted_errors(tmp_path, fakes, test_jobs):
    rules_with_jobs(tmp_path, {"test-slow": {"timeout": 2}})
    with control_plane(tmp_path, fakes) as control:
        admin = Admin(control, fakes)
        first = admin.post("/api/jobs/test-slow/run")
        assert first.status_code == 202 and first.json()["status"] == "running"
        second = admin.post("/api/jobs/test-slow/run")
        assert second.status_code == 409 and second.json()["error"] == "job_running"
        assert admin.jobs()["test-slow"]["running"] is True
        slow = wait_for(lambda: (r := admin.jobs()["test-slow"]["last_run"])["status"] != "running" and r, 20,
                        what="the slow job's timeout")
        assert slow["status"] == "timeout" and slow["trigger"] == "manual" and slow["ended_at"]
        # the lease is free again
        assert admin.post("/api/jobs/test-slow/run").status_code == 202

        failed = admin.run("test-failing")
        assert failed["status"] == "failed" and "RuntimeError" in failed["error"]
        assert SECRET not in failed["error"] and SECRET not in admin.get("/api/jobs").text
    conn = connect(tmp_path / "projectionist.db")
    stored = conn.execute("SELECT group_concat(error, ' ') FROM job_runs").fetchone()[0]
    assert SECRET not in stored
    # the run cut off by the stop is not left "running"
    assert conn.execute("SELECT count(*) FROM job_runs WHERE status = 'running'").fetchone()[0] == 0
    conn.close()


def test_the_lease_keeps_a_job_to_one_run_across_control_planes(tmp_path, fakes, test_jobs):
    with control_plane(tmp_path, fakes) as one, control_plane(tmp_path, fakes) as two:
        def start(control, name="test-slow"):
            return asyncio.run_coroutine_threadsafe(control.runner.app[JOBS].start_run(name, "manual"), control.loop).result(10)

        assert start(one) is not None
        assert start(two) is None  # held by the other process's scheduler (SQLite lease)
        assert start(two, "test-failing") is not None  # other jobs are not held


def test_the_lease_lives_in_redis_when_configured(tmp_path, fakes, test_jobs, monkeypatch):
    from _stack import RedisServer

    with RedisServer() as redis_server:
        monkeypatch.setenv("PROJECTIONIST_REDIS_URL", redis_server.url)
        with control_plane(tmp_path / "a", fakes) as one, control_plane(tmp_path / "b", fakes) as two:
            # two homes (two SQLite files): only Redis can keep them apart
            assert Admin(one, fakes).get("/api/jobs").json()["leases"] == "redis"

            def start(control):
                return asyncio.run_coroutine_threadsafe(control.runner.app[JOBS].start_run("test-slow", "manual"),
                                                        control.loop).result(10)
            assert start(one) is not None
            assert start(two) is None


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="seconds")


def test_retention_deletes_old_rows_and_keeps_the_rollups(tmp_path, fakes):
    rules_with_jobs(tmp_path, {"retention": {"every": "1d"}},
                    retention={"usage_events": "2d", "rate_limit_events": "1d", "sessions": "1d"})
    with control_plane(tmp_path, fakes) as control:
        admin = Admin(control, fakes)
        # The start-up pass must be over before the rows go in, or it deletes some of them first
        wait_for(lambda: (run := admin.jobs()["retention"]["last_run"]) and run["status"] != "running", 30,
                 what="the start-up retention run to end")
        conn = sqlite3.connect(tmp_path / "projectionist.db", timeout=10, isolation_level=None)
        now = time.time()
        user_id = conn.execute("SELECT min(id) FROM users").fetchone()[0]
        for age_days in (0.5, 1.5, 3, 10):
            conn.execute("INSERT INTO usage_events (ts, listener, upstream, route, method, status) "
                         "VALUES (?, 'regular', 'tmdb', 'tmdb.movie', 'GET', 200)", (now - age_days * 86400,))
            conn.execute("INSERT INTO rate_limit_events (ts, rule, outcome) VALUES (?, 'client', 'queued')",
                         (now - age_days * 86400,))
        conn.execute("INSERT INTO usage_hourly (hour, upstream, route, requests) VALUES ('2020-01-01T00:00', 'tmdb', "
                     "'tmdb.movie', 7)")
        old = datetime.now(UTC) - timedelta(days=3)
        conn.execute("INSERT INTO sessions (id_hash, user_id, created_at, expires_at) VALUES ('old', ?, ?, ?)",
                     (user_id, _iso(old), _iso(old)))
        conn.execute("INSERT INTO auth_flows (kind, external_id, created_at, expires_at) VALUES ('plex-pin', 'x', ?, ?)",
                     (_iso(old), _iso(old)))
        rollup_before = conn.execute("SELECT sum(events) FROM rate_limit_hourly").fetchone()[0]

        run = admin.run("retention")
        assert run["status"] == "ok" and run["items"] >= 2 + 3 + 1 + 1
        ages = sorted(round((now - ts) / 86400, 1) for (ts,) in conn.execute("SELECT ts FROM usage_events"))
        assert ages == [0.5, 1.5]
        assert conn.execute("SELECT count(*) FROM rate_limit_events").fetchone()[0] == 1
        assert conn.execute("SELECT requests FROM usage_hourly WHERE hour = '2020-01-01T00:00'").fetchone()[0] == 7
        assert conn.execute("SELECT sum(events) FROM rate_limit_hourly").fetchone()[0] == rollup_before
        assert conn.execute("SELECT count(*) FROM sessions WHERE id_hash = 'old'").fetchone()[0] == 0
        assert conn.execute("SELECT count(*) FROM auth_flows WHERE external_id = 'x'").fetchone()[0] == 0
        # the admin's own live session survives
        assert admin.get("/api/jobs").status_code == 200
        conn.close()


def test_database_size_stays_bounded_under_constant_traffic(tmp_path):
    """Ten simulated days of constant traffic, the retention pass once a day: the file stops growing."""
    from control.maintenance import prune
    from projectionist.rules import RetentionSettings
    from projectionist.store import UsageEvent, UsageWriter, open_db

    db_path = tmp_path / "projectionist.db"
    open_db(db_path).conn.close()
    keep = RetentionSettings(usage_events=2 * 86400, rate_limit_events=2 * 86400)
    start = time.time() - 10 * 86400
    per_day, sizes, raw = 6000, [], []
    conn = connect(db_path)
    for day in range(10):
        writer = UsageWriter(db_path).start()
        for i in range(per_day):
            ts = start + day * 86400 + i * (86400 / per_day)
            writer.record(UsageEvent(ts=ts, listener="regular", upstream="tmdb", route=f"tmdb.r{i % 20}",
                                     method="GET", status=200, latency_ms=12.0, bytes_out=900, cache="hit"))
        writer.close()  # written, rollups too
        conn.execute("INSERT INTO rate_limit_events (ts, rule, outcome) SELECT ?, 'client', 'queued' "
                     "FROM (SELECT 1 FROM usage_events LIMIT 500)", (start + day * 86400,))
        prune(conn, keep, now=start + (day + 1) * 86400)
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        sizes.append(db_path.stat().st_size)
        raw.append(_table_bytes(conn, ("usage_events", "rate_limit_events")))
    conn.close()
    print("database bytes per simulated day:", sizes)
    print("raw usage tables (bytes, dbstat):", raw)
    # The raw tables plateau once the retention window is full; the file grows only by the kept
    # hourly rollups (20 routes x 24 hours a day), a small fraction of the raw rows a day brings.
    assert max(raw[3:]) <= raw[3] * 1.1, raw
    daily_growth_then = (sizes[-1] - sizes[3]) / 6
    assert daily_growth_then < 0.2 * (sizes[1] - sizes[0]), sizes


def _table_bytes(conn: sqlite3.Connection, tables: tuple[str, ...]) -> int:
    """Bytes of pages the tables and their indexes use."""
    names = [r[0] for r in conn.execute(
        f"SELECT name FROM sqlite_master WHERE tbl_name IN ({', '.join('?' for _ in tables)})", tables)]
    return conn.execute(f"SELECT sum(pgsize) FROM dbstat WHERE name IN ({', '.join('?' for _ in names)})",
                        names).fetchone()[0]


async def test_cache_cleanup_job_has_the_proxy_drop_expired_entries(tmp_path):
    """The job queues an "expired" sweep; the real proxy drops expired API and image entries."""
    from test_images_proxy import eventually, image_proxy

    def short_lived(rules: dict) -> None:
        for r in rules["routes"]:
            if r["name"] == "plex.image":
                r["image"] = {"ttl": 0.5}
            if r["name"] == "plex.sections":
                r["cache"] = {"ttl": 0.5, "scope": "user"}

    async with image_proxy(tmp_path, short_lived) as env:
        assert (await env.plex("/library/metadata/1001/thumb/1"))[0] == 200
        assert (await env.plex("/library/sections", accept="application/json"))[0] == 200
        assert (await env.tmdb("/t/p/w185/cleanup-keeps-me.jpg"))[0] == 200
        conn = env.db()
        await eventually(lambda: conn.execute("SELECT count(*) FROM cache_entries").fetchone()[0] == 3,
                         "three mirrored cache entries")
        await asyncio.sleep(0.8)
        with control_plane(tmp_path, env.fakes) as control:
            future = asyncio.run_coroutine_threadsafe(control.runner.app[JOBS].run("cache-cleanup", "manual"), control.loop)
            status, items = await asyncio.wait_for(asyncio.wrap_future(future), 60)
        assert (status, items) == ("ok", 2)
        await eventually(lambda: {r for (r,) in conn.execute("SELECT route FROM cache_entries")} == {"tmdb.image"},
                         "the mirror to keep only the live entry")
        row = conn.execute("SELECT status, items FROM job_runs WHERE job = 'cache-cleanup'").fetchone()
        assert row == ("ok", 2)
        conn.close()


def test_rules_jobs_section_errors_carry_line_numbers():
    from projectionist.rules import RulesError, parse_rules

    text = ("version: 1\n"
            "upstreams:\n"
            "  tmdb: {kind: tmdb, hosts: [api.themoviedb.org]}\n"
            "jobs:\n"
            "  retention:\n"
            "    cron: '61 * * * *'\n"
            "  x: {every: 1h, cron: '* * * * *'}\n"
            "retention:\n"
            "  usage_events: 7 days\n")
    with pytest.raises(RulesError) as caught:
        parse_rules(text)
    found = {(p.line, ".".join(map(str, p.loc))): p.message for p in caught.value.problems}
    assert "not a crontab expression" in found[(6, "jobs.retention.cron")]
    assert "give either every or cron, not both" in found[(7, "jobs.x")]
    assert "not a duration" in found[(9, "retention.usage_events")]
    assert parse_rules(text.replace("61", "15").replace(", cron: '* * * * *'", "").replace("7 days", "7d")
                       ).model.retention.usage_events == 7 * 86400
