"""Backups (projectionist/backup.py): a backup taken by `projectionist backup` while the real stack
serves traffic, restored by `projectionist restore` into a fresh home where a second stack then
accepts the first one's sign-in cookie and surrogate tokens; refusals; the pre-migration snapshot;
the scheduled job."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import tarfile
import threading

import pytest
import requests
from support import REPO, make_stack, wait_for
from test_control_e2e import ControlClient
from test_e2e_credentials import RecordingClient

from fake_upstreams.data import PLEX_ACCOUNT_TOKEN, PLEX_SERVER_TOKEN
from projectionist.backup import BackupError, backup, restore
from projectionist.store import MIGRATIONS, connect, migrate, open_db

PASSPHRASE = "correct horse battery staple 42"


def cli(*args: str, home, env: dict | None = None, **extra: str) -> subprocess.CompletedProcess:
    full = {k: v for k, v in (env or os.environ).items() if not k.upper().endswith("_PROXY")}
    full.update(PROJECTIONIST_HOME=str(home), **extra)
    return subprocess.run([sys.executable, "-m", "launcher", *args], env=full, cwd=REPO, capture_output=True,
                          text=True, timeout=120, stdin=subprocess.DEVNULL)


@pytest.mark.e2e
def test_backup_under_traffic_restores_into_a_fresh_home_with_sessions_and_tokens(fakes, tmp_path):
    first = make_stack(tmp_path / "first", fakes).start()
    stop_traffic = threading.Event()
    try:
        player = RecordingClient(first)
        account_surrogate = player.login(PLEX_ACCOUNT_TOKEN)
        server_surrogate = player.server(account_surrogate)["accessToken"]
        assert server_surrogate.startswith("pj_")
        browser = ControlClient(first)
        browser.login()
        cookie = browser.session_cookie
        served = []

        def traffic() -> None:  # the player keeps browsing while the backup runs
            session = requests.Session()
            session.trust_env = False
            i = 0
            while not stop_traffic.is_set():
                i += 1
                r = session.get(f"{first.plex_url}/library/metadata/1001",
                                params={"X-Plex-Token": server_surrogate, "n": i}, timeout=10)
                served.append(r.status_code)

        threads = [threading.Thread(target=traffic) for _ in range(3)]
        for t in threads:
            t.start()
        wait_for(lambda: len(served) >= 30, 30, what="traffic")
        archive = tmp_path / "nightly.tar.gz"
        done = cli("backup", str(archive), home=first.home, env=first.env, PROJECTIONIST_BACKUP_PASSPHRASE=PASSPHRASE)
        assert done.returncode == 0, done.stderr
        during = len(served)
        wait_for(lambda: len(served) >= during + 10, 30, what="traffic after the backup")
    finally:
        stop_traffic.set()
        for t in threads:
            t.join(15)
        assert first.stop() == 0
    assert served and set(served) == {200}, set(served)
    assert "passphrase-wrapped" in done.stdout
    with tarfile.open(archive) as tar:
        names = set(tar.getnames())
        manifest = json.load(tar.extractfile("manifest.json"))
        raw = b"".join(tar.extractfile(n).read() for n in names)
    assert names == {"manifest.json", "projectionist.db", "secrets.enc"} and manifest["secrets"]
    assert (first.home / "secret.key").read_bytes().strip() not in raw  # the key only wrapped
    assert oct(archive.stat().st_mode & 0o777) == "0o600"

    fresh = tmp_path / "fresh"
    wrong = cli("restore", str(archive), home=fresh, PROJECTIONIST_BACKUP_PASSPHRASE="not it")
    assert wrong.returncode == 1 and "passphrase does not open" in wrong.stderr
    assert not (fresh / "projectionist.db").exists()
    restored = cli("restore", str(archive), home=fresh, PROJECTIONIST_BACKUP_PASSPHRASE=PASSPHRASE)
    assert restored.returncode == 0, restored.stderr
    again = cli("restore", str(archive), home=fresh, PROJECTIONIST_BACKUP_PASSPHRASE=PASSPHRASE)
    assert again.returncode == 1 and "--force" in again.stderr  # never over a database by accident
    assert (fresh / "secret.key").read_bytes() == (first.home / "secret.key").read_bytes()
    assert (fresh / "mitmproxy" / "mitmproxy-ca.pem").read_bytes() == \
        (first.home / "mitmproxy" / "mitmproxy-ca.pem").read_bytes()  # browsers keep trusting the proxy

    second = make_stack(fresh, fakes).start()
    try:
        # the sign-in cookie of the first stack is a session of the second
        r = requests.get(second.control_url + "/api/auth/session", cookies={"pj_session": cookie}, timeout=10)
        assert r.status_code == 200 and r.json()["user"]["username"]
        # the player's surrogates still stand for the vaulted real tokens
        fakes.clear()
        player.stack = second
        player.session.proxies = {"https": second.proxy_url}
        r = requests.get(f"{second.plex_url}/library/sections", params={"X-Plex-Token": server_surrogate}, timeout=10,
                         headers={"Accept": "application/json"})
        assert r.status_code == 200
        assert fakes.requests["plex"][-1].query.get("X-Plex-Token") == [PLEX_SERVER_TOKEN]
        assert player.server(account_surrogate)["accessToken"] == server_surrogate
        conn = sqlite3.connect(second.db_path)
        rows = conn.execute("SELECT count(*) FROM usage_events WHERE route = 'plex.metadata'").fetchone()[0]
        conn.close()
        assert rows >= 1  # the traffic before the backup is in it
    finally:
        assert second.stop() == 0


def _home_with_data(home):
    home.mkdir(parents=True, exist_ok=True)
    db = open_db(home / "projectionist.db")
    db.conn.execute("INSERT INTO control_state (name, value) VALUES ('marker', 'kept')")
    db.conn.close()
    (home / "secret.key").write_bytes(b"uE7q6H1bq7x0n6oW9cYk2sQ2V9p3hKX8m1tZbVw4R2s=\n")


def test_refusals_are_clear_and_leave_the_home_untouched(tmp_path):
    source = tmp_path / "source"
    _home_with_data(source)
    archive = backup(source, source / "projectionist.db", tmp_path / "b.tar.gz", PASSPHRASE).path
    target = tmp_path / "target"
    with pytest.raises(BackupError, match="passphrase"):
        restore(archive, target, target / "projectionist.db", None)
    damaged = tmp_path / "damaged.tar.gz"
    damaged.write_bytes(archive.read_bytes()[:200])
    with pytest.raises(BackupError):
        restore(damaged, target, target / "projectionist.db", PASSPHRASE)
    not_ours = tmp_path / "x.tar.gz"
    not_ours.write_text("hello")
    with pytest.raises(BackupError, match="not a Projectionist backup"):
        restore(not_ours, target, target / "projectionist.db", PASSPHRASE)
    assert not (target / "projectionist.db").exists()
    # without a passphrase the CLI says what to do instead of writing a backup nobody can read
    refused = cli("backup", home=source)
    assert refused.returncode == 2 and "PROJECTIONIST_BACKUP_PASSPHRASE" in refused.stderr
    plain = cli("backup", str(tmp_path / "db-only.tar.gz"), "--no-secrets", home=source)
    assert plain.returncode == 0 and "database only" in plain.stdout
    # restoring a database-only backup says the key must come back separately
    only = cli("restore", str(tmp_path / "db-only.tar.gz"), home=tmp_path / "t2")
    assert only.returncode == 0 and "carried no secrets" in only.stdout
    conn = connect(tmp_path / "t2" / "projectionist.db")
    assert conn.execute("SELECT value FROM control_state WHERE name = 'marker'").fetchone() == ("kept",)
    conn.close()


def test_a_migration_first_snapshots_the_database(tmp_path):
    db_path = tmp_path / "projectionist.db"
    conn = connect(db_path)
    # a database of an older release: everything but the newest migration
    conn.execute("CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, name TEXT NOT NULL, "
                 "applied_at TEXT NOT NULL)")
    newest = max(v for v, _, _ in MIGRATIONS)
    saved = MIGRATIONS
    import projectionist.store as store

    store.MIGRATIONS = tuple(m for m in saved if m[0] != newest)
    try:
        migrate(conn)
    finally:
        store.MIGRATIONS = saved
    conn.execute("INSERT INTO control_state (name, value) VALUES ('before', 'upgrade')")
    assert not (tmp_path / "backups").exists()  # nothing pending: no snapshot
    assert migrate(conn) == newest
    snapshots = list((tmp_path / "backups").glob(f"pre-migration-v{newest - 1}-*.db"))
    assert len(snapshots) == 1 and oct(snapshots[0].stat().st_mode & 0o777) == "0o600"
    old = sqlite3.connect(snapshots[0])
    assert old.execute("SELECT max(version) FROM schema_migrations").fetchone()[0] == newest - 1
    assert old.execute("SELECT value FROM control_state WHERE name = 'before'").fetchone() == ("upgrade",)
    old.close()
    migrate(conn)  # up to date: no new snapshot
    assert len(list((tmp_path / "backups").glob("pre-migration-*.db"))) == 1
    conn.close()


def test_the_scheduled_backup_keeps_the_newest(tmp_path, fakes, monkeypatch):
    from test_jobs import Admin, control_plane, rules_with_jobs

    monkeypatch.setenv("PROJECTIONIST_BACKUP_PASSPHRASE", PASSPHRASE)
    rules_with_jobs(tmp_path, {}, retention={"backups": 3})
    backups = tmp_path / "backups"
    backups.mkdir()
    for day in range(1, 6):
        (backups / f"projectionist-2020010{day}T000000000000Z.tar.gz").write_bytes(b"old")
    with control_plane(tmp_path, fakes) as control:
        admin = Admin(control, fakes)
        run = admin.run("backup", timeout=60)
        assert run["status"] == "ok" and run["items"] > 0, run
    kept = sorted(p.name for p in backups.glob("projectionist-*.tar.gz"))
    assert len(kept) == 3 and kept[:2] == ["projectionist-20200104T000000000000Z.tar.gz",
                                          "projectionist-20200105T000000000000Z.tar.gz"]
    newest = backups / kept[-1]
    restored = restore(newest, tmp_path / "again", tmp_path / "again" / "projectionist.db", PASSPHRASE)
    assert restored["secrets"] and (tmp_path / "again" / "secret.key").exists()
