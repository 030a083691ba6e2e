"""The `cache-warm` job: the proxy's cache warmer (proxy_addons/cache_warmer.py) on a schedule.

The proxy owns the caches and the credentials, so the job asks it, as cache-cleanup does: a
`cache_flush_requests` row with target "warm", applied by the proxy, whose count is the number of
requests the warm run made. How often: `warming.every` in rules.yaml (or `jobs: {cache-warm: ...}`).
"""

from __future__ import annotations

import sqlite3

from projectionist.store import utcnow_iso

from .jobs import JOBS, JobContext, job
from .maintenance import carried_out


def request_warm(conn: sqlite3.Connection, trigger: str) -> int:
    pending = conn.execute("SELECT id FROM cache_flush_requests WHERE target = 'warm' AND value = ? "
                           "AND applied_at IS NULL ORDER BY id LIMIT 1", (trigger,)).fetchone()
    if pending:  # one run at a time: join the one asked for already
        return pending[0]
    return conn.execute("INSERT INTO cache_flush_requests (target, value, requested_at) VALUES ('warm', ?, ?)",
                        (trigger, utcnow_iso())).lastrowid


def _every(app) -> float:
    rules = app[JOBS].rules
    return rules.warming.every if rules else 1800.0


@job("cache-warm", every=_every, timeout=600,
     summary="Fetch what Home and details pages will ask for before anyone asks (carried out by the proxy)")
async def cache_warm(ctx: JobContext) -> int:
    return await carried_out(ctx, await ctx.db(request_warm, "schedule"))
