"""Reports and alerts, sent where the admin says: `PROJECTIONIST_NOTIFY_URLS`, comma-separated
Apprise URLs (discord://, ntfy://, mailto://, json:// webhooks, ...). They carry tokens, so they
live in the environment only and are redacted from every log line.

weekly-report  Mondays 08:00: last 7 days' plays and watch time, top titles, requests, errors,
               cache hit ratio and bytes saved by the image cache.
alerts         every 5 minutes, over the last 15: an upstream whose answers are mostly errors
               (sustained: at least 20 requests, half of them 5xx or failed), and a credential the
               server injects that the upstream keeps refusing (a dead token: 401/403 answers to
               the server's own key or a vaulted token). One alert per problem per hour.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import time
from datetime import UTC, datetime

from projectionist.redact import RedactSecrets

from .jobs import JobContext, job

log = logging.getLogger("control.reports")

URLS_ENV = "PROJECTIONIST_NOTIFY_URLS"
WINDOW = 15 * 60
REPEAT_AFTER = 3600
MIN_REQUESTS, ERROR_SHARE, MIN_REFUSALS = 20, 0.5, 5


def notify_urls() -> list[str]:
    urls = [u.strip() for u in os.environ.get(URLS_ENV, "").split(",") if u.strip()]
    for url in urls:
        RedactSecrets.register(url)
    return urls


def send(urls: list[str], title: str, body: str) -> int:
    """Blocking (Apprise): call from a thread. Returns how many targets took it."""
    import apprise

    sent = 0
    for url in urls:
        target = apprise.Apprise()
        if not target.add(url):
            log.warning("a notification URL is not understood by Apprise (check PROJECTIONIST_NOTIFY_URLS)")
            continue
        sent += bool(target.notify(title=title, body=body))
    return sent


# --- the weekly report ------------------------------------------------------------------------------

def weekly_summary(conn: sqlite3.Connection, now: float | None = None) -> tuple[str, str]:
    now = time.time() if now is None else now
    since = now - 7 * 86400
    hour = datetime.fromtimestamp(since, UTC).strftime("%Y-%m-%dT%H:00")
    plays, watched = conn.execute("SELECT count(*), coalesce(sum(watched_ms), 0) FROM plays WHERE started_at >= ?",
                                  (since,)).fetchone()
    top = conn.execute(
        "SELECT title, count(*) AS n FROM play_history WHERE started_utc >= datetime(?, 'unixepoch') "
        "GROUP BY title ORDER BY n DESC, title LIMIT 5", (since,)).fetchall()
    requests, errors, hits, lookups = conn.execute(
        "SELECT coalesce(sum(requests), 0), coalesce(sum(errors), 0), coalesce(sum(cache_hits + cache_stale), 0), "
        "coalesce(sum(cache_hits + cache_misses + cache_stale), 0) FROM usage_hourly WHERE hour >= ?",
        (hour,)).fetchone()
    saved = conn.execute("SELECT coalesce(sum(bytes_saved), 0) FROM cache_savings_hourly WHERE hour >= ?",
                         (hour,)).fetchone()[0]
    lines = [f"Plays: {plays} ({watched / 3_600_000:.1f} h watched)"]
    if top:
        lines.append("Top titles: " + ", ".join(f"{title} ({n})" for title, n in top))
    ratio = f"{100 * hits / lookups:.0f}%" if lookups else "n/a"
    lines += [f"Requests: {requests}, errors: {errors}, cache hit ratio: {ratio}",
              f"Bytes saved by the image cache: {saved / 1e6:.1f} MB"]
    start = datetime.fromtimestamp(since, UTC).strftime("%Y-%m-%d")
    return f"Projectionist weekly report (since {start})", "\n".join(lines)


@job("weekly-report", cron="0 8 * * 1", timeout=300,
     summary="Send the weekly usage report to PROJECTIONIST_NOTIFY_URLS")
async def weekly_report(ctx: JobContext) -> int:
    urls = notify_urls()
    if not urls:
        return 0
    title, body = await ctx.db(weekly_summary)
    return await asyncio.to_thread(send, urls, title, body)


# --- alerts -------------------------------------------------------------------------------------------

def find_problems(conn: sqlite3.Connection, now: float | None = None) -> list[tuple[str, str]]:
    """(key, text) of each problem in the window."""
    now = time.time() if now is None else now
    since = now - WINDOW
    problems = []
    for upstream, total, failed in conn.execute(
            "SELECT upstream, count(*), sum(status >= 500 OR status IS NULL OR error IS NOT NULL) FROM usage_events "
            "WHERE ts >= ? GROUP BY upstream", (since,)):
        if total >= MIN_REQUESTS and failed >= ERROR_SHARE * total:
            problems.append((f"errors:{upstream}", f"{upstream}: {failed} of {total} requests failed in the last "
                                                  f"{WINDOW // 60} minutes (5xx, timeouts or no answer)"))
    for upstream, credential, refused in conn.execute(
            "SELECT upstream, credential, count(*) FROM usage_events WHERE ts >= ? AND status IN (401, 403) "
            "AND credential IN ('default', 'vault') GROUP BY upstream, credential", (since,)):
        if refused >= MIN_REFUSALS:
            what = "the server's own key" if credential == "default" else "a stored token"
            problems.append((f"refused:{upstream}:{credential}",
                             f"{upstream} refused {what} {refused} times in the last {WINDOW // 60} minutes: "
                             "it may be revoked or expired"))
    return problems


def due(conn: sqlite3.Connection, problems: list[tuple[str, str]], now: float | None = None) -> list[tuple[str, str]]:
    """The problems not alerted within REPEAT_AFTER; marks them alerted."""
    now = time.time() if now is None else now
    out = []
    for key, text in problems:
        row = conn.execute("SELECT value FROM control_state WHERE name = ?", (f"alert:{key}",)).fetchone()
        if row and now - float(row[0]) < REPEAT_AFTER:
            continue
        conn.execute("INSERT INTO control_state (name, value) VALUES (?, ?) ON CONFLICT (name) DO UPDATE SET "
                     "value = excluded.value", (f"alert:{key}", repr(now)))
        out.append((key, text))
    return out


@job("alerts", every=300, timeout=120,
     summary="Alert PROJECTIONIST_NOTIFY_URLS on sustained upstream errors or a refused server credential")
async def alerts(ctx: JobContext) -> int:
    problems = await ctx.db(find_problems)
    urls = notify_urls()
    if not problems or not urls:
        return 0
    fresh = await ctx.db(due, problems)
    if not fresh:
        return 0
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    await asyncio.to_thread(send, urls, f"Projectionist alert ({len(fresh)})",
                            "\n".join(text for _, text in fresh) + f"\n({when})")
    return len(fresh)
