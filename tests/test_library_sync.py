"""The library-sync job (control/library.py) against the fake Plex Media Server, through the real
control plane and its SQLite file: every section's movies, shows and episodes land in media_items
with guids; a second run reads one page per section type and changes nothing."""

from __future__ import annotations

import json
import sqlite3

from support import free_port, write_test_rules
from test_jobs import Admin, control_plane

from control import library


def _sync_requests(fakes) -> list:
    return [r for r in fakes.requests["plex"] if r.path.startswith("/library/sections/") and r.path.endswith("/all")]


def test_library_sync_fills_media_items_incrementally(tmp_path, fakes, monkeypatch):
    monkeypatch.setattr(library, "PAGE_SIZE", 2)  # several pages even for a small library
    write_test_rules(tmp_path / "rules.yaml", free_port())
    with control_plane(tmp_path, fakes) as control:
        admin = Admin(control, fakes)  # signing in vaults the admin's Plex token
        fakes.clear()
        first = admin.run("library-sync")
        assert first["status"] == "ok", first
        conn = sqlite3.connect(tmp_path / "projectionist.db")
        rows = {r[0]: r for r in conn.execute(
            "SELECT rating_key, type, title, grandparent_title, parent_index, item_index, year, guids, added_at,"
            " plex_updated_at, section, server FROM media_items")}
        kinds = [r[1] for r in rows.values()]
        assert kinds.count("movie") == 5 and kinds.count("show") == 1 and kinds.count("episode") == 7, kinds
        assert first["items"] == len(rows) == 13
        matrix = next(r for r in rows.values() if r[2] == "The Matrix")
        assert matrix[6] == 1999 and "tmdb://603" in json.loads(matrix[7]) and matrix[10] == "1"
        assert matrix[11] == "plex" and matrix[8] and matrix[9]
        episode = next(r for r in rows.values() if r[1] == "episode")
        assert episode[3] and episode[4] is not None and episode[5] is not None  # show, season, episode
        first_pages = len(_sync_requests(fakes))
        assert first_pages >= 7  # 5 movies (+ a clip) in pages of 2, the show, 7 episodes
        assert all(r.query.get("X-Plex-Token") is None for r in _sync_requests(fakes))  # a header, not the URL

        fakes.clear()
        second = admin.run("library-sync")
        assert second["status"] == "ok" and second["items"] == 0, second
        assert conn.execute("SELECT count(*) FROM media_items").fetchone()[0] == 13
        # newest change first, stopped at the watermark: one page per section type
        assert len(_sync_requests(fakes)) == 3, [(r.path, r.query) for r in _sync_requests(fakes)]
        conn.close()


def test_library_sync_without_a_usable_token_does_nothing(tmp_path, fakes):
    write_test_rules(tmp_path / "rules.yaml", free_port())
    with control_plane(tmp_path, fakes) as control:
        admin = Admin(control, fakes)
        conn = sqlite3.connect(tmp_path / "projectionist.db")
        conn.execute("UPDATE vault_tokens SET revoked_at = '2020-01-01' WHERE kind = 'plex'")
        conn.commit()
        run = admin.run("library-sync")
        assert run["status"] == "ok" and run["items"] == 0
        assert conn.execute("SELECT count(*) FROM media_items").fetchone()[0] == 0
        conn.close()


def test_a_changed_library_asks_the_proxy_to_refresh_signed_in_accounts(tmp_path, fakes):
    """The first sync only learns the library; a later one that finds an edited item files one
    "library-change" warm for the proxy (tests/test_cache_warm.py: what the proxy then does); an
    unchanged library files none."""
    write_test_rules(tmp_path / "rules.yaml", free_port())
    db_path = tmp_path / "projectionist.db"

    def warms() -> list:
        conn = sqlite3.connect(db_path)
        try:
            return conn.execute("SELECT value FROM cache_flush_requests WHERE target = 'warm'").fetchall()
        finally:
            conn.close()

    with control_plane(tmp_path, fakes) as control:
        admin = Admin(control, fakes)
        assert admin.run("library-sync")["items"] > 0 and warms() == []
        assert admin.run("library-sync")["items"] == 0 and warms() == []
        try:
            fakes.plex.retitle("1001", "A New Title")
            changed = admin.run("library-sync")
        finally:
            fakes.plex.edits.clear()
        assert changed["items"] == 1, changed
        assert warms() == [("library-change",)]
        conn = sqlite3.connect(db_path)
        assert conn.execute("SELECT title FROM media_items WHERE rating_key = '1001'").fetchone() == ("A New Title",)
        conn.close()
