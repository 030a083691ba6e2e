"""Scheduled jobs of the control plane: one APScheduler, a registry, leases, and the `job_runs` history.

Registering a job (any module of the control plane, at import time; control/app.py imports it):

    from control.jobs import JobContext, job

    @job("cache-warm", every=3600, timeout=600, summary="Warm the response cache")
    async def warm_cache(ctx: JobContext) -> int | None:
        ...           # ctx.app: the aiohttp app (ctx.app[VAULT], ctx.app[HTTP], ...)
        rows = await ctx.db(count_rows, "media_items")   # fn(conn, *args) on a connection of its own, in a thread
        return rows   # the number of items handled (job_runs.items), or None

`cron="30 3 * * *"` instead of `every=SECONDS` (server time zone, TZ); `every` may also be a function
of the app (to read a setting); `run_at_start=True` also runs the job once at start-up; `dry_run=True`
lets an admin start it with `?dry_run=true` (ctx.dry_run: say what it would do, change nothing). A job is an
async function; blocking work goes to a thread (`ctx.db`, `asyncio.to_thread`).

Operators override a job's schedule in rules.yaml (`jobs: {cache-warm: {every: 2h}}`, `cron`,
`timeout`, `enabled: false`). An edit is picked up within RULES_POLL seconds without a restart: the
changed jobs are rescheduled (added, removed) in the running scheduler, and the jobs see the new
rules from their next run; an invalid file keeps the schedules running and `GET /api/jobs` shows
its line-numbered errors (`rules_problem`). A job runs once at a time: a lease in Redis when
`PROJECTIONIST_REDIS_URL` or `proxy.redis_url` is set (several control planes), else in the
`job_locks` table of the shared SQLite file. Each run is a `job_runs` row (start, end, status
ok/failed/timeout/interrupted, items, redacted error). A run past its timeout is cancelled.
Admins see them at `GET /api/jobs` and start one with `POST /api/jobs/{name}/run`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import sqlite3
import time
import uuid
from collections.abc import Awaitable, Callable
from contextlib import closing
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from aiohttp import web
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger
from pydantic import BaseModel, ConfigDict, Field

from projectionist.redact import RedactSecrets
from projectionist.rules import RulesError, RulesFile, load_rules
from projectionist.shared_tier import redis_url
from projectionist.store import connect

from .errors import ApiError
from .keys import CONFIG, LIVE_RULES
from .metrics import count_job
from .openapi import ADMIN, Api, Call

log = logging.getLogger("control.jobs")

LEASE_MARGIN = 30.0  # a lease outlives its run's timeout by this much (a crashed holder frees it)
RULES_POLL = 2.0  # seconds between looks at rules.yaml (a stat, in a thread) for schedule changes

JobFunction = Callable[["JobContext"], Awaitable[int | None]]


@dataclass(frozen=True)
class Job:
    name: str
    run: JobFunction
    every: float | Callable[[web.Application], float] | None = None
    cron: str | None = None
    timeout: float = 300.0
    summary: str = ""
    run_at_start: bool = False
    dry_run: bool = False  # the job honours JobContext.dry_run


REGISTRY: dict[str, Job] = {}


def register(definition: Job) -> Job:
    if (definition.every is None) == (definition.cron is None):
        raise ValueError(f"job {definition.name!r}: give every or cron (one of them)")
    REGISTRY[definition.name] = definition
    return definition


def job(name: str, *, every: float | Callable[[web.Application], float] | None = None, cron: str | None = None,
        timeout: float = 300.0, summary: str = "", run_at_start: bool = False,
        dry_run: bool = False) -> Callable[[JobFunction], JobFunction]:
    """Decorator: register an async function as the job `name` (see the module docstring)."""
    def decorate(fn: JobFunction) -> JobFunction:
        register(Job(name, fn, every, cron, timeout, summary or (fn.__doc__ or "").strip().split("\n")[0],
                     run_at_start, dry_run))
        return fn
    return decorate


@dataclass
class JobContext:
    app: web.Application
    job: Job
    run_id: int
    rules: RulesFile | None  # rules.yaml as it was when the run started (None without a valid file)
    dry_run: bool = False  # POST /api/jobs/{name}/run?dry_run=true: a job that can, only says what it would do

    async def db(self, fn: Callable[..., Any], *args: Any) -> Any:
        """fn(conn, *args) on a store connection of its own, in a thread (never the request path's)."""
        return await asyncio.to_thread(_with_connection, self.app[CONFIG].db_path, fn, *args)


def _with_connection(db_path, fn: Callable[..., Any], *args: Any) -> Any:
    with closing(connect(db_path)) as conn:
        return fn(conn, *args)


# --- job_runs and leases (blocking: called through a thread) ------------------------------------

def start_run(conn: sqlite3.Connection, name: str, trigger: str, timeout: float) -> int:
    now = time.time()
    return conn.execute("INSERT INTO job_runs (job, trigger, started_at, deadline_at, status) VALUES (?, ?, ?, ?, ?)",
                        (name, trigger, now, now + timeout + LEASE_MARGIN, "running")).lastrowid


def finish_run(conn: sqlite3.Connection, run_id: int, status: str, items: int | None, error: str | None) -> None:
    conn.execute("UPDATE job_runs SET ended_at = ?, status = ?, items = ?, error = ? WHERE id = ?",
                 (time.time(), status, items, error, run_id))


def mark_interrupted(conn: sqlite3.Connection) -> int:
    """Runs still 'running' past their deadline died with their process."""
    return conn.execute("UPDATE job_runs SET status = 'interrupted', ended_at = deadline_at "
                        "WHERE status = 'running' AND deadline_at < ?", (time.time(),)).rowcount


def sqlite_acquire(conn: sqlite3.Connection, name: str, owner: str, ttl: float) -> bool:
    now = time.time()
    return conn.execute(
        "INSERT INTO job_locks (job, owner, expires_at) VALUES (?, ?, ?) ON CONFLICT (job) DO UPDATE SET "
        "owner = excluded.owner, expires_at = excluded.expires_at WHERE job_locks.expires_at < ?",
        (name, owner, now + ttl, now)).rowcount == 1


def sqlite_release(conn: sqlite3.Connection, name: str, owner: str) -> None:
    conn.execute("DELETE FROM job_locks WHERE job = ? AND owner = ?", (name, owner))


def recent_runs(conn: sqlite3.Connection, per_job: int = 5) -> list[tuple]:
    mark_interrupted(conn)
    return conn.execute(
        "SELECT id, job, trigger, started_at, ended_at, status, items, error FROM ("
        " SELECT *, row_number() OVER (PARTITION BY job ORDER BY started_at DESC, id DESC) AS n FROM job_runs)"
        " WHERE n <= ? ORDER BY job, started_at DESC, id DESC", (per_job,)).fetchall()


class Leases:
    """One run of a job at a time, across processes: Redis when configured, else SQLite."""

    def __init__(self, db_path, redis_url: str | None) -> None:
        self.db_path = db_path
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._redis = None
        self._held: dict[str, Any] = {}
        if redis_url:
            import redis.asyncio as aioredis
            self._redis = aioredis.from_url(redis_url)

    @property
    def kind(self) -> str:
        return "redis" if self._redis is not None else "sqlite"

    async def acquire(self, name: str, ttl: float) -> bool:
        if name in self._held:  # this process already runs it
            return False
        if self._redis is not None:
            lock = self._redis.lock(f"projectionist:job:{name}", timeout=ttl, blocking=False)
            if not await lock.acquire():
                return False
            self._held[name] = lock
            return True
        self._held[name] = None
        if await asyncio.to_thread(_with_connection, self.db_path, sqlite_acquire, name, self.owner, ttl):
            return True
        del self._held[name]
        return False

    async def release(self, name: str) -> None:
        lock = self._held.pop(name, None)
        try:
            if lock is not None:
                await lock.release()
            elif self._redis is None:
                await asyncio.to_thread(_with_connection, self.db_path, sqlite_release, name, self.owner)
        except Exception as exc:  # expired meanwhile (a run past its timeout): nothing left to free
            log.warning("releasing the lease of job %s failed: %s", name, type(exc).__name__)

    async def close(self) -> None:
        for name in list(self._held):
            await self.release(name)
        if self._redis is not None:
            await self._redis.aclose()


# --- the scheduler ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Schedule:
    every: float | None
    cron: str | None
    timeout: float
    enabled: bool

    def trigger(self):
        if self.cron:
            return CronTrigger.from_crontab(self.cron)
        return IntervalTrigger(seconds=self.every)

    def describe(self) -> str:
        return f"cron {self.cron}" if self.cron else f"every {self.every:g}s"


class JobScheduler:
    def __init__(self, app: web.Application, jobs: dict[str, Job], rules: RulesFile | None,
                 redis_url: str | None) -> None:
        self.app = app
        self.jobs = dict(jobs)
        self.rules = rules
        self.leases = Leases(app[CONFIG].db_path, redis_url)
        self.scheduler: AsyncIOScheduler | None = None
        self._tasks: dict[str, asyncio.Task] = {}
        self.listeners: list[Callable[[str, str, float], None]] = []  # (job, status, seconds): metrics
        self.rules_source: object = None  # the LiveRules load `rules` came from (a new one: reload)

    def schedule(self, name: str) -> Schedule:
        definition = self.jobs[name]
        override = self.rules.jobs.get(name) if self.rules else None
        every = definition.every(self.app) if callable(definition.every) else definition.every
        cron = definition.cron
        if override is not None and (override.every or override.cron):
            every, cron = override.every, override.cron
        timeout = override.timeout if override is not None and override.timeout else definition.timeout
        return Schedule(every, cron, timeout, override.enabled if override is not None else True)

    async def start(self) -> None:
        await asyncio.to_thread(_with_connection, self.app[CONFIG].db_path, mark_interrupted)
        self.scheduler = AsyncIOScheduler()
        for name, definition in self.jobs.items():
            schedule = self.schedule(name)
            if not schedule.enabled:
                log.info("job %s is disabled by rules.yaml", name)
                continue
            self._add(name, schedule, at_start=definition.run_at_start)
        self.scheduler.start()
        log.info("scheduler started", extra={"fields": {"jobs": sorted(self.jobs), "leases": self.leases.kind}})

    def _add(self, name: str, schedule: Schedule, at_start: bool = False) -> None:
        extra = {"next_run_time": datetime.now(UTC)} if at_start else {}
        # coalesce + max_instances 1: a late or overlapping firing runs once, not in a burst.
        self.scheduler.add_job(self._fire, schedule.trigger(), args=[name], id=name, name=name, coalesce=True,
                               max_instances=1, misfire_grace_time=max(60, int(schedule.timeout)), **extra)

    def unknown_jobs(self) -> list[str]:
        names = sorted(set(self.rules.jobs) - set(self.jobs)) if self.rules else []
        return [f"jobs.{name}: no such job (the jobs are {', '.join(sorted(self.jobs))})" for name in names]

    def reload(self, rules: RulesFile | None) -> list[str]:
        """Apply edited rules to the running scheduler; the names of the jobs whose schedule changed.
        A run under way keeps its timeout; the next one gets the new one."""
        before = {name: self.schedule(name) for name in self.jobs}
        self.rules = rules
        changed = []
        for name in self.jobs:
            old, new = before[name], self.schedule(name)
            if new == old:
                continue
            changed.append(name)
            present = self.scheduler.get_job(name) if self.scheduler else None
            if not new.enabled:
                if present:
                    self.scheduler.remove_job(name)
            elif present is None:
                self._add(name, new)
            elif (new.every, new.cron) != (old.every, old.cron):
                self.scheduler.reschedule_job(name, trigger=new.trigger())
                self.scheduler.modify_job(name, misfire_grace_time=max(60, int(new.timeout)))
            else:
                self.scheduler.modify_job(name, misfire_grace_time=max(60, int(new.timeout)))
        for warning in self.unknown_jobs():
            log.warning("rules.yaml: %s", warning)
        if changed:
            log.info("job schedules reloaded from rules.yaml", extra={"fields": {
                "changed": {name: self.schedule(name).describe() if self.schedule(name).enabled else "disabled"
                            for name in changed}}})
        return changed

    async def close(self) -> None:
        if self.scheduler is not None and self.scheduler.running:
            self.scheduler.shutdown(wait=False)
        for task in list(self._tasks.values()):
            task.cancel()
        for task in list(self._tasks.values()):
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass
        await self.leases.close()

    def next_run(self, name: str) -> datetime | None:
        found = self.scheduler.get_job(name) if self.scheduler else None
        return found.next_run_time if found else None

    def running(self, name: str) -> bool:
        task = self._tasks.get(name)
        return task is not None and not task.done()

    async def _fire(self, name: str) -> None:
        """What APScheduler calls. Stopping the control plane cancels a run: recorded, not an error."""
        try:
            await self.run(name)
        except asyncio.CancelledError:
            pass

    async def run(self, name: str, trigger: str = "schedule") -> tuple[str, int | None] | None:
        """Run the job now and wait for it: (status, items), or None when a run already holds its lease."""
        started = await self.start_run(name, trigger)
        if started is None:
            return None
        return await self._tasks[name]

    async def start_run(self, name: str, trigger: str, dry_run: bool = False) -> int | None:
        """Take the lease, record the run and start it; its id, or None when already running."""
        schedule = self.schedule(name)
        if not await self.leases.acquire(name, schedule.timeout + LEASE_MARGIN):
            log.debug("job %s is already running; this firing is skipped", name)
            return None
        try:
            run_id = await asyncio.to_thread(_with_connection, self.app[CONFIG].db_path, start_run, name, trigger,
                                             schedule.timeout)
        except BaseException:
            await self.leases.release(name)
            raise
        context = JobContext(self.app, self.jobs[name], run_id, self.rules, dry_run)
        self._tasks[name] = asyncio.create_task(self._execute(context, schedule.timeout), name=f"job-{name}")
        return run_id

    async def _execute(self, ctx: JobContext, timeout: float) -> tuple[str, int | None]:
        name = ctx.job.name
        started = time.perf_counter()
        status, items, error = "ok", None, None
        try:
            items = await asyncio.wait_for(ctx.job.run(ctx), timeout)
        except TimeoutError:
            status, error = "timeout", f"did not finish within {timeout:g}s"
        except asyncio.CancelledError:
            status, error = "interrupted", "the control plane stopped"
            raise
        except Exception as exc:
            status, error = "failed", RedactSecrets.redact(f"{type(exc).__name__}: {exc}")[:500]
            log.exception("job %s failed", name)
        finally:
            elapsed = time.perf_counter() - started
            try:
                await asyncio.shield(asyncio.to_thread(_with_connection, self.app[CONFIG].db_path, finish_run,
                                                       ctx.run_id, status, items, error))
            except Exception:
                log.exception("recording the end of job %s failed", name)
            await self.leases.release(name)
            for listener in self.listeners:
                listener(name, status, elapsed)
            log.info("job finished", extra={"fields": {"job": name, "status": status, "items": items,
                                                       "seconds": round(elapsed, 3), "error": error}})
        return status, items


JOBS = web.AppKey("jobs", JobScheduler)


def read_rules(app: web.Application) -> RulesFile | None:
    """rules.yaml's model, for the `jobs:` and `retention:` sections; defaults when it cannot be read."""
    path = app[CONFIG].rules_path
    if not path.exists():
        return None
    try:
        return load_rules(path).model
    except RulesError as exc:
        log.error("rules.yaml is invalid, jobs use their defaults: %s", exc)
        return None


async def follow_rules(app: web.Application) -> str | None:
    """Look at rules.yaml now; apply an edit to the scheduler. LiveRules keeps the last valid rules
    on a bad edit, so a bad edit changes nothing here; its line-numbered errors are returned."""
    live, scheduler = app.get(LIVE_RULES), app[JOBS]
    if live is None:
        return None
    current = await live.get()
    if current is not None and current is not scheduler.rules_source:
        scheduler.rules_source = current
        scheduler.reload(current.model)
    return live.problem


async def watch_rules(app: web.Application) -> None:
    while True:
        await asyncio.sleep(RULES_POLL)
        try:
            await follow_rules(app)
        except Exception:  # a watcher that dies would silently freeze the schedules
            log.exception("applying the edited job schedules failed; keeping the running ones")


async def scheduler_context(app: web.Application):
    """Cleanup context: the scheduler runs while the app does, and follows rules.yaml edits."""
    live = app.get(LIVE_RULES)
    if live is not None:
        current = await live.get()
        rules = current.model if current is not None else None
        if current is None and live.problem and app[CONFIG].rules_path.exists():
            log.error("rules.yaml cannot be used, jobs use their defaults: %s", live.problem)
    else:
        current, rules = None, read_rules(app)
    scheduler = app[JOBS] = JobScheduler(app, REGISTRY, rules, redis_url(rules.proxy.redis_url if rules else None))
    scheduler.rules_source = current
    scheduler.listeners.append(count_job)  # job runs and durations, by status, for /metrics
    await scheduler.start()
    watcher = asyncio.create_task(watch_rules(app), name="jobs-rules-watch") if live else None
    yield
    if watcher is not None:
        watcher.cancel()
        try:
            await watcher
        except asyncio.CancelledError:
            pass
    await scheduler.close()


# --- API ----------------------------------------------------------------------------------------

class JobRun(BaseModel):
    id: int
    job: str
    trigger: str = Field(description="schedule | manual")
    started_at: datetime
    ended_at: datetime | None = None
    status: str = Field(description="running | ok | failed | timeout | interrupted")
    items: int | None = None
    error: str | None = None


class JobInfo(BaseModel):
    name: str
    summary: str
    schedule: str
    timeout_seconds: float
    enabled: bool
    running: bool
    next_run_at: datetime | None = None
    last_run: JobRun | None = None
    recent_runs: list[JobRun] = []


class JobList(BaseModel):
    leases: str = Field(description="where single-instance leases live: redis | sqlite")
    rules_problem: str | None = Field(default=None, description=(
        "Why the last edit of rules.yaml was not applied (line-numbered); the schedules shown are the ones "
        "still running"))
    rules_warnings: list[str] = Field(default=[], description="`jobs:` entries that name no job (a typo?)")
    jobs: list[JobInfo]


class JobName(BaseModel):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", max_length=64)


class RunOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dry_run: bool = Field(default=False, description=(
        "Only say what the run would change, for the jobs that can (`watchlist-sync`: its events are logged with "
        "dry_run = 1); others refuse it with 400"))


def _run_model(row: tuple) -> JobRun:
    stamp = lambda v: datetime.fromtimestamp(v, UTC) if v is not None else None  # noqa: E731
    return JobRun(id=row[0], job=row[1], trigger=row[2], started_at=stamp(row[3]), ended_at=stamp(row[4]),
                  status=row[5], items=row[6], error=row[7])


api = Api("jobs")


@api.get("/api/jobs", summary="Scheduled jobs: schedule, next and recent runs", access=ADMIN, response=JobList)
async def list_jobs(request: web.Request, call: Call) -> JobList:
    scheduler = request.app[JOBS]
    live, problem = request.app.get(LIVE_RULES), None
    if live is not None:  # a look of its own for the file's errors; edits are applied by the watcher
        await live.get()
        problem = live.problem
    runs: dict[str, list[JobRun]] = {}
    for row in await asyncio.to_thread(_with_connection, request.app[CONFIG].db_path, recent_runs):
        runs.setdefault(row[1], []).append(_run_model(row))
    jobs = []
    for name in sorted(scheduler.jobs):
        schedule = scheduler.schedule(name)
        mine = runs.get(name, [])
        jobs.append(JobInfo(name=name, summary=scheduler.jobs[name].summary, schedule=schedule.describe(),
                            timeout_seconds=schedule.timeout, enabled=schedule.enabled,
                            running=scheduler.running(name), next_run_at=scheduler.next_run(name),
                            last_run=mine[0] if mine else None, recent_runs=mine))
    return JobList(leases=scheduler.leases.kind, rules_problem=problem, rules_warnings=scheduler.unknown_jobs(),
                   jobs=jobs)


@api.post("/api/jobs/{name}/run", summary="Run a job now", access=ADMIN, path_params=JobName, query=RunOptions,
          response=JobRun, status=202, responses={404: "No such job", 409: "The job is running already"})
async def run_job(request: web.Request, call: Call) -> JobRun:
    """Starts the job at once (even a disabled one) and answers with its run; follow it at GET /api/jobs."""
    scheduler = request.app[JOBS]
    name = call.path.name
    if name not in scheduler.jobs:
        raise ApiError(404, "job_not_found", f"no job named {name!r}")
    dry_run = call.query.dry_run
    if dry_run and not scheduler.jobs[name].dry_run:
        raise ApiError(400, "dry_run_unsupported", f"job {name!r} has no dry run")
    run_id = await scheduler.start_run(name, "manual", dry_run)
    if run_id is None:
        raise ApiError(409, "job_running", f"job {name!r} is running already")
    return JobRun(id=run_id, job=name, trigger="manual", started_at=datetime.now(UTC), status="running")
