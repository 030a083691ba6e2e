"""The dashboard's lock-down, attacked for real.

Datasette runs exactly as the product starts it (`projectionist.dashboard.datasette_command` and
`datasette_env` with the shipped datasette_metadata.yml) over a store holding recognisable fake
secrets in every secret-bearing place: session ids and CSRF hashes, e-mails, vault rows (surrogate
hashes, encrypted tokens, keyed hashes) made by the real Vault, a user's encrypted custom key, the
vault key file, the dashboard password and its hash, a player's client identifier. Every Datasette
route that could reach them is then tried, as the admin: table, row, blob, JSON and CSV pages of
the denied tables, arbitrary SQL, `_where=`, `_through=`, facets, foreign-key label expansion, the
instance and database pages, `/-/` endpoints, the database download, and every canned query with
crafted parameters. No response body or header may contain a secret, the denied resources must be
refused, and the visible tables must still work. Without the admin's credentials every route
answers 401 and nothing else.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
import yaml

from projectionist.analytics import MetadataBody, PlaybackReport, PlaybackWriter
from projectionist.config import Config
from projectionist.dashboard_guard import LIMIT_ENV
from projectionist.dashboard import (
    ADMIN_USER,
    PASSWORD_HASH_ENV,
    admin_password,
    datasette_env,
    password_path,
)
from projectionist.store import SECRET_TABLES, UsageEvent, UsageWriter, open_db
from projectionist.vault import SecretBox, Vault, key_file

from support import load_bench

REPO = Path(__file__).resolve().parent.parent
DB = "projectionist"

# Each value carries a marker that survives HTML escaping and URL encoding, so a leak is found in
# whatever form Datasette renders it.
SECRETS = {
    "sessions.id_hash": "sessidhash-zq5ecretsid-8d1f0a6b4c2e",
    "sessions.csrf_hash": "csrfhash-zq5ecretcsrf-3b7e9d2a1f40",
    "sessions.user_agent": "LeakyAgent-zq5ecretua/1.0",
    "sessions.ip": "198.51.100.173",
    "users.email": "leaky.person-zq5ecretmail@example.invalid",
    "users.plex_account_id": "plexacct-zq5ecretacct",
    "users.thumb": "https://plex.invalid/users/zq5ecretthumb/avatar.png",
    "user_settings.preferences token": "plextoken-zq5ecrettoken-Q9xW2vK7",
    "user_settings.watchlist_provider": "provider-zq5ecretprov",
    "vault_tokens.surrogate_hash": "surrhash-zq5ecretsurrhash",
    "vault_tokens.real_hmac": "realhmac-zq5ecretrealhmac",
    "vault_tokens.server_id": "serverid-zq5ecretserverid",
    "user_credentials.name": "credname-zq5ecretcredname",
    "plays client identifier": "clientid-zq5ecretclientid",
    "real Plex token (vaulted)": "plexreal-zq5ecretplexreal-9f8e7d",
}
# Secrets that only exist once the store is seeded (the vault's own hashes, ciphertexts and key,
# the surrogate it hands out, the dashboard's password and hash): filled in by the fixture.
DYNAMIC: dict[str, str] = {}
MARKERS = {name: (re.search(r"zq5ecret[a-z]+", value) or re.search(".+", value)).group(0)
           for name, value in SECRETS.items()}
# Visible in user_directory by design; anywhere else it is a leak through a join or a label.
USERNAME = "leaky-username-zq5ecretname"
USER_ID = 4242
DENIED = SECRET_TABLES  # every table the store declares secret
VISIBLE = ("usage_events", "usage_hourly", "cache_entries", "rate_limit_events", "user_directory",
           "credential_hourly", "rate_limit_hourly", "plays", "media_items", "play_history", "user_activity")
# Visible by design with user names in them: the views and canned queries about users.
SHOWS_USERNAMES = ("user_directory", "play_history", "user_activity")


def _seed(config: Config) -> None:
    db = open_db(config.db_path)
    conn = db.conn
    now = time.time()
    conn.execute("BEGIN")
    conn.execute(
        "INSERT INTO users (id, plex_account_id, username, email, thumb, is_admin, created_at, last_seen_at) "
        "VALUES (?, ?, ?, ?, ?, 1, '2024-01-01T00:00:00+00:00', '2024-01-02T00:00:00+00:00')",
        (USER_ID, SECRETS["users.plex_account_id"], USERNAME, SECRETS["users.email"], SECRETS["users.thumb"]))
    conn.execute(
        "INSERT INTO users (id, username, created_at) VALUES (7, 'second-user', '2024-01-01T00:00:00+00:00')")
    conn.execute(
        "INSERT INTO sessions (id_hash, user_id, csrf_hash, created_at, expires_at, user_agent, ip) "
        "VALUES (?, ?, ?, '2024-01-01T00:00:00+00:00', '2099-01-01T00:00:00+00:00', ?, ?)",
        (SECRETS["sessions.id_hash"], USER_ID, SECRETS["sessions.csrf_hash"],
         SECRETS["sessions.user_agent"], SECRETS["sessions.ip"]))
    conn.execute(
        "INSERT INTO user_settings (user_id, preferences, watchlist_provider, updated_at) VALUES (?, ?, ?, ?)",
        (USER_ID, json.dumps({"theme": "dark", "plex_token": SECRETS["user_settings.preferences token"]}),
         SECRETS["user_settings.watchlist_provider"], "2024-01-01T00:00:00+00:00"))
    for i in range(5):
        conn.execute(
            "INSERT INTO usage_events (ts, listener, upstream, route, method, status, latency_ms, "
            "bytes_in, bytes_out, cache, user_id, credential) VALUES (?, 'regular', 'tmdb', "
            "'tmdb.details', 'GET', 200, 4.5, 10, 2000, ?, ?, 'tmdb')",
            (now - i * 60, "hit" if i % 2 else "miss", USER_ID if i < 4 else 7))
    conn.execute(
        "INSERT INTO usage_hourly (hour, upstream, route, user_id, requests, bytes_out, cache_hits) "
        "VALUES ('2024-01-01T10:00', 'tmdb', 'tmdb.details', ?, 4, 8000, 2)", (USER_ID,))
    conn.execute(
        "INSERT INTO cache_entries (key_hash, bucket, route, scope, size, created_at) "
        "VALUES ('k1', 'response', 'tmdb.details', 'shared', 2000, ?)", (now,))
    conn.execute(
        "INSERT INTO rate_limit_events (ts, user_id, client, upstream, rule, waited_ms, outcome) "
        "VALUES (?, ?, '10.0.0.5', 'tmdb', 'tmdb-per-ip', 120.0, 'queued')", (now, USER_ID))
    conn.execute(
        "INSERT INTO vault_tokens (kind, user_id, surrogate_hash, surrogate_enc, real_hmac, secret_enc, server_id, "
        "created_at) VALUES ('plex', ?, ?, ?, ?, ?, ?, '2024-01-01T00:00:00+00:00')",
        (USER_ID, SECRETS["vault_tokens.surrogate_hash"], b"surrenc-zq5ecretsurrenc",
         SECRETS["vault_tokens.real_hmac"], b"secretenc-zq5ecretsecretenc", SECRETS["vault_tokens.server_id"]))
    conn.execute(
        "INSERT INTO user_credentials (user_id, name, secret_enc, updated_at) VALUES (?, ?, ?, '2024-01-01')",
        (USER_ID, SECRETS["user_credentials.name"], b"credenc-zq5ecretcredenc"))
    conn.execute("COMMIT")
    # Through the product's own code: the vault (real hashes and ciphertexts), the usage writer
    # (rollups), the playback writer (plays from a player whose client identifier is secret).
    vault = Vault(config.db_path, SecretBox.load(config.home))
    surrogate = vault.surrogate_for("plex", SECRETS["real Plex token (vaulted)"], USER_ID, "server-1")
    vault.set_user_credential(USER_ID, "tmdb", "0123456789abcdef0123456789abcdef")
    row = conn.execute("SELECT surrogate_hash, real_hmac, hex(surrogate_enc), hex(secret_enc) FROM vault_tokens "
                       "WHERE server_id = 'server-1'").fetchone()
    DYNAMIC.update({"surrogate": surrogate, "surrogate_hash": row[0], "real_hmac": row[1],
                    "surrogate_enc (hex)": row[2], "secret_enc (hex)": row[3],
                    "custom TMDB key": "0123456789abcdef0123456789abcdef"})
    if key_file(config.home).exists():
        DYNAMIC["vault key file"] = key_file(config.home).read_text().strip().splitlines()[0]
    vault.close()
    assert UsageWriter._write(conn, [
        UsageEvent(ts=now - i, listener="regular", upstream="tmdb", route="tmdb.details", method="GET",
                   status=200 if i else 429, latency_ms=5.0 + i, bytes_out=100, cache="hit" if i % 2 else "miss",
                   user_id=USER_ID, credential="custom" if i % 3 else "default") for i in range(6)])
    client = SECRETS["plays client identifier"]
    writer = PlaybackWriter(config.db_path, clock=lambda: now)
    assert writer._write(conn, [
        MetadataBody(ts=now - 100, raw=json.dumps({"MediaContainer": {"Metadata": [
            {"ratingKey": "1001", "type": "movie", "title": "The Matrix", "year": 1999, "duration": 8160000}]}}).encode()),
        *(PlaybackReport(ts=now - 90 + i * 10, kind="timeline", rating_key="1001", user_id=USER_ID, client=client,
                         player="Plex Web / Chrome", state="playing", position_ms=i * 10_000, duration_ms=8160000)
          for i in range(5)),
        PlaybackReport(ts=now - 30, kind="timeline", rating_key="1001", user_id=USER_ID, client=client,
                       state="stopped", position_ms=60_000, duration_ms=8160000),
    ])
    conn.close()


@dataclass
class Dashboard:
    base: str
    session: requests.Session  # logged in as the admin
    config: Config
    anonymous: requests.Session

    def get(self, path: str, **kw) -> requests.Response:
        return self.session.get(self.base + path, timeout=10, **kw)


@contextlib.contextmanager
def _running_dashboard(metadata: Path):
    """The store seeded with secrets, and Datasette over it started as `projectionist dashboard` does."""
    with tempfile.TemporaryDirectory(prefix="projectionist-dash-") as tmp:
        home = Path(tmp)
        config = Config(home=home, rules_path=REPO / "rules.yaml", datasette_metadata=metadata)
        config.ensure_dirs()
        _seed(config)
        env = datasette_env(config)
        # These tests send wrong credentials on purpose, hundreds of times from one address; the
        # login throttle has its own tests (tests/security/test_dashboard_guard.py).
        env[LIMIT_ENV] = "1000000/60"
        DYNAMIC.update({"dashboard password": admin_password(config),
                        "dashboard password hash": env[PASSWORD_HASH_ENV].rsplit("$", 1)[-1]})
        anonymous = requests.Session()
        anonymous.trust_env = False  # never through a proxy from the environment
        try:
            with load_bench("dashboard").running_dashboard(home, metadata, timeout=15, env=env) as (base, session):
                yield Dashboard(base, session, config, anonymous)
        finally:
            anonymous.close()


@pytest.fixture(scope="module")
def dashboard():
    with _running_dashboard(REPO / "datasette_metadata.yml") as running:
        yield running


def _leaks(response: requests.Response, *, username_allowed: bool = False) -> list[str]:
    """Which secrets (or their markers) appear in this response or any redirect before it."""
    found = []
    for r in (*response.history, response):
        text = r.content.decode("utf-8", "replace")
        headers = "\n".join(f"{k}: {v}" for k, v in r.headers.items())
        for where, blob in (("body", text), ("headers", headers)):
            for name, value in SECRETS.items():
                if value in blob or MARKERS[name] in blob:
                    found.append(f"{r.request.method} {r.url} -> {r.status_code}: {name} in {where}")
            for name, value in DYNAMIC.items():
                if value in blob or value.lower() in blob.lower():
                    found.append(f"{r.request.method} {r.url} -> {r.status_code}: {name} in {where}")
            if "zq5ecret" in blob and not (username_allowed and "zq5ecretname" in blob
                                           and blob.count("zq5ecret") == blob.count("zq5ecretname")):
                found.append(f"{r.request.method} {r.url} -> {r.status_code}: a secret marker in {where}")
            if not username_allowed and "zq5ecretname" in blob:
                found.append(f"{r.request.method} {r.url} -> {r.status_code}: username in {where}")
    return found


def q(sql: str) -> str:
    return urllib.parse.quote(sql, safe="")


def qj(value: dict) -> str:
    return urllib.parse.quote(json.dumps(value), safe="")


# Queries never contain a secret literally, so an error page echoing the query is no false alarm.
SQL_ATTEMPTS = [
    "select email, plex_account_id, thumb from users",
    "select id_hash, csrf_hash, user_agent, ip from sessions",
    "select preferences, watchlist_provider from user_settings",
    "select u.email, s.id_hash from usage_events e join users u on u.id = e.user_id "
    "join sessions s on s.user_id = u.id",
    "select group_concat(email) || group_concat(username) from users",
]

# Denied tables: every representation, row pages included. (The sessions "row" uses a made-up
# key: the permission check comes first, and a real id_hash in the URL could be echoed back.)
DENIED_PATHS = []
for _table, _pk in (("sessions", "not-a-real-session"), ("users", str(USER_ID)),
                    ("user_settings", str(USER_ID)), ("vault_tokens", "1"), ("user_credentials", f"{USER_ID},tmdb")):
    DENIED_PATHS += [
        f"/{DB}/{_table}/{_pk}.blob?_blob_column=secret_enc", f"/{DB}/{_table}/{_pk}.blob?_blob_column=surrogate_enc",
        f"/{DB}/{_table}", f"/{DB}/{_table}.json", f"/{DB}/{_table}.csv",
        f"/{DB}/{_table}.csv?_stream=on&_dl=1",  # CSV streaming is off: 400 before the permission check
        f"/{DB}/{_table}.json?_shape=array&_size=max",
        f"/{DB}/{_table}.json?_shape=objects&_labels=on", f"/{DB}/{_table}?_facet=user_id",
        f"/{DB}/{_table}/{_pk}", f"/{DB}/{_table}/{_pk}.json", f"/{DB}/{_table}/{_pk}.json?_shape=objects",
    ]
DENIED_PATHS += [
    # arbitrary SQL is off, in every format, and --crossdb's _memory is not there
    *(f"/{DB}?sql={q(sql)}" for sql in SQL_ATTEMPTS),
    *(f"/{DB}.json?sql={q(sql)}" for sql in SQL_ATTEMPTS),
    *(f"/{DB}.csv?sql={q(sql)}&_dl=1" for sql in SQL_ATTEMPTS),
    f"/{DB}.json?sql={q('select 1')}&_shape=array",
    f"/_memory.json?sql={q('select 1')}",
    # _where= is SQL too: refused even on visible tables, with a subquery into a denied table
    f"/{DB}/usage_events.json?_where={q('user_id in (select id from users where email like ' + chr(39) + '%@%' + chr(39) + ')')}",
    f"/{DB}/usage_events.json?_where={q('0')}",
    f"/{DB}/user_directory.json?_where={q('id in (select user_id from sessions)')}",
    f"/{DB}/rate_limit_events.csv?_where={q('1')}",
    # _through= into a denied table
    f"/{DB}/usage_events.json?_through={qj({'table': 'sessions', 'column': 'csrf_hash', 'value': 'x'})}",
    f"/{DB}/users.json?_through={qj({'table': 'sessions', 'column': 'csrf_hash', 'value': 'x'})}",
    # the whole file
    f"/{DB}.db",
    # canned queries are SELECTs of their own: ?sql= does not replace them, SQL stays off
    f"/{DB}.json?sql={q('select surrogate_hash from vault_tokens')}",
    f"/_memory.json?sql=overview",
]
# The dashboard home's ?sql=NAME runs the canned query NAME: only that, only as JSON, only once.
# Anything else is SQL that Datasette refuses, as "not a SELECT" (400) before the permission check.
NOT_SELECT_PATHS = [
    f"/{DB}.json?sql=overview&sql={q('select email from users')}", f"/{DB}.csv?sql=overview", f"/{DB}?sql=overview",
    f"/{DB}.json?sql=users", f"/{DB}.json?sql=vault_tokens", f"/{DB}.json?sql=user_directory",
    f"/{DB}.json?sql={q(' overview')}",
]
DENIED_PATHS += NOT_SELECT_PATHS

# Allowed (or harmlessly rejected) requests that still must not leak anything.
PROBE_PATHS = [
    "/", "/.json", f"/{DB}", f"/{DB}.json", "/-/metadata.json", "/-/databases.json", "/-/settings.json",
    "/-/versions.json", "/-/plugins.json", "/-/threads.json", "/-/actor.json", "/-/config.json",
    "/-/permissions", "/-/messages", "/-/allow-debug", "/-/patterns",
    # facets on visible tables aimed at the users table behind the foreign key
    f"/{DB}/usage_events.json?_facet=user_id", f"/{DB}/usage_events?_facet=user_id",
    f"/{DB}/usage_events.json?_facet={qj({'simple': 'user_id'})}",
    f"/{DB}/usage_events.json?_facet=email", f"/{DB}/usage_events.json?_facet={q('users.email')}",
    f"/{DB}/usage_events.json?_facet={q('user_id.email')}", f"/{DB}/usage_events.json?_facet_array=user_id",
    f"/{DB}/rate_limit_events.json?_facet=user_id", f"/{DB}/usage_hourly.json?_facet=user_id",
    # foreign-key label expansion of user_id (label_column must keep username and e-mail out)
    f"/{DB}/usage_events.json?_labels=on", f"/{DB}/usage_events.json?_label=user_id",
    f"/{DB}/usage_events.json?_labels=on&_shape=objects", f"/{DB}/usage_events?_labels=on",
    f"/{DB}/usage_events.csv?_labels=on", f"/{DB}/usage_events.csv?_label=user_id",
    f"/{DB}/usage_events?_sort=user_id", f"/{DB}/usage_events/1", f"/{DB}/usage_events/1.json",
    f"/{DB}/usage_events/1.json?_labels=on", f"/{DB}/rate_limit_events?_labels=on",
    f"/{DB}/rate_limit_events.json?_labels=on", f"/{DB}/rate_limit_events.csv?_labels=on",
    f"/{DB}/rate_limit_events/1", f"/{DB}/usage_events.json?user_id={USER_ID}&_labels=on",
    # columns that do not exist in visible tables
    f"/{DB}/usage_events.json?_col=email", f"/{DB}/user_directory.json?_col=email",
    f"/{DB}/user_directory.json?email__contains=a", f"/{DB}/user_directory.json?_sort=email",
    # debugging aids are off (template_debug, trace_debug)
    f"/{DB}/usage_events?_context=1", f"/{DB}/usage_events.json?_trace=1&_labels=on",
    # sqlite's own tables
    f"/{DB}/sqlite_master", f"/{DB}/sqlite_master.json", f"/{DB}/schema_migrations.json",
    # the analytics tables and their foreign keys to users
    f"/{DB}/plays.json?_labels=on", f"/{DB}/plays?_labels=on", f"/{DB}/plays.json?_facet=user_id",
    f"/{DB}/plays/1.json?_labels=on", f"/{DB}/plays.csv?_labels=on", f"/{DB}/media_items.json",
    f"/{DB}/credential_hourly.json?_facet=user_id", f"/{DB}/rate_limit_hourly.json?_facet=user_id",
    f"/{DB}/play_history.json?_facet=username", f"/{DB}/user_activity.json", f"/{DB}/play_history.csv",
    f"/{DB}/usage_hourly.json?_col=email", f"/{DB}/play_history.json?_where={q('1')}",
    # static files and plugin pages
    "/-/static/app.css", "/-/password-tool", "/-/login", "/favicon.ico",
    # the dashboard home (datasette-dashboards), with crafted filters
    "/-/dashboards", "/-/dashboards/home", "/-/dashboards/home/embed", "/-/dashboards/home/top-titles",
    f"/-/dashboards/home?user={q(chr(39) + ' OR 1=1 --')}&since=x&until=&upstream=",
    f"/-/dashboards/home?sql={q('select email from users')}", "/-/dashboards/users", "/-/dashboards/home/users",
    f"/-/dashboards/home/top-users?user={q('(select email from users)')}",
]


def test_denied_resources_are_refused_and_leak_nothing(dashboard):
    problems = []
    for path in DENIED_PATHS:
        response = dashboard.get(path)
        problems += _leaks(response)
        refused = (400, 403, 404) if "_stream=on" in path or path in NOT_SELECT_PATHS else (403, 404)
        if response.status_code not in refused:
            problems.append(f"GET {path} -> {response.status_code}, expected {refused}: "
                            f"{response.text[:200]!r}")
    assert not problems, "\n".join(problems)


def test_denied_resources_are_refused_on_post_too(dashboard):
    problems = []
    for path in (f"/{DB}", f"/{DB}.json", f"/{DB}/users", f"/{DB}/sessions.json"):
        response = dashboard.session.post(dashboard.base + path, data={"sql": SQL_ATTEMPTS[0]}, timeout=10)
        problems += _leaks(response)
        if response.status_code < 400:
            problems.append(f"POST {path} -> {response.status_code}")
    assert not problems, "\n".join(problems)


def test_no_route_leaks_a_secret(dashboard):
    problems = []
    for path in PROBE_PATHS:
        # (Some of these are rejected, a few with Datasette's own 500 "Cannot sort table by email":
        # what matters here is that no answer carries a secret.)
        response = dashboard.get(path)
        # (The dashboard home's user filter lists the usernames of user_directory.)
        problems += _leaks(response, username_allowed=path.startswith(
            (*(f"/{DB}/{v}" for v in SHOWS_USERNAMES), "/-/dashboards/")))
    assert not problems, "\n".join(problems)


def test_sql_is_off(dashboard):
    for path in (f"/{DB}?sql={q('select 1')}", f"/{DB}.json?sql={q('select 1')}"):
        response = dashboard.get(path)
        assert response.status_code == 403, (path, response.status_code, response.text[:300])
    database = dashboard.get(f"/{DB}.json").json()
    assert database.get("allow_execute_sql") is False, database.get("allow_execute_sql")
    settings = dashboard.get("/-/settings.json").json()
    assert settings["default_allow_sql"] is False and settings["allow_download"] is False, settings


def test_database_download_is_refused(dashboard):
    response = dashboard.get(f"/{DB}.db")
    assert response.status_code in (403, 404), response.status_code
    assert not response.content.startswith(b"SQLite format 3"), "the database file was served"
    assert dashboard.get(f"/{DB}.json").json().get("allow_download") in (False, None)


def test_database_page_does_not_list_denied_tables(dashboard):
    database = dashboard.get(f"/{DB}.json").json()
    listed = {t["name"] for t in database["tables"]} | {v["name"] for v in database.get("views", [])}
    assert not listed & set(DENIED), listed
    assert set(VISIBLE) <= listed, listed
    html = dashboard.get(f"/{DB}").text
    for table in DENIED:
        assert f'href="/{DB}/{table}"' not in html, f"/{DB} links to denied table {table}"
    index = dashboard.get("/.json").json()
    tables = {t["name"] for t in index[DB].get("tables_and_views_truncated", [])}
    assert not tables & set(DENIED), tables


def test_visible_tables_answer_json(dashboard):
    for table in VISIBLE:
        response = dashboard.get(f"/{DB}/{table}.json?_shape=objects")
        assert response.status_code == 200, (table, response.status_code, response.text[:300])
        assert response.headers["content-type"].startswith("application/json")
        rows = response.json()["rows"]
        assert rows, f"{table}: no rows"
        assert not _leaks(response, username_allowed=table in SHOWS_USERNAMES)


def test_user_directory_shows_users_without_email(dashboard):
    response = dashboard.get(f"/{DB}/user_directory.json?_shape=objects")
    assert response.status_code == 200
    rows = {row["id"]: row for row in response.json()["rows"]}
    assert rows[USER_ID]["username"] == USERNAME
    assert "email" not in rows[USER_ID], rows[USER_ID]
    for path in (f"/{DB}/user_directory", f"/{DB}/user_directory.csv", f"/{DB}/user_directory.json"):
        response = dashboard.get(path)
        assert response.status_code == 200, (path, response.status_code)
        assert not _leaks(response, username_allowed=True)


def test_label_expansion_shows_only_the_user_id(dashboard):
    for table in ("usage_events", "rate_limit_events", "plays"):
        response = dashboard.get(f"/{DB}/{table}.json?_labels=on&_shape=objects&user_id={USER_ID}")
        assert response.status_code == 200, (table, response.status_code, response.text[:300])
        rows = response.json()["rows"]
        assert rows, table
        assert "user_id" in response.json()["expanded_columns"], "the label expansion was not exercised"
        for row in rows:
            # Expanded through the foreign key to users, the label may only be the id.
            assert row["user_id"] == {"value": USER_ID, "label": USER_ID}, row["user_id"]
    facet = dashboard.get(f"/{DB}/usage_events.json?_facet=user_id").json()
    results = facet["facet_results"]["user_id"]["results"]
    assert {str(r["label"]) for r in results} <= {str(USER_ID), "7"}, results


def _queries() -> dict:
    """Every canned query: the metadata's and the plugins' own (projectionist/dashboard_live.py)."""
    from projectionist.live_activity import DASHBOARD_QUERIES

    return {**yaml.safe_load((REPO / "datasette_metadata.yml").read_text())["databases"][DB]["queries"],
            **DASHBOARD_QUERIES}


# Parameter values an attacker would try: SQL in every parameter, a denied table's name, huge and odd values.
CRAFTED = [
    {"since": "' OR 1=1 --", "until": "9999", "upstream": "x' UNION SELECT email FROM users --",
     "user": "1) OR 1=1 --"},
    {"user": "x' UNION SELECT id_hash FROM sessions --", "upstream": "tmdb'; DROP TABLE plays; --"},
    {"user": f"{USER_ID} OR 1=1", "since": "0", "until": "datetime('now')"},
    {"user": "%", "upstream": "%", "since": "1970-01-01", "until": "2999-01-01"},
    {"since": "x" * 5000, "user": "\x00'\"", "upstream": "🎬"},
]
# Datasette's own request options, aimed at the canned query's SQL and at the store.
OPTIONS = [
    "", f"sql={q('select email from users')}", f"_where={q('1=1) UNION SELECT email FROM users --')}",
    "_shape=objects&_json=sql", "_size=max&_timelimit=1", "_sort=email&_facet=user_id&_labels=on",
    f"_through={qj({'table': 'sessions', 'column': 'id_hash', 'value': 'x'})}",
]


def test_canned_queries_with_crafted_parameters_leak_nothing(dashboard):
    problems = []
    for name in _queries():
        for crafted in CRAFTED:
            for option in OPTIONS:
                for suffix in ("", ".json", ".csv"):
                    query = urllib.parse.urlencode(crafted) + (f"&{option}" if option else "")
                    response = dashboard.get(f"/{DB}/{name}{suffix}?{query}")
                    problems += _leaks(response, username_allowed=True)
                    if response.status_code not in (200, 400):
                        problems.append(f"{name}{suffix}?{query[:80]} -> {response.status_code}")
    assert not problems, "\n".join(problems[:50])
    # Nothing was dropped or written: the store is as seeded.
    tables = dashboard.get(f"/{DB}.json").json()["tables"]
    assert {"plays", "usage_events"} <= {t["name"] for t in tables}
    assert dashboard.get(f"/{DB}/plays.json").json()["rows"]


def test_canned_queries_answer_with_their_rows(dashboard):
    """With default parameters and with the seeded user selected, each query runs; the per-user
    filter matches the username or the id."""
    for name in _queries():
        for params in ("", f"?user={USER_ID}", f"?user={q(USERNAME)}", "?upstream=tmdb"):
            response = dashboard.get(f"/{DB}/{name}.json?_shape=array" + params.replace("?", "&"))
            assert response.status_code == 200, (name, params, response.text[:300])
            assert not _leaks(response, username_allowed=True)
    rows = dashboard.get(f"/{DB}/usage_per_user.json?_shape=array").json()
    assert any(r["user"] == USERNAME and r["requests"] >= 6 for r in rows), rows
    keys = dashboard.get(f"/{DB}/tmdb_key_usage.json?_shape=array&user={USER_ID}").json()
    assert {r["credential"] for r in keys} == {"default", "custom"}, keys
    plays = dashboard.get(f"/{DB}/top_titles.json?_shape=array").json()
    assert plays and plays[0]["title"] == "The Matrix", plays


def test_dashboard_home_charts_run_as_their_canned_queries_and_sql_stays_off(dashboard):
    """datasette-dashboards fetches `/<db>.json?sql=<chart query>`: each chart names a canned
    query and gets exactly that query's rows; its page renders only while SQL stays off for
    everything else, right after it too."""
    home = yaml.safe_load((REPO / "datasette_metadata.yml").read_text())["plugins"]["datasette-dashboards"]["home"]
    page = dashboard.get("/-/dashboards/home")
    assert page.status_code == 200 and not _leaks(page, username_allowed=True)
    for slug, chart in home["charts"].items():
        response = dashboard.get(f"/{DB}.json?sql={chart['query']}&_shape=objects&user={USER_ID}&since=&until=")
        assert response.status_code == 200, (slug, response.text[:300])
        assert response.json()["query_name"] == chart["query"]
        own = dashboard.get(f"/{DB}/{chart['query']}.json?_shape=objects&user={USER_ID}&since=&until=")
        assert response.json()["rows"] == own.json()["rows"]
        assert not _leaks(response, username_allowed=True)
    for path in (f"/{DB}.json?sql={q('select 1')}", f"/{DB}?sql={q('select 1')}",
                 f"/{DB}/usage_events.json?_where={q('1')}"):
        assert dashboard.get(path).status_code == 403, path


def test_unauthenticated_clients_get_nothing(dashboard):
    """No credentials, wrong ones or another user's name: 401 and a body that says only that."""
    paths = ["/", "/.json", f"/{DB}", f"/{DB}.json", f"/{DB}.db", f"/{DB}/usage_events.json",
             f"/{DB}/user_directory.json", f"/{DB}/play_history.csv", *(f"/{DB}/{name}.json" for name in _queries()),
             "/-/versions.json", "/-/metadata.json", "/-/plugins.json", "/-/settings.json", "/-/actor.json",
             "/-/static/app.css", "/-/static-plugins/datasette_vega/", "/-/login", "/-/password-tool",
             "/favicon.ico", "/robots.txt", *DENIED_PATHS[:20], *PROBE_PATHS]
    wrong = [None, (ADMIN_USER, "not-the-password"), ("root", admin_password(dashboard.config)),
             (ADMIN_USER, ""), ("", "")]
    problems = []
    for path in paths:
        for auth in wrong:
            for method in ("GET", "POST", "HEAD"):
                response = dashboard.anonymous.request(method, dashboard.base + path, auth=auth, timeout=10,
                                                       data={"sql": SQL_ATTEMPTS[0]} if method == "POST" else None)
                body = response.content
                if response.status_code != 401 or (method != "HEAD" and body != b"401 Authorization Required"):
                    problems.append(f"{method} {path} as {auth and auth[0]!r} -> {response.status_code} {body[:100]!r}")
                problems += _leaks(response)
    assert not problems, "\n".join(problems[:40])
    # A malformed Authorization header is refused too, not an error page.
    for header in ("Basic", "Basic !!!", "Bearer x", "Basic " + base64.b64encode(b"admin").decode()):
        response = dashboard.anonymous.get(dashboard.base + "/", headers={"Authorization": header}, timeout=10)
        assert response.status_code in (400, 401), (header, response.status_code)
        assert not _leaks(response)


def test_the_admin_gets_in_with_the_password_from_the_config_dir(dashboard):
    path = password_path(dashboard.config)
    assert path.stat().st_mode & 0o777 == 0o600
    assert dashboard.session.get(dashboard.base + "/-/actor.json", timeout=10).json() == {
        "actor": {"id": ADMIN_USER, "name": "Projectionist admin"}}
    # Nothing about the password reaches Datasette's visible configuration.
    for path in ("/-/metadata.json", "/-/plugins.json", "/-/settings.json"):
        assert not _leaks(dashboard.get(path))


@pytest.mark.parametrize("edit, problem", [
    (lambda m: m.update(allow_sql=True), "allow_sql must be false"),
    (lambda m: m["databases"][DB].update(allow_sql=True), f"databases.{DB}.allow_sql must be false"),
    (lambda m: m["databases"][DB]["tables"].pop("sessions"), "tables.sessions holds secrets"),
    (lambda m: m["databases"][DB]["tables"]["users"].update(allow=True), "tables.users holds secrets"),
    (lambda m: m["plugins"]["datasette-auth-passwords"].pop("http_basic_auth"), "http_basic_auth must be false"),
    # Its own gate knows only the password and would lock the admins' Plex sessions out.
    (lambda m: m["plugins"]["datasette-auth-passwords"].update(http_basic_auth=True), "http_basic_auth must be false"),
    (lambda m: m.pop("allow"), "allow must be {id: admin}"),
    (lambda m: m["plugins"]["datasette-auth-passwords"].update(guest_password_hash="pbkdf2_sha256$1$a$b"),
     "only the admin account"),
    (lambda m: m["databases"][DB]["queries"].update(leak={"sql": "select email from users"}),
     "queries.leak reads users"),
    (lambda m: m["databases"][DB]["queries"].update(leak="SELECT * FROM [vault_tokens]"),
     "queries.leak reads vault_tokens"),
    (lambda m: m["databases"][DB]["queries"].update(w={"sql": "delete from plays", "write": True}),
     "queries.w must not write"),
    (lambda m: m["plugins"]["datasette-dashboards"]["home"]["charts"]["top-users"].update(
        query="select email from users"), "home.charts.top-users must have db: projectionist and a query that names"),
    (lambda m: m["plugins"]["datasette-dashboards"]["home"]["filters"]["user"].update(
        query="select email from users"), "home.filters.user reads users"),
])
def test_dashboard_refuses_metadata_that_would_expose_secrets(tmp_path, edit, problem):
    """Datasette consults metadata `allow_sql` before `default_allow_sql`, so an edit could turn
    arbitrary SQL back on: the dashboard command refuses to start on such metadata."""
    metadata = yaml.safe_load((REPO / "datasette_metadata.yml").read_text())
    edit(metadata)
    edited = tmp_path / "datasette_metadata.yml"
    edited.write_text(yaml.safe_dump(metadata))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROJECTIONIST_")}
    env.update(PROJECTIONIST_HOME=str(tmp_path), PROJECTIONIST_DATASETTE_METADATA=str(edited),
               PROJECTIONIST_DASHBOARD_PORT="1")  # never bound: it must refuse first
    result = subprocess.run([sys.executable, "-m", "launcher", "dashboard"], env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "refusing to serve the dashboard" in result.stderr and problem in result.stderr, result.stderr
