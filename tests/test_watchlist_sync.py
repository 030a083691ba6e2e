"""The watchlist-sync job (control/watchlist.py) through the real control plane, its SQLite file and
the fakes' stateful watchlists (plex.tv discover, Trakt): opt-in per user, additions and removals
both ways told apart by the last-synced snapshot, a conflict won by the latest change, dry runs
that change nothing but say what they would do, idempotent re-runs, every change logged."""

from __future__ import annotations

import asyncio
import sqlite3
import time

import pytest
from support import free_port, wait_for, write_test_rules
from test_jobs import Admin, control_plane

from control.keys import VAULT
from control.trakt import save_tokens
from fake_upstreams.data import ACCOUNTS, MOVIES_BY_TMDB, PLEX_ACCOUNT_TOKEN_2, SHOWS_BY_TMDB, TRAKT_ACCESS_TOKEN, \
    TRAKT_REFRESH_TOKEN
from fake_upstreams.trakt import _now_iso

OWNER, OTHER = ACCOUNTS[0].id, ACCOUNTS[1].id
DUNE, SEVERANCE, ARRIVAL, RELOADED = 693134, 95396, 329865, 604


@pytest.fixture
def watchlists(fakes):
    """The fakes' watchlists (session-wide state) as they were, back after the test."""
    plex = {k: list(v) for k, v in fakes.plextv.watchlists.items()}
    dates, trakt = dict(fakes.plextv.watchlisted_at), list(fakes.trakt.watchlist)
    yield fakes
    fakes.plextv.watchlists.clear()
    fakes.plextv.watchlists.update(plex)
    fakes.plextv.watchlisted_at.clear()
    fakes.plextv.watchlisted_at.update(dates)
    fakes.trakt.watchlist[:] = trakt


def plex_tmdb(fakes, account: int) -> set[int]:
    keys = fakes.plextv.watchlists.get(account, [])
    by_key = {m.plex_guid_id: m.tmdb_id for m in MOVIES_BY_TMDB.values()}
    by_key.update({s.plex_guid_id: s.tmdb_id for s in SHOWS_BY_TMDB.values()})
    return {by_key[k] for k in keys}


def trakt_tmdb(fakes) -> set[int]:
    return {tmdb for _, tmdb, _ in fakes.trakt.watchlist}


def connect_trakt(control, user_id: int) -> None:
    vault = control.runner.app[VAULT]
    asyncio.run_coroutine_threadsafe(vault.run(save_tokens, user_id, {
        "access_token": TRAKT_ACCESS_TOKEN, "refresh_token": TRAKT_REFRESH_TOKEN, "expires_in": 7776000,
        "created_at": int(time.time()), "scope": "public"}), control.loop).result(10)


def set_sync(user: Admin, mode: str) -> None:
    r = user.session.put(user.url + "/api/settings", json={"watchlist_sync": mode},
                         headers={"X-CSRF-Token": user.csrf}, timeout=10)
    assert r.status_code == 200 and r.json()["watchlist_sync"] == mode, r.text


def test_watchlist_sync_both_ways(tmp_path, watchlists):
    fakes = watchlists
    write_test_rules(tmp_path / "rules.yaml", free_port())
    with control_plane(tmp_path, fakes) as control:
        admin = Admin(control, fakes)
        other = Admin(control, fakes, PLEX_ACCOUNT_TOKEN_2)
        conn = sqlite3.connect(tmp_path / "projectionist.db", isolation_level=None)
        owner_id, other_id = (conn.execute("SELECT id FROM users WHERE plex_account_id = ?", (str(a),)).fetchone()[0]
                              for a in (OWNER, OTHER))
        connect_trakt(control, owner_id)
        connect_trakt(control, other_id)  # connected, but never opted in: must stay untouched
        fakes.plextv.watchlists[OTHER] = [MOVIES_BY_TMDB[RELOADED].plex_guid_id]
        assert admin.get("/api/settings").json()["watchlist_sync"] == "off"
        # Plex: Dune, Severance, Arrival; Trakt: Dune, Severance and (added there) The Matrix Reloaded
        fakes.trakt.watchlist.append(("movie", RELOADED, _now_iso()))
        assert plex_tmdb(fakes, OWNER) == {DUNE, SEVERANCE, ARRIVAL}

        fakes.clear()  # nobody opted in: the job touches nothing
        assert admin.run("watchlist-sync")["items"] == 0
        assert not fakes.requests["trakt"] and not fakes.requests["plextv"]

        set_sync(admin, "dry-run")  # says what it would do, changes nothing
        dry = admin.run("watchlist-sync")
        assert dry["status"] == "ok" and dry["items"] == 2, dry
        assert plex_tmdb(fakes, OWNER) == {DUNE, SEVERANCE, ARRIVAL}
        assert trakt_tmdb(fakes) == {DUNE, SEVERANCE, RELOADED}
        events = conn.execute("SELECT user_id, direction, action, title, dry_run, outcome FROM watchlist_sync_events"
                              " ORDER BY id").fetchall()
        assert sorted(events) == [(owner_id, "plex->trakt", "add", "Arrival", 1, "planned"),
                                  (owner_id, "trakt->plex", "add", "The Matrix Reloaded", 1, "planned")]
        assert conn.execute("SELECT count(*) FROM watchlist_sync_items").fetchone()[0] == 0
        assert all(r.method == "GET" for r in fakes.requests["trakt"] + fakes.requests["plextv"])

        set_sync(admin, "on")
        # an admin's dry run (a job argument) changes nothing either, whatever the users chose
        r = admin.session.post(admin.url + "/api/jobs/watchlist-sync/run?dry_run=true",
                               headers={"X-CSRF-Token": admin.csrf}, timeout=10)
        assert r.status_code == 202, r.text
        wait_for(lambda: (j := admin.jobs()["watchlist-sync"]["last_run"]) and j["id"] == r.json()["id"]
                 and j["status"] == "ok", 30, what="the dry run")
        assert plex_tmdb(fakes, OWNER) == {DUNE, SEVERANCE, ARRIVAL} and trakt_tmdb(fakes) == {DUNE, SEVERANCE, RELOADED}
        assert conn.execute("SELECT count(*), sum(dry_run) FROM watchlist_sync_events").fetchone() == (4, 4)
        refused = admin.session.post(admin.url + "/api/jobs/backup/run?dry_run=true",
                                     headers={"X-CSRF-Token": admin.csrf}, timeout=10)
        assert refused.status_code == 400 and refused.json()["error"] == "dry_run_unsupported"

        fakes.clear()  # additions both ways
        first = admin.run("watchlist-sync")
        assert first["status"] == "ok" and first["items"] == 2, first
        assert plex_tmdb(fakes, OWNER) == trakt_tmdb(fakes) == {DUNE, SEVERANCE, ARRIVAL, RELOADED}
        assert any(r.path == "/actions/addToWatchlist" for r in fakes.requests["plextv"])
        assert any(r.path == "/sync/watchlist" and r.method == "POST" for r in fakes.requests["trakt"])
        # the other user's token was never used, their Plex watchlist is as it was
        assert plex_tmdb(fakes, OTHER) == {RELOADED}
        assert all(r.headers.get("X-Plex-Token") != PLEX_ACCOUNT_TOKEN_2 for r in fakes.requests["plextv"])
        assert conn.execute("SELECT count(*) FROM watchlist_sync_events WHERE user_id = ?",
                            (other_id,)).fetchone()[0] == 0

        again = admin.run("watchlist-sync")  # idempotent
        assert again["status"] == "ok" and again["items"] == 0, again
        assert conn.execute("SELECT count(*) FROM watchlist_sync_events WHERE dry_run = 0").fetchone()[0] == 2

        # removals: Arrival off Plex, Severance off Trakt -> gone from the other side too (not re-added)
        fakes.plextv.watchlists[OWNER].remove(MOVIES_BY_TMDB[ARRIVAL].plex_guid_id)
        fakes.trakt.watchlist[:] = [w for w in fakes.trakt.watchlist if w[1] != SEVERANCE]
        removed = admin.run("watchlist-sync")
        assert removed["status"] == "ok" and removed["items"] == 2, removed
        assert plex_tmdb(fakes, OWNER) == trakt_tmdb(fakes) == {DUNE, RELOADED}
        last = conn.execute("SELECT direction, action, title, outcome FROM watchlist_sync_events "
                            "ORDER BY id DESC LIMIT 2").fetchall()
        assert sorted(last) == [("plex->trakt", "remove", "Arrival", "ok"), ("trakt->plex", "remove", "Severance", "ok")]

        # conflict: Dune removed on Plex, but removed and added again on Trakt since: the re-addition is newer
        assert admin.run("watchlist-sync")["items"] == 0  # remembers both sides' dates
        fakes.plextv.watchlists[OWNER].remove(MOVIES_BY_TMDB[DUNE].plex_guid_id)
        fakes.trakt.watchlist[:] = [w for w in fakes.trakt.watchlist if w[1] != DUNE] + [("movie", DUNE, _now_iso())]
        conflict = admin.run("watchlist-sync")
        assert conflict["items"] == 1, conflict
        assert plex_tmdb(fakes, OWNER) == trakt_tmdb(fakes) == {DUNE, RELOADED}
        assert admin.run("watchlist-sync")["items"] == 0

        # and the other way round: Reloaded removed on Trakt, but added on Plex again since
        reloaded = MOVIES_BY_TMDB[RELOADED].plex_guid_id
        fakes.trakt.watchlist[:] = [w for w in fakes.trakt.watchlist if w[1] != RELOADED]
        fakes.plextv.watchlisted_at[(OWNER, reloaded)] = int(time.time()) + 5
        assert admin.run("watchlist-sync")["items"] == 1
        assert plex_tmdb(fakes, OWNER) == trakt_tmdb(fakes) == {DUNE, RELOADED}
        assert conn.execute("SELECT direction, action, title FROM watchlist_sync_events ORDER BY id DESC LIMIT 1"
                            ).fetchone() == ("plex->trakt", "add", "The Matrix Reloaded")

        # a watchlist that cannot be read is not an empty one: nothing is removed on the other side
        fakes.set_down("trakt")
        try:
            assert admin.run("watchlist-sync")["status"] == "ok"
        finally:
            fakes.set_down("trakt", False)
        assert plex_tmdb(fakes, OWNER) == {DUNE, RELOADED}
        assert admin.run("watchlist-sync")["items"] == 0
        assert plex_tmdb(fakes, OTHER) == {RELOADED}
        conn.close()
