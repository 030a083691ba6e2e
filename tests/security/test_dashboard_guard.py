"""The dashboard's guard plugin in the real Datasette process. Guessing the password, over HTTP
from several loopback addresses (127.0.0.0/8 is all this machine, so each address is a different
client), with the limit 4/60: after 1 failure an address waits 1 s, 2 s, 4 s per attempt; the 4th failure locks the
address out; 12 failures on the account from anywhere lock the account out."""

from __future__ import annotations

import sqlite3
import time

import pytest
import requests
from dashboard import running_dashboard
from support import REPO, SourceAddressAdapter

from projectionist.config import Config
from projectionist.dashboard import ADMIN_USER, admin_password, datasette_env
from projectionist.dashboard_guard import LIMIT_ENV
from projectionist.store import open_db

pytestmark = pytest.mark.e2e


def client(address: str, auth: tuple[str, str] | None) -> requests.Session:
    session = requests.Session()
    session.trust_env = False
    session.mount("http://", SourceAddressAdapter(address))
    session.auth = auth
    return session


def failures(home) -> tuple[int, int]:
    conn = sqlite3.connect(home / "projectionist.db", timeout=10)
    try:
        row = conn.execute("SELECT COALESCE(SUM(failures), 0), COALESCE(SUM(lockouts), 0) "
                           "FROM dashboard_login_failures").fetchone()
        return row[0], row[1]
    finally:
        conn.close()


def dashboard_home(tmp_path) -> Config:
    config = Config(home=tmp_path, rules_path=REPO / "rules.yaml", datasette_metadata=REPO / "datasette_metadata.yml")
    config.ensure_dirs()
    open_db(config.db_path).conn.close()
    return config


def test_a_query_cut_off_by_the_time_limit_is_a_400_in_every_format(tmp_path):
    config = dashboard_home(tmp_path)
    conn = sqlite3.connect(config.db_path)
    with conn:
        conn.executemany("INSERT INTO usage_events (ts, listener, upstream, route, method, status, latency_ms) "
                         "VALUES (?, 'regular', 'tmdb', ?, 'GET', 200, ?)",
                         ((1.7e9 + n, f"tmdb.route{n % 97}", n % 1000) for n in range(300_000)))
    conn.close()
    with running_dashboard(tmp_path) as (base, admin):
        for suffix in ("", ".json", ".csv"):
            # Sorting 300,000 rows by an unindexed column takes far longer than 1 ms.
            r = admin.get(f"{base}/projectionist/usage_events{suffix}?_sort_desc=latency_ms&_timelimit=1", timeout=60)
            assert r.status_code == 400, (suffix, r.status_code, r.text[:300])


def test_password_guessing_is_delayed_then_locked_out_per_address_and_per_account(tmp_path):
    config = dashboard_home(tmp_path)
    env = datasette_env(config)
    env[LIMIT_ENV] = "4/60"
    password = admin_password(config)
    with running_dashboard(tmp_path, env=env) as (base, _admin):
        guesser = client("127.0.0.2", (ADMIN_USER, "guess"))
        started = time.monotonic()
        answers = [guesser.get(base + "/", timeout=30) for _ in range(4)]
        guessing = time.monotonic() - started
        assert [a.status_code for a in answers] == [401, 401, 401, 401]
        assert guessing >= 1 + 2 + 4 - 0.5, f"four wrong passwords took {guessing:.2f} s: no delay"

        # Locked out: at once, with the time it lasts; the right password does not open it either.
        started = time.monotonic()
        locked = guesser.get(base + "/", timeout=30)
        assert time.monotonic() - started < 4.0  # no 8 s delay: refused at once
        assert locked.status_code == 429
        assert int(locked.headers["Retry-After"]) > 50
        assert "Try again in 1 minute" in locked.text
        right_but_locked = client("127.0.0.2", (ADMIN_USER, password)).get(base + "/", timeout=30)
        assert right_but_locked.status_code == 429
        # Another address is not affected, and the admin sees the failures counted.
        admin = client("127.0.0.3", (ADMIN_USER, password))
        table = admin.get(base + "/projectionist/dashboard_login_failures.json?_shape=array", timeout=30)
        assert table.status_code == 200, table.text
        assert sum(row["failures"] for row in table.json()) == 4
        assert failures(tmp_path) == (4, 1)

        # Distributed guessing, one try per address: the account locks after 3 x 4 failures.
        answers = [client(f"127.0.1.{n}", (ADMIN_USER, "guess")).get(base + "/", timeout=30).status_code
                   for n in range(1, 12)]
        assert answers[:8] == [401] * 8 and answers[8:] == [429] * 3, answers
        fresh = client("127.0.2.1", (ADMIN_USER, password)).get(base + "/", timeout=30)
        assert fresh.status_code == 429 and "Try again in" in fresh.text
        total, lockouts = failures(tmp_path)
        assert total == 4 + 8 and lockouts == 2
