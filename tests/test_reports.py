"""Reports and alerts (control/reports.py) through the real control plane and its SQLite file, sent
by Apprise to a local webhook (json://): a sustained upstream failure and a refused server key
alert once per hour; the weekly report carries plays, top titles, requests and savings."""

from __future__ import annotations

import json
import sqlite3
import time

import pytest
from aiohttp import web
from ratelimit import UpstreamThread
from support import free_port, wait_for, write_test_rules
from test_jobs import Admin, control_plane

NOTIFY_SECRET = "webhook-token-0123456789abcdef"


class Webhook(UpstreamThread):
    """A local receiver of Apprise's json:// notifications, on a thread of its own (bench/ratelimit.py's
    stand-in upstream, answering and recording POSTs)."""

    def __init__(self) -> None:
        super().__init__()
        self.received: list[dict] = []

    async def _handle(self, request: web.Request) -> web.Response:
        self.received.append({"path": request.path, **json.loads(await request.read())})
        return web.json_response({})

    @property
    def notify_url(self) -> str:
        return f"json://127.0.0.1:{self.port}/hook/{NOTIFY_SECRET}"


@pytest.fixture
def webhook(monkeypatch):
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.delenv(name, raising=False)
    with Webhook() as hook:
        monkeypatch.setenv("PROJECTIONIST_NOTIFY_URLS", hook.notify_url)
        yield hook


def test_alerts_fire_once_for_sustained_errors_and_a_refused_key(tmp_path, fakes, webhook):
    write_test_rules(tmp_path / "rules.yaml", free_port())
    with control_plane(tmp_path, fakes) as control:
        admin = Admin(control, fakes)
        conn = sqlite3.connect(tmp_path / "projectionist.db", isolation_level=None)
        now = time.time()
        rows = [(now - i, "regular", "tmdb", "tmdb.details", "GET", 502 if i % 4 else 200, "default", None)
                for i in range(30)]  # 22 of 30 failed
        rows += [(now - i, "regular", "trakt", "trakt.me", "GET", 401, "vault", None) for i in range(6)]
        rows += [(now - i, "regular", "plex", "plex.sections", "GET", 200, "vault", None) for i in range(40)]
        conn.executemany("INSERT INTO usage_events (ts, listener, upstream, route, method, status, credential, error)"
                         " VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
        run = admin.run("alerts")
        assert run["status"] == "ok" and run["items"] == 2, run
        wait_for(lambda: webhook.received, 10, what="the alert")
        alert = webhook.received[0]
        assert alert["title"] == "Projectionist alert (2)"
        assert "tmdb: 22 of 30 requests failed" in alert["message"]
        assert "trakt refused a stored token 6 times" in alert["message"]
        assert "plex" not in alert["message"].split("(")[0]
        again = admin.run("alerts")  # the same problems within the hour: no second message
        assert again["items"] == 0 and len(webhook.received) == 1
        assert NOTIFY_SECRET not in admin.get("/api/jobs").text
        conn.close()


def test_weekly_report_summarises_the_week(tmp_path, fakes, webhook):
    write_test_rules(tmp_path / "rules.yaml", free_port())
    with control_plane(tmp_path, fakes) as control:
        admin = Admin(control, fakes)
        assert admin.run("library-sync")["status"] == "ok"
        conn = sqlite3.connect(tmp_path / "projectionist.db", isolation_level=None)
        now = time.time()
        matrix = conn.execute("SELECT rating_key FROM media_items WHERE title = 'The Matrix'").fetchone()[0]
        for i in range(3):
            conn.execute("INSERT INTO plays (rating_key, started_at, last_seen_at, state, watched_ms) "
                         "VALUES (?, ?, ?, 'stopped', 3600000)", (matrix, now - 3600 * (i + 1), now - 3600 * i))
        hour = time.strftime("%Y-%m-%dT%H:00", time.gmtime(now - 3600))
        conn.execute("INSERT INTO usage_hourly (hour, upstream, route, requests, errors, cache_hits, cache_misses) "
                     "VALUES (?, 'tmdb', 'tmdb.details', 100, 2, 75, 25)", (hour,))
        conn.execute("INSERT INTO cache_savings_hourly (hour, bucket, route, bytes_saved) VALUES (?, 'images', "
                     "'tmdb.image', 5000000)", (hour,))
        run = admin.run("weekly-report")
        assert run["status"] == "ok" and run["items"] == 1, run
        report = wait_for(lambda: webhook.received and webhook.received[-1], 10, what="the report")
        assert report["title"].startswith("Projectionist weekly report")
        body = report["message"]
        assert "Plays: 3 (3.0 h watched)" in body and "The Matrix (1999) (3)" in body
        assert "Requests: 100, errors: 2, cache hit ratio: 75%" in body and "5.0 MB" in body
        conn.close()


def test_nothing_is_sent_without_notify_urls(tmp_path, fakes, monkeypatch):
    monkeypatch.delenv("PROJECTIONIST_NOTIFY_URLS", raising=False)
    write_test_rules(tmp_path / "rules.yaml", free_port())
    with control_plane(tmp_path, fakes) as control:
        admin = Admin(control, fakes)
        assert admin.run("weekly-report")["items"] == 0
        assert admin.run("alerts")["items"] == 0
