"""What is playing now: one query, read by the admin UI's overview (`/api/admin/activity`) and by the
dashboard home's "Playing now" card (a canned query of the dashboard, `live_activity`).

A play is open while the player's timeline reports keep coming (plays.source = 'timeline', not
stopped, a report in the last ACTIVE_WITHIN seconds). How it is delivered comes from the user's
Plex requests since the play began: the transcoder's routes, or the file's parts (direct play).
No secret is read: plays, play_history (a view over plays, media_items and user_directory) and
usage_events.
"""

from __future__ import annotations

import sqlite3

ACTIVE_WITHIN = 120  # s: a play with no report for longer is not shown as playing (the player reports ~4/s)
QUERY_NAME = "live_activity"

_SQL = """
SELECT p.id AS play_id, p.user_id, h.username, h.title, h.media_type, p.state, p.position_ms, p.duration_ms,
       h.progress_pct,
       CASE
         WHEN p.user_id IS NULL THEN NULL
         WHEN EXISTS (SELECT 1 FROM usage_events u WHERE u.user_id = p.user_id AND u.ts >= p.started_at - 60
                      AND u.upstream = 'plex' AND u.route LIKE 'plex.transcode.%') THEN 'transcode'
         WHEN EXISTS (SELECT 1 FROM usage_events u WHERE u.user_id = p.user_id AND u.ts >= p.started_at - 60
                      AND u.upstream = 'plex' AND u.route = 'plex.part') THEN 'direct'
       END AS delivery,
       p.player AS client, p.started_at, p.last_seen_at
FROM plays p JOIN play_history h ON h.id = p.id
WHERE p.stopped_at IS NULL AND p.source = 'timeline' AND p.last_seen_at >= {now} - {within}
ORDER BY p.last_seen_at DESC
LIMIT 100
"""


def sql(now: str) -> str:
    """The query with `now` (an SQL expression of Unix seconds) as the present."""
    return _SQL.format(now=now, within=ACTIVE_WITHIN).strip()


# The dashboard's canned query: the present is the database's clock, so it needs no parameter.
DASHBOARD_QUERIES = {
    QUERY_NAME: {
        "title": "Playing now",
        "description": f"Plays with a timeline report in the last {ACTIVE_WITHIN} s, newest report first.",
        "sql": sql("unixepoch('now')"),
    },
}


def playing_now(conn: sqlite3.Connection, now: float) -> list[dict]:
    """The open plays as of `now` (Unix seconds), newest report first."""
    cursor = conn.execute(sql(":now"), {"now": now})
    names = [d[0] for d in cursor.description]
    return [dict(zip(names, row)) for row in cursor.fetchall()]
