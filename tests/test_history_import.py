"""The history-import job (control/history.py) through the real control plane and its SQLite file,
against the fake PMS's `/status/sessions/history/all` and the fake Trakt's `/users/me/history`:
plays with their source, matched to the Plex items the library sync stored; a re-run adds nothing."""

from __future__ import annotations

import asyncio
import sqlite3
import time

from support import free_port, write_test_rules
from test_jobs import Admin, control_plane

from control.keys import VAULT
from control.trakt import save_tokens
from fake_upstreams.data import TRAKT_ACCESS_TOKEN, TRAKT_REFRESH_TOKEN


def rating_key_of(conn: sqlite3.Connection, title: str) -> str:
    return conn.execute("SELECT rating_key FROM media_items WHERE title = ?", (title,)).fetchone()[0]


def test_history_import_is_idempotent_and_keeps_the_source(tmp_path, fakes):
    write_test_rules(tmp_path / "rules.yaml", free_port())
    with control_plane(tmp_path, fakes) as control:
        admin = Admin(control, fakes)
        assert admin.run("library-sync")["status"] == "ok"  # the Plex items Trakt entries are matched to
        vault = control.runner.app[VAULT]  # connect Trakt as a device sign-in would have
        user_id = asyncio.run_coroutine_threadsafe(
            vault.run(lambda v: v.conn.execute("SELECT id FROM users").fetchone()[0]), control.loop).result(10)
        asyncio.run_coroutine_threadsafe(vault.run(save_tokens, user_id, {
            "access_token": TRAKT_ACCESS_TOKEN, "refresh_token": TRAKT_REFRESH_TOKEN, "expires_in": 7776000,
            "created_at": int(time.time()), "scope": "public"}), control.loop).result(10)

        fakes.clear()
        first = admin.run("history-import")
        assert first["status"] == "ok", first
        conn = sqlite3.connect(tmp_path / "projectionist.db")
        plays = conn.execute("SELECT source, rating_key, user_id, started_at, watched, external_id FROM plays "
                             "ORDER BY source, started_at").fetchall()
        plex = [p for p in plays if p[0] == "plex-history"]
        trakt = [p for p in plays if p[0] == "trakt"]
        # the fake owner has watched The Matrix (1001) and Breaking Bad 1x01 (2003); Trakt knows three views
        assert {p[1] for p in plex} == {"1001", "2003"} and all(p[2] == user_id and p[4] == 1 for p in plex)
        assert len(trakt) == 3 and all(p[2] == user_id for p in trakt)
        matrix = rating_key_of(conn, "The Matrix")
        assert matrix in {p[1] for p in trakt}  # matched through the tmdb guid the library sync stored
        assert first["items"] == len(plays) == 5
        assert any(r.path == "/status/sessions/history/all" for r in fakes.requests["plex"])
        assert any(r.path == "/users/me/history" for r in fakes.requests["trakt"])
        titles = dict(conn.execute("SELECT source, group_concat(title, '|') FROM play_history GROUP BY source"))
        assert "The Matrix (1999)" in titles["plex-history"]

        second = admin.run("history-import")
        assert second["status"] == "ok" and second["items"] == 0, second
        assert conn.execute("SELECT count(*) FROM plays").fetchone()[0] == 5
        conn.close()
