"""Housekeeping jobs (control/jobs.py): retention of raw rows, and the caches' expiry sweep.

retention      hourly and at start-up: expired/revoked sessions, sign-in flows past their expiry,
               usage_events and rate_limit_events older than rules.yaml `retention:` (their hourly
               rollups stay), old job runs and applied cache flush requests. Deletes go in small
               batches so the proxy's usage writer is never locked out for long; freed pages are
               reused, so the file stops growing under constant traffic (measured by
               tests/test_jobs.py::test_database_size_stays_bounded_under_constant_traffic).
backup         daily at 04:15: a backup archive in <home>/backups/ (projectionist/backup.py), the
               newest `retention.backups` kept; with PROJECTIONIST_BACKUP_PASSPHRASE it carries the
               vault key and the proxy's CA, wrapped. items: bytes written.
cache-cleanup  every `images.cleanup_interval` (10 min): asks the proxy, which owns both caches,
               to drop the response and image cache entries past their last usable moment, through
               the `cache_flush_requests` channel (target "expired"), and waits for its answer.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
from datetime import UTC, datetime

from projectionist.backup import PASSPHRASE_ENV, backup, prune_backups
from projectionist.redact import RedactSecrets
from projectionist.rules import RetentionSettings
from projectionist.store import utcnow_iso

from .jobs import JOBS, JobContext, job
from .keys import CONFIG, VAULT
from .sessions import purge_expired

BATCH = 2000  # rows per DELETE transaction
RedactSecrets.register(os.environ.get(PASSPHRASE_ENV))


def _iso(moment: float) -> str:
    return datetime.fromtimestamp(moment, UTC).isoformat(timespec="seconds")


def delete_in_batches(conn: sqlite3.Connection, table: str, where: str, args: tuple) -> int:
    total = 0
    while True:
        deleted = conn.execute(f"DELETE FROM {table} WHERE rowid IN (SELECT rowid FROM {table} WHERE {where} "
                               f"LIMIT {BATCH})", args).rowcount
        total += deleted
        if deleted < BATCH:
            return total


def prune(conn: sqlite3.Connection, keep: RetentionSettings, now: float | None = None) -> dict[str, int]:
    """Delete the raw rows past their retention; returns rows deleted per table."""
    now = time.time() if now is None else now
    out = {
        "usage_events": delete_in_batches(conn, "usage_events", "ts < ?", (now - keep.usage_events,)),
        "rate_limit_events": delete_in_batches(conn, "rate_limit_events", "ts < ?", (now - keep.rate_limit_events,)),
        "auth_flows": delete_in_batches(conn, "auth_flows", "expires_at < ?", (_iso(now - keep.auth_flows),)),
        "job_runs": delete_in_batches(conn, "job_runs", "started_at < ? AND status != 'running'",
                                      (now - keep.job_runs,)),
        "cache_flush_requests": delete_in_batches(conn, "cache_flush_requests", "applied_at < ?",
                                                  (_iso(now - keep.cache_flush_requests),)),
    }
    conn.execute("PRAGMA optimize")
    return out


@job("retention", every=3600, timeout=900, run_at_start=True,
     summary="Delete expired sessions and sign-in flows, and raw usage rows past their retention")
async def retention(ctx: JobContext) -> int:
    keep = ctx.rules.retention if ctx.rules else RetentionSettings()
    sessions = await ctx.app[VAULT].run(purge_expired, keep.sessions / 86400)
    deleted = await ctx.db(prune, keep)
    return sessions + sum(deleted.values())


# --- scheduled backups --------------------------------------------------------------------------

@job("backup", cron="15 4 * * *", timeout=1800,
     summary="Back up the database (and, with PROJECTIONIST_BACKUP_PASSPHRASE, the vault key) to backups/")
async def scheduled_backup(ctx: JobContext) -> int:
    config = ctx.app[CONFIG]
    keep = (ctx.rules.retention if ctx.rules else RetentionSettings()).backups
    passphrase = os.environ.get(PASSPHRASE_ENV) or None

    def write() -> int:
        result = backup(config.home, config.db_path, passphrase=passphrase)
        prune_backups(result.path.parent, keep)
        return result.bytes

    return await asyncio.to_thread(write)


# --- the caches' expiry sweep -----------------------------------------------------------------

def request_expiry_sweep(conn: sqlite3.Connection) -> int:
    """Queue an "expired" flush request unless one is still pending (a proxy that is down would
    otherwise find a pile of them)."""
    pending = conn.execute("SELECT id FROM cache_flush_requests WHERE target = 'expired' AND applied_at IS NULL "
                           "ORDER BY id LIMIT 1").fetchone()
    if pending:
        return pending[0]
    return conn.execute("INSERT INTO cache_flush_requests (target, value, requested_at) VALUES ('expired', NULL, ?)",
                        (utcnow_iso(),)).lastrowid


def flush_result(conn: sqlite3.Connection, request_id: int) -> int | None:
    row = conn.execute("SELECT applied_at, flushed FROM cache_flush_requests WHERE id = ?", (request_id,)).fetchone()
    return None if row is None or row[0] is None else (row[1] or 0)


async def carried_out(ctx: JobContext, request_id: int) -> int:
    """What the proxy reported for a cache request it carries out: waits until it applied it, or
    until the job's timeout (no proxy running) ends the run."""
    while (done := await ctx.db(flush_result, request_id)) is None:
        await asyncio.sleep(0.5)
    return done


def _cleanup_interval(app) -> float:
    rules = app[JOBS].rules
    return rules.images.cleanup_interval if rules else 600.0


@job("cache-cleanup", every=_cleanup_interval, timeout=120,
     summary="Drop response and image cache entries past their last usable moment (carried out by the proxy)")
async def cache_cleanup(ctx: JobContext) -> int:
    return await carried_out(ctx, await ctx.db(request_expiry_sweep))
