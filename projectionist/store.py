"""The SQLite store: schema, numbered migrations, connections, and the batched usage writer.

This module is the only owner of the schema. Every process (proxy, control plane, CLI, tests) opens
the database through `open_db()`, which applies pending migrations. Migrations run inside
`BEGIN IMMEDIATE`, so when two processes start at once the second waits on the busy timeout, then
sees the migrations already applied and does nothing.

Hot paths never write to SQLite themselves: they hand rows to a `UsageWriter`, whose thread
commits them in batches (every ~100 ms or `batch_size` rows) and keeps the hourly rollup current.
"""

from __future__ import annotations

import logging
import os
import queue
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import sqlite_utils

from .metrics import USAGE_ROWS_DROPPED, USAGE_ROWS_WRITTEN

log = logging.getLogger(__name__)

BUSY_TIMEOUT_MS = 10_000
# cache_flush_requests (target 'warm', value: the trigger) the library-sync job files when the Plex
# library changed: the proxy then fetches its signed-in accounts' Plex lists afresh.
WARM_AFTER_LIBRARY_CHANGE = "library-change"

# Append only: a released migration is never edited, a change is a new entry.
MIGRATIONS: tuple[tuple[int, str, str], ...] = (
    (
        1,
        "initial schema",
        """
        CREATE TABLE users (
            id INTEGER PRIMARY KEY,
            plex_account_id TEXT UNIQUE,
            username TEXT NOT NULL,
            email TEXT,
            thumb TEXT,
            is_admin INTEGER NOT NULL DEFAULT 0,
            created_at TEXT NOT NULL,
            last_seen_at TEXT
        );
        -- Session ids are stored only as hashes: the table leaks nothing usable.
        CREATE TABLE sessions (
            id_hash TEXT PRIMARY KEY,
            user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
            csrf_hash TEXT,
            created_at TEXT NOT NULL,
            expires_at TEXT NOT NULL,
            last_seen_at TEXT,
            revoked_at TEXT,
            user_agent TEXT,
            ip TEXT
        );
        CREATE INDEX sessions_user ON sessions(user_id);
        CREATE TABLE user_settings (
            user_id INTEGER PRIMARY KEY REFERENCES users(id) ON DELETE CASCADE,
            preferences TEXT NOT NULL DEFAULT '{}',
            watchlist_provider TEXT,
            updated_at TEXT NOT NULL
        );
        CREATE TABLE cache_entries (
            key_hash TEXT PRIMARY KEY,
            bucket TEXT NOT NULL,
            route TEXT NOT NULL,
            scope TEXT NOT NULL,
            size INTEGER NOT NULL,
            created_at REAL NOT NULL,
            expires_at REAL,
            hits INTEGER NOT NULL DEFAULT 0,
            last_hit_at REAL
        );
        CREATE INDEX cache_entries_route ON cache_entries(bucket, route);
        CREATE TABLE usage_events (
            id INTEGER PRIMARY KEY,
            ts REAL NOT NULL,
            listener TEXT NOT NULL,
            upstream TEXT NOT NULL,
            route TEXT NOT NULL,
            method TEXT NOT NULL,
            status INTEGER,
            latency_ms REAL,
            bytes_in INTEGER NOT NULL DEFAULT 0,
            bytes_out INTEGER NOT NULL DEFAULT 0,
            cache TEXT NOT NULL DEFAULT 'none',
            user_id INTEGER REFERENCES users(id) ON DELETE SET NULL,
            credential TEXT,
            error TEXT
        );
        CREATE INDEX usage_events_ts ON usage_events(ts);
        CREATE INDEX usage_events_user_ts ON usage_events(user_id, ts);
        CREATE TABLE rate_limit_events (
            id INTEGER PRIMARY KEY,
            ts REAL NOT NULL,
            user_id INTEGER REFERENCES users(id) ON DELETE SET NULL,
            client TEXT,
            upstream TEXT,
            rule TEXT NOT NULL,
            waited_ms REAL NOT NULL DEFAULT 0,
            outcome TEXT NOT NULL
        );
        CREATE INDEX rate_limit_events_ts ON rate_limit_events(ts);
        -- Maintained by UsageWriter in the same transaction as the rows it summarises.
        -- user_id 0 stands for "no known user" so that it can be part of the key.
        CREATE TABLE usage_hourly (
            hour TEXT NOT NULL,
            upstream TEXT NOT NULL,
            route TEXT NOT NULL,
            user_id INTEGER NOT NULL DEFAULT 0,
            requests INTEGER NOT NULL DEFAULT 0,
            errors INTEGER NOT NULL DEFAULT 0,
            bytes_out INTEGER NOT NULL DEFAULT 0,
            cache_hits INTEGER NOT NULL DEFAULT 0,
            cache_misses INTEGER NOT NULL DEFAULT 0,
            cache_stale INTEGER NOT NULL DEFAULT 0,
            latency_ms_sum REAL NOT NULL DEFAULT 0,
            latency_ms_max REAL NOT NULL DEFAULT 0,
            PRIMARY KEY (hour, upstream, route, user_id)
        );
        -- What the dashboard may show of users: no e-mail, nothing secret.
        CREATE VIEW user_directory AS
            SELECT id, username, is_admin, created_at, last_seen_at FROM users;
        """,
    ),
    (
        2,
        "token vault and per-user credentials",
        """
        -- Real upstream tokens, encrypted; clients only ever hold the surrogate. The surrogate is
        -- stored hashed (for look-up) and encrypted (to hand the same one out again); real_hmac is
        -- a keyed hash of the real token, to recognise it when a client presents it again.
        CREATE TABLE vault_tokens (
            id INTEGER PRIMARY KEY,
            kind TEXT NOT NULL,
            user_id INTEGER REFERENCES users(id) ON DELETE CASCADE,
            surrogate_hash TEXT NOT NULL UNIQUE,
            surrogate_enc BLOB NOT NULL,
            real_hmac TEXT NOT NULL,
            secret_enc BLOB NOT NULL,
            server_id TEXT,
            created_at TEXT NOT NULL,
            expires_at TEXT,
            revoked_at TEXT
        );
        CREATE INDEX vault_tokens_real ON vault_tokens(real_hmac, kind);
        CREATE INDEX vault_tokens_user ON vault_tokens(user_id);
        CREATE TABLE user_credentials (
            user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
            name TEXT NOT NULL,
            secret_enc BLOB NOT NULL,
            updated_at TEXT NOT NULL,
            PRIMARY KEY (user_id, name)
        );
        """,
    ),
    (
        3,
        "control plane: sign-in flows, Plex servers per user, server identity",
        """
        -- Sign-ins in progress: a Plex PIN (bound to the browser that started it by a hashed
        -- nonce cookie) or a Trakt device code (bound to the signed-in user). The PIN code and
        -- the device code are encrypted; external_id is the PIN id or a hash of the device code.
        CREATE TABLE auth_flows (
            id INTEGER PRIMARY KEY,
            kind TEXT NOT NULL,
            external_id TEXT NOT NULL,
            binding_hash TEXT,
            user_id INTEGER REFERENCES users(id) ON DELETE CASCADE,
            secret_enc BLOB,
            created_at TEXT NOT NULL,
            expires_at TEXT NOT NULL,
            completed_at TEXT,
            UNIQUE (kind, external_id)
        );
        CREATE INDEX auth_flows_expiry ON auth_flows(expires_at);
        -- The Plex servers a user picked (names and URLs; their tokens live in the vault).
        ALTER TABLE user_settings ADD COLUMN plex_servers TEXT NOT NULL DEFAULT '[]';
        -- Values the control plane keeps about itself, e.g. its stable Plex client identifier.
        CREATE TABLE control_state (
            name TEXT PRIMARY KEY,
            value TEXT NOT NULL
        );
        """,
    ),
    (
        4,
        "analytics: richer hourly rollups, latency histogram, viewing history",
        """
        -- What the dashboard charts, kept per hour/upstream/route/user by UsageWriter: 4xx and 429
        -- answers, bytes in, bytes answered from the cache (the upstream did not send them), and a
        -- cumulative latency histogram: lat_le_N = requests answered within N ms, out of
        -- latency_count timed ones. Sums of any group of rows stay a histogram, so p50/p95 of an
        -- upstream, a route or a user over any time range are interpolated from it (see
        -- projectionist/analytics.py) without touching usage_events.
        ALTER TABLE usage_hourly ADD COLUMN client_errors INTEGER NOT NULL DEFAULT 0;
        ALTER TABLE usage_hourly ADD COLUMN rate_limited INTEGER NOT NULL DEFAULT 0;
        ALTER TABLE usage_hourly ADD COLUMN bytes_in INTEGER NOT NULL DEFAULT 0;
        ALTER TABLE usage_hourly ADD COLUMN cache_bytes INTEGER NOT NULL DEFAULT 0;
        ALTER TABLE usage_hourly ADD COLUMN latency_count INTEGER NOT NULL DEFAULT 0;
        ALTER TABLE usage_hourly ADD COLUMN lat_le_1 INTEGER NOT NULL DEFAULT 0;
        ALTER TABLE usage_hourly ADD COLUMN lat_le_2 INTEGER NOT NULL DEFAULT 0;
        ALTER TABLE usage_hourly ADD COLUMN lat_le_5 INTEGER NOT NULL DEFAULT 0;
        ALTER TABLE usage_hourly ADD COLUMN lat_le_10 INTEGER NOT NULL DEFAULT 0;
        ALTER TABLE usage_hourly ADD COLUMN lat_le_25 INTEGER NOT NULL DEFAULT 0;
        ALTER TABLE usage_hourly ADD COLUMN lat_le_50 INTEGER NOT NULL DEFAULT 0;
        ALTER TABLE usage_hourly ADD COLUMN lat_le_100 INTEGER NOT NULL DEFAULT 0;
        ALTER TABLE usage_hourly ADD COLUMN lat_le_250 INTEGER NOT NULL DEFAULT 0;
        ALTER TABLE usage_hourly ADD COLUMN lat_le_500 INTEGER NOT NULL DEFAULT 0;
        ALTER TABLE usage_hourly ADD COLUMN lat_le_1000 INTEGER NOT NULL DEFAULT 0;
        ALTER TABLE usage_hourly ADD COLUMN lat_le_2500 INTEGER NOT NULL DEFAULT 0;
        ALTER TABLE usage_hourly ADD COLUMN lat_le_5000 INTEGER NOT NULL DEFAULT 0;
        ALTER TABLE usage_hourly ADD COLUMN lat_le_10000 INTEGER NOT NULL DEFAULT 0;
        -- Which kind of credential was injected (default / custom / vault / client), per hour.
        CREATE TABLE credential_hourly (
            hour TEXT NOT NULL,
            upstream TEXT NOT NULL,
            credential TEXT NOT NULL,
            user_id INTEGER NOT NULL DEFAULT 0,
            requests INTEGER NOT NULL DEFAULT 0,
            errors INTEGER NOT NULL DEFAULT 0,
            rate_limited INTEGER NOT NULL DEFAULT 0,
            PRIMARY KEY (hour, upstream, credential, user_id)
        );
        -- Queued/refused requests per hour, kept by a trigger whoever writes rate_limit_events.
        CREATE TABLE rate_limit_hourly (
            hour TEXT NOT NULL,
            upstream TEXT NOT NULL,
            rule TEXT NOT NULL,
            outcome TEXT NOT NULL,
            user_id INTEGER NOT NULL DEFAULT 0,
            events INTEGER NOT NULL DEFAULT 0,
            waited_ms_sum REAL NOT NULL DEFAULT 0,
            waited_ms_max REAL NOT NULL DEFAULT 0,
            PRIMARY KEY (hour, upstream, rule, outcome, user_id)
        );
        INSERT INTO rate_limit_hourly (hour, upstream, rule, outcome, user_id, events, waited_ms_sum, waited_ms_max)
            SELECT strftime('%Y-%m-%dT%H:00', ts, 'unixepoch'), coalesce(upstream, ''), rule, outcome,
                   coalesce(user_id, 0), count(*), sum(waited_ms), max(waited_ms)
            FROM rate_limit_events GROUP BY 1, 2, 3, 4, 5;
        CREATE TRIGGER rate_limit_events_rollup AFTER INSERT ON rate_limit_events BEGIN
            INSERT INTO rate_limit_hourly (hour, upstream, rule, outcome, user_id, events, waited_ms_sum, waited_ms_max)
            VALUES (strftime('%Y-%m-%dT%H:00', NEW.ts, 'unixepoch'), coalesce(NEW.upstream, ''), NEW.rule,
                    NEW.outcome, coalesce(NEW.user_id, 0), 1, NEW.waited_ms, NEW.waited_ms)
            ON CONFLICT (hour, upstream, rule, outcome, user_id) DO UPDATE SET
                events = events + 1,
                waited_ms_sum = waited_ms_sum + excluded.waited_ms_sum,
                waited_ms_max = max(waited_ms_max, excluded.waited_ms_max);
        END;
        -- Viewing history, derived from the player's timeline/scrobble traffic
        -- (proxy_addons/viewing_history.py). Titles come from the metadata answers that pass.
        CREATE TABLE media_items (
            rating_key TEXT PRIMARY KEY,
            type TEXT,
            title TEXT,
            grandparent_title TEXT,
            parent_index INTEGER,
            item_index INTEGER,
            year INTEGER,
            duration_ms INTEGER,
            updated_at REAL NOT NULL
        );
        -- One row per play session. client_hash tells a user's devices apart (a hash of the client
        -- identifier, never the identifier); no transcode session id, no token.
        CREATE TABLE plays (
            id INTEGER PRIMARY KEY,
            user_id INTEGER REFERENCES users(id) ON DELETE SET NULL,
            rating_key TEXT NOT NULL,
            player TEXT,
            client_hash TEXT,
            source TEXT NOT NULL DEFAULT 'timeline',
            started_at REAL NOT NULL,
            last_seen_at REAL NOT NULL,
            stopped_at REAL,
            state TEXT NOT NULL,
            position_ms INTEGER,
            duration_ms INTEGER,
            watched_ms INTEGER NOT NULL DEFAULT 0,
            paused_ms INTEGER NOT NULL DEFAULT 0,
            watched INTEGER NOT NULL DEFAULT 0
        );
        CREATE INDEX plays_started ON plays(started_at);
        CREATE INDEX plays_user ON plays(user_id, started_at);
        CREATE INDEX plays_open ON plays(stopped_at, last_seen_at);
        CREATE VIEW play_history AS
            SELECT p.id, p.user_id, coalesce(u.username, '(unknown)') AS username,
                   coalesce(CASE WHEN m.type = 'episode'
                                 THEN coalesce(m.grandparent_title, '?') || ' - S' || coalesce(m.parent_index, '?')
                                      || 'E' || coalesce(m.item_index, '?') || ' - ' || coalesce(m.title, '')
                                 ELSE m.title || coalesce(' (' || m.year || ')', '') END,
                            'item ' || p.rating_key) AS title,
                   m.type AS media_type, p.player, p.source,
                   datetime(p.started_at, 'unixepoch') AS started_utc,
                   datetime(coalesce(p.stopped_at, p.last_seen_at), 'unixepoch') AS ended_utc,
                   p.stopped_at IS NULL AS active, p.state,
                   round(p.watched_ms / 60000.0, 1) AS watched_min,
                   round(p.paused_ms / 60000.0, 1) AS paused_min,
                   CASE WHEN p.duration_ms > 0 THEN round(100.0 * p.position_ms / p.duration_ms) END AS progress_pct,
                   p.watched, p.rating_key
            FROM plays p
            LEFT JOIN user_directory u ON u.id = p.user_id
            LEFT JOIN media_items m ON m.rating_key = p.rating_key;
        -- Per user, all time: usage and viewing, nothing from users but the directory's columns.
        CREATE VIEW user_activity AS
            WITH h AS (
                SELECT user_id, sum(requests) AS requests, sum(errors) AS errors, sum(bytes_out) AS bytes_out,
                       sum(cache_hits) AS hits, sum(cache_hits + cache_misses + cache_stale) AS lookups,
                       max(hour) AS last_hour
                FROM usage_hourly GROUP BY user_id),
            p AS (
                SELECT user_id, count(*) AS plays, sum(watched_ms) AS watched_ms, max(started_at) AS last_play
                FROM plays WHERE source = 'timeline' GROUP BY user_id)
            SELECT u.id AS user_id, u.username, u.is_admin, u.created_at, u.last_seen_at,
                   coalesce(h.requests, 0) AS requests, coalesce(h.errors, 0) AS errors,
                   round(coalesce(h.bytes_out, 0) / 1048576.0, 1) AS mb_out,
                   CASE WHEN h.lookups > 0 THEN round(100.0 * h.hits / h.lookups, 1) END AS cache_hit_pct,
                   h.last_hour AS last_request_hour,
                   coalesce(p.plays, 0) AS plays, round(coalesce(p.watched_ms, 0) / 3600000.0, 2) AS watch_hours,
                   datetime(p.last_play, 'unixepoch') AS last_play_utc
            FROM user_directory u
            LEFT JOIN h ON h.user_id = u.id
            LEFT JOIN p ON p.user_id = u.id;
        """,
    ),
    (
        5,
        "response cache administration",
        """
        -- Which partition an entry belongs to ("shared" or "u<user id>"): flush and invalidation
        -- select on it. Never a URL, never a token.
        ALTER TABLE cache_entries ADD COLUMN partition TEXT NOT NULL DEFAULT 'shared';
        -- The control plane asks, the proxy (which owns the memory layer) carries out.
        CREATE TABLE cache_flush_requests (
            id INTEGER PRIMARY KEY,
            target TEXT NOT NULL,
            value TEXT,
            requested_at TEXT NOT NULL,
            requested_by INTEGER REFERENCES users(id) ON DELETE SET NULL,
            applied_at TEXT,
            flushed INTEGER
        );
        CREATE TABLE cache_evictions (
            bucket TEXT NOT NULL,
            route TEXT NOT NULL,
            evictions INTEGER NOT NULL DEFAULT 0,
            PRIMARY KEY (bucket, route)
        );
        """,
    ),
    (
        6,
        "image cache: bytes saved by re-encoding",
        """
        -- Per hour and image route (proxy_addons/image_cache.py): answers that carried a body,
        -- what the upstream's originals of those answers weigh (source_bytes), what was sent
        -- (bytes_sent) and the difference that re-encoding and resizing saved (bytes_saved).
        CREATE TABLE cache_savings_hourly (
            hour TEXT NOT NULL,
            bucket TEXT NOT NULL,
            route TEXT NOT NULL,
            responses INTEGER NOT NULL DEFAULT 0,
            source_bytes INTEGER NOT NULL DEFAULT 0,
            bytes_sent INTEGER NOT NULL DEFAULT 0,
            bytes_saved INTEGER NOT NULL DEFAULT 0,
            PRIMARY KEY (hour, bucket, route)
        );
        """,
    ),
    (
        7,
        "scheduled jobs: run history and leases",
        """
        -- One row per run of a scheduled job (control/jobs.py): what ran, when, how it ended, how
        -- many items it handled. error is redacted text, never a secret. deadline_at: a run still
        -- 'running' past it died with its process.
        CREATE TABLE job_runs (
            id INTEGER PRIMARY KEY,
            job TEXT NOT NULL,
            trigger TEXT NOT NULL,
            started_at REAL NOT NULL,
            ended_at REAL,
            deadline_at REAL NOT NULL,
            status TEXT NOT NULL,
            items INTEGER,
            error TEXT
        );
        CREATE INDEX job_runs_job ON job_runs(job, started_at);
        -- Single-instance leases of jobs across processes (when no Redis is configured).
        CREATE TABLE job_locks (
            job TEXT PRIMARY KEY,
            owner TEXT NOT NULL,
            expires_at REAL NOT NULL
        );
        """,
    ),
    (
        8,
        "library sync: guids, added/updated times, section and server of media items",
        """
        -- Filled by the control plane's library-sync job (control/library.py) from each Plex
        -- server's sections; the proxy's viewing history keeps writing the columns it knows.
        ALTER TABLE media_items ADD COLUMN guids TEXT;  -- JSON list: tmdb://603, imdb://tt0133093, ...
        ALTER TABLE media_items ADD COLUMN added_at REAL;
        ALTER TABLE media_items ADD COLUMN plex_updated_at REAL;
        ALTER TABLE media_items ADD COLUMN section TEXT;
        ALTER TABLE media_items ADD COLUMN server TEXT;
        CREATE INDEX media_items_plex_updated ON media_items(server, section, plex_updated_at);
        """,
    ),
    (
        9,
        "history import: the origin's id of imported plays",
        """
        -- Plays imported from a Plex server's history or a user's Trakt history (control/history.py)
        -- carry their origin's id: unique per source, so an import never adds a play twice.
        -- Timeline plays have none (NULLs never collide in a unique index).
        ALTER TABLE plays ADD COLUMN external_id TEXT;
        CREATE UNIQUE INDEX plays_external ON plays(source, external_id);
        """,
    ),
    (
        10,
        "dashboard sign-in failures per hour",
        """
        -- Counted by the dashboard's login throttle (projectionist/dashboard_guard.py): no address,
        -- no user name, only how many attempts failed and how many started a lock-out.
        CREATE TABLE dashboard_login_failures (
            hour TEXT PRIMARY KEY,
            failures INTEGER NOT NULL DEFAULT 0,
            lockouts INTEGER NOT NULL DEFAULT 0
        );
        """,
    ),
    (
        11,
        "cache: why each miss happened",
        """
        -- Why a request was not a fresh cache hit, as its Cache-Status said (RFC 9211 fwd and
        -- detail): "uri-miss:new-partition", "stale:expired", "bypass:no-rule", ... NULL for hits.
        ALTER TABLE usage_events ADD COLUMN cache_reason TEXT;
        -- The same per hour, upstream, route and reason (UsageWriter, with the rows): the
        -- dashboard's "misses by reason and route" reads this, never usage_events.
        CREATE TABLE cache_reason_hourly (
            hour TEXT NOT NULL,
            upstream TEXT NOT NULL,
            route TEXT NOT NULL,
            reason TEXT NOT NULL,
            requests INTEGER NOT NULL DEFAULT 0,
            PRIMARY KEY (hour, upstream, route, reason)
        );
        """,
    ),
    (
        12,
        "recommendations per user",
        """
        -- Written by the recommendations job (control/recommendations.py): what to watch next, in
        -- order, and the titles the user watched that led to each.
        CREATE TABLE recommendations (
            user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
            position INTEGER NOT NULL,
            media_type TEXT NOT NULL,
            tmdb_id INTEGER NOT NULL,
            title TEXT NOT NULL,
            year INTEGER,
            score REAL NOT NULL,
            because TEXT NOT NULL DEFAULT '[]',
            refreshed_at REAL NOT NULL,
            PRIMARY KEY (user_id, position)
        );
        """,
    ),
    (
        13,
        "admission: disabled users, granted admins, refused sign-ins",
        """
        -- Set by an admin (control/admin.py): a disabled user cannot sign in, and their sessions
        -- and surrogates were revoked when it was set. admin_granted: made admin by an admin.
        ALTER TABLE users ADD COLUMN disabled_at TEXT;
        ALTER TABLE users ADD COLUMN admin_granted INTEGER NOT NULL DEFAULT 0;
        -- Sign-ins refused by admission (control/admission.py), per hour and reason
        -- (not_shared, not_allowed, disabled, no_server): counts only, no account.
        CREATE TABLE sign_in_refusals (
            hour TEXT NOT NULL,
            reason TEXT NOT NULL,
            refusals INTEGER NOT NULL DEFAULT 0,
            PRIMARY KEY (hour, reason)
        );
        """,
    ),
    (
        14,
        "token health: dead vaulted tokens and their events",
        """
        -- Set by the token-health job (control/token_health.py) when plex.tv or Trakt refused the
        -- real token: its surrogates no longer resolve (401 without reaching the upstream) until
        -- the token is vaulted again by a fresh sign-in.
        ALTER TABLE vault_tokens ADD COLUMN invalid_at TEXT;
        -- What the job found and what healed it: no token, no hash, only whose and which kind.
        CREATE TABLE token_health_events (
            id INTEGER PRIMARY KEY,
            ts TEXT NOT NULL,
            user_id INTEGER REFERENCES users(id) ON DELETE CASCADE,
            kind TEXT NOT NULL,
            event TEXT NOT NULL
        );
        CREATE INDEX token_health_events_ts ON token_health_events(ts);
        """,
    ),
    (
        15,
        "watchlist sync: the per-user opt-in, the last-synced snapshot, and every change",
        """
        -- off | on | dry-run (control/watchlist.py): whether the watchlist-sync job mirrors this
        -- user's Plex and Trakt watchlists, and whether it only says what it would change.
        ALTER TABLE user_settings ADD COLUMN watchlist_sync TEXT NOT NULL DEFAULT 'off';
        -- What was on both watchlists after the user's last real sync: an item missing on one side
        -- since then was removed there (not added on the other). listed_at: each side's date then.
        CREATE TABLE watchlist_sync_items (
            user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
            item TEXT NOT NULL,
            media_type TEXT NOT NULL,
            title TEXT,
            guids TEXT NOT NULL DEFAULT '[]',
            plex_key TEXT,
            plex_listed_at REAL,
            trakt_listed_at REAL,
            synced_at REAL NOT NULL,
            PRIMARY KEY (user_id, item)
        );
        -- One row per change the job made (or, dry_run = 1, would have made).
        CREATE TABLE watchlist_sync_events (
            id INTEGER PRIMARY KEY,
            ts TEXT NOT NULL,
            user_id INTEGER REFERENCES users(id) ON DELETE CASCADE,
            direction TEXT NOT NULL,
            action TEXT NOT NULL,
            media_type TEXT NOT NULL,
            title TEXT,
            guids TEXT NOT NULL DEFAULT '[]',
            dry_run INTEGER NOT NULL DEFAULT 0,
            outcome TEXT NOT NULL
        );
        CREATE INDEX watchlist_sync_events_ts ON watchlist_sync_events(ts);
        """,
    ),
    (
        16,
        "dashboard home: usage_daily (a daily rollup of usage_hourly), misses by reason index-only",
        """
        -- The dashboard home's charts (per day, or totals over a range of days) read a day in one
        -- row per upstream, route and user instead of 24: at 1M requests over 14 days, ~4k rows
        -- instead of ~68k. Kept by triggers on usage_hourly, in the same transaction as the hourly
        -- row, whoever writes it. latency_ms_max is the day's maximum (never lowered).
        CREATE TABLE usage_daily (
            day TEXT NOT NULL,
            upstream TEXT NOT NULL,
            route TEXT NOT NULL,
            user_id INTEGER NOT NULL DEFAULT 0,
            requests INTEGER NOT NULL DEFAULT 0,
            errors INTEGER NOT NULL DEFAULT 0,
            bytes_out INTEGER NOT NULL DEFAULT 0,
            cache_hits INTEGER NOT NULL DEFAULT 0,
            cache_misses INTEGER NOT NULL DEFAULT 0,
            cache_stale INTEGER NOT NULL DEFAULT 0,
            latency_ms_sum REAL NOT NULL DEFAULT 0,
            latency_ms_max REAL NOT NULL DEFAULT 0,
            client_errors INTEGER NOT NULL DEFAULT 0,
            rate_limited INTEGER NOT NULL DEFAULT 0,
            bytes_in INTEGER NOT NULL DEFAULT 0,
            cache_bytes INTEGER NOT NULL DEFAULT 0,
            latency_count INTEGER NOT NULL DEFAULT 0,
            lat_le_1 INTEGER NOT NULL DEFAULT 0,
            lat_le_2 INTEGER NOT NULL DEFAULT 0,
            lat_le_5 INTEGER NOT NULL DEFAULT 0,
            lat_le_10 INTEGER NOT NULL DEFAULT 0,
            lat_le_25 INTEGER NOT NULL DEFAULT 0,
            lat_le_50 INTEGER NOT NULL DEFAULT 0,
            lat_le_100 INTEGER NOT NULL DEFAULT 0,
            lat_le_250 INTEGER NOT NULL DEFAULT 0,
            lat_le_500 INTEGER NOT NULL DEFAULT 0,
            lat_le_1000 INTEGER NOT NULL DEFAULT 0,
            lat_le_2500 INTEGER NOT NULL DEFAULT 0,
            lat_le_5000 INTEGER NOT NULL DEFAULT 0,
            lat_le_10000 INTEGER NOT NULL DEFAULT 0,
            PRIMARY KEY (day, upstream, route, user_id)
        ) WITHOUT ROWID;
        INSERT INTO usage_daily (day, upstream, route, user_id,
                 requests, errors, bytes_out, cache_hits, cache_misses, cache_stale, latency_ms_sum,
                 latency_ms_max, client_errors, rate_limited, bytes_in, cache_bytes, latency_count,
                 lat_le_1, lat_le_2, lat_le_5, lat_le_10, lat_le_25, lat_le_50, lat_le_100,
                 lat_le_250, lat_le_500, lat_le_1000, lat_le_2500, lat_le_5000, lat_le_10000)
            SELECT substr(hour, 1, 10), upstream, route, user_id,
                   sum(requests), sum(errors), sum(bytes_out), sum(cache_hits), sum(cache_misses),
                   sum(cache_stale), sum(latency_ms_sum), max(latency_ms_max), sum(client_errors),
                   sum(rate_limited), sum(bytes_in), sum(cache_bytes), sum(latency_count),
                   sum(lat_le_1), sum(lat_le_2), sum(lat_le_5), sum(lat_le_10), sum(lat_le_25),
                   sum(lat_le_50), sum(lat_le_100), sum(lat_le_250), sum(lat_le_500),
                   sum(lat_le_1000), sum(lat_le_2500), sum(lat_le_5000), sum(lat_le_10000)
            FROM usage_hourly GROUP BY substr(hour, 1, 10), upstream, route, user_id;
        CREATE TRIGGER usage_hourly_daily_insert AFTER INSERT ON usage_hourly BEGIN
            INSERT INTO usage_daily (day, upstream, route, user_id,
                 requests, errors, bytes_out, cache_hits, cache_misses, cache_stale, latency_ms_sum,
                 latency_ms_max, client_errors, rate_limited, bytes_in, cache_bytes, latency_count,
                 lat_le_1, lat_le_2, lat_le_5, lat_le_10, lat_le_25, lat_le_50, lat_le_100,
                 lat_le_250, lat_le_500, lat_le_1000, lat_le_2500, lat_le_5000, lat_le_10000)
            VALUES (substr(NEW.hour, 1, 10), NEW.upstream, NEW.route, NEW.user_id,
                    NEW.requests, NEW.errors, NEW.bytes_out, NEW.cache_hits, NEW.cache_misses,
                    NEW.cache_stale, NEW.latency_ms_sum, NEW.latency_ms_max, NEW.client_errors,
                    NEW.rate_limited, NEW.bytes_in, NEW.cache_bytes, NEW.latency_count,
                    NEW.lat_le_1, NEW.lat_le_2, NEW.lat_le_5, NEW.lat_le_10, NEW.lat_le_25,
                    NEW.lat_le_50, NEW.lat_le_100, NEW.lat_le_250, NEW.lat_le_500, NEW.lat_le_1000,
                    NEW.lat_le_2500, NEW.lat_le_5000, NEW.lat_le_10000)
            ON CONFLICT (day, upstream, route, user_id) DO UPDATE SET
                requests = requests + excluded.requests, errors = errors + excluded.errors,
                bytes_out = bytes_out + excluded.bytes_out,
                cache_hits = cache_hits + excluded.cache_hits,
                cache_misses = cache_misses + excluded.cache_misses,
                cache_stale = cache_stale + excluded.cache_stale,
                latency_ms_sum = latency_ms_sum + excluded.latency_ms_sum,
                latency_ms_max = max(latency_ms_max, excluded.latency_ms_max),
                client_errors = client_errors + excluded.client_errors,
                rate_limited = rate_limited + excluded.rate_limited,
                bytes_in = bytes_in + excluded.bytes_in,
                cache_bytes = cache_bytes + excluded.cache_bytes,
                latency_count = latency_count + excluded.latency_count,
                lat_le_1 = lat_le_1 + excluded.lat_le_1, lat_le_2 = lat_le_2 + excluded.lat_le_2,
                lat_le_5 = lat_le_5 + excluded.lat_le_5, lat_le_10 = lat_le_10 + excluded.lat_le_10,
                lat_le_25 = lat_le_25 + excluded.lat_le_25,
                lat_le_50 = lat_le_50 + excluded.lat_le_50,
                lat_le_100 = lat_le_100 + excluded.lat_le_100,
                lat_le_250 = lat_le_250 + excluded.lat_le_250,
                lat_le_500 = lat_le_500 + excluded.lat_le_500,
                lat_le_1000 = lat_le_1000 + excluded.lat_le_1000,
                lat_le_2500 = lat_le_2500 + excluded.lat_le_2500,
                lat_le_5000 = lat_le_5000 + excluded.lat_le_5000,
                lat_le_10000 = lat_le_10000 + excluded.lat_le_10000;
        END;
        CREATE TRIGGER usage_hourly_daily_update AFTER UPDATE ON usage_hourly BEGIN
            UPDATE usage_daily SET
                requests = requests + NEW.requests - OLD.requests,
                errors = errors + NEW.errors - OLD.errors,
                bytes_out = bytes_out + NEW.bytes_out - OLD.bytes_out,
                cache_hits = cache_hits + NEW.cache_hits - OLD.cache_hits,
                cache_misses = cache_misses + NEW.cache_misses - OLD.cache_misses,
                cache_stale = cache_stale + NEW.cache_stale - OLD.cache_stale,
                latency_ms_sum = latency_ms_sum + NEW.latency_ms_sum - OLD.latency_ms_sum,
                latency_ms_max = max(latency_ms_max, NEW.latency_ms_max),
                client_errors = client_errors + NEW.client_errors - OLD.client_errors,
                rate_limited = rate_limited + NEW.rate_limited - OLD.rate_limited,
                bytes_in = bytes_in + NEW.bytes_in - OLD.bytes_in,
                cache_bytes = cache_bytes + NEW.cache_bytes - OLD.cache_bytes,
                latency_count = latency_count + NEW.latency_count - OLD.latency_count,
                lat_le_1 = lat_le_1 + NEW.lat_le_1 - OLD.lat_le_1,
                lat_le_2 = lat_le_2 + NEW.lat_le_2 - OLD.lat_le_2,
                lat_le_5 = lat_le_5 + NEW.lat_le_5 - OLD.lat_le_5,
                lat_le_10 = lat_le_10 + NEW.lat_le_10 - OLD.lat_le_10,
                lat_le_25 = lat_le_25 + NEW.lat_le_25 - OLD.lat_le_25,
                lat_le_50 = lat_le_50 + NEW.lat_le_50 - OLD.lat_le_50,
                lat_le_100 = lat_le_100 + NEW.lat_le_100 - OLD.lat_le_100,
                lat_le_250 = lat_le_250 + NEW.lat_le_250 - OLD.lat_le_250,
                lat_le_500 = lat_le_500 + NEW.lat_le_500 - OLD.lat_le_500,
                lat_le_1000 = lat_le_1000 + NEW.lat_le_1000 - OLD.lat_le_1000,
                lat_le_2500 = lat_le_2500 + NEW.lat_le_2500 - OLD.lat_le_2500,
                lat_le_5000 = lat_le_5000 + NEW.lat_le_5000 - OLD.lat_le_5000,
                lat_le_10000 = lat_le_10000 + NEW.lat_le_10000 - OLD.lat_le_10000
            WHERE day = substr(NEW.hour, 1, 10) AND upstream = NEW.upstream AND route = NEW.route
              AND user_id = NEW.user_id;
        END;
        CREATE TRIGGER usage_hourly_daily_delete AFTER DELETE ON usage_hourly BEGIN
            UPDATE usage_daily SET
                requests = requests - OLD.requests, errors = errors - OLD.errors,
                bytes_out = bytes_out - OLD.bytes_out, cache_hits = cache_hits - OLD.cache_hits,
                cache_misses = cache_misses - OLD.cache_misses,
                cache_stale = cache_stale - OLD.cache_stale,
                latency_ms_sum = latency_ms_sum - OLD.latency_ms_sum,
                client_errors = client_errors - OLD.client_errors,
                rate_limited = rate_limited - OLD.rate_limited, bytes_in = bytes_in - OLD.bytes_in,
                cache_bytes = cache_bytes - OLD.cache_bytes,
                latency_count = latency_count - OLD.latency_count,
                lat_le_1 = lat_le_1 - OLD.lat_le_1, lat_le_2 = lat_le_2 - OLD.lat_le_2,
                lat_le_5 = lat_le_5 - OLD.lat_le_5, lat_le_10 = lat_le_10 - OLD.lat_le_10,
                lat_le_25 = lat_le_25 - OLD.lat_le_25, lat_le_50 = lat_le_50 - OLD.lat_le_50,
                lat_le_100 = lat_le_100 - OLD.lat_le_100, lat_le_250 = lat_le_250 - OLD.lat_le_250,
                lat_le_500 = lat_le_500 - OLD.lat_le_500,
                lat_le_1000 = lat_le_1000 - OLD.lat_le_1000,
                lat_le_2500 = lat_le_2500 - OLD.lat_le_2500,
                lat_le_5000 = lat_le_5000 - OLD.lat_le_5000,
                lat_le_10000 = lat_le_10000 - OLD.lat_le_10000
            WHERE day = substr(OLD.hour, 1, 10) AND upstream = OLD.upstream AND route = OLD.route
              AND user_id = OLD.user_id;
        END;
        -- "Misses by reason" sums requests over a range of hours: from the index alone (no row
        -- lookups), about 2x faster at 1M requests.
        CREATE INDEX cache_reason_hourly_covering ON cache_reason_hourly(hour, upstream, route, reason, requests);
        """,
    ),
    (
        17,
        "usage_daily_forgets_empty_days",
        """
        -- An hourly row deleted (retention) left its day's row at zero when it was the day's last
        -- one: a row the hourly table no longer has, shown as an empty group. Every hourly row
        -- counts at least one request, so a day's row at zero requests has no hourly row left.
        CREATE TRIGGER usage_daily_forget_empty AFTER UPDATE OF requests ON usage_daily
        WHEN NEW.requests <= 0 BEGIN
            DELETE FROM usage_daily WHERE day = NEW.day AND upstream = NEW.upstream AND route = NEW.route
              AND user_id = NEW.user_id;
        END;
        DELETE FROM usage_daily WHERE requests <= 0;
        """,
    ),
)

SCHEMA_VERSION = max(version for version, _, _ in MIGRATIONS)

# Tables holding secrets, hashes of secrets or personal data: the dashboard must deny them.
# A migration that adds such a table adds it here too.
SECRET_TABLES: tuple[str, ...] = ("users", "sessions", "user_settings", "vault_tokens", "user_credentials",
                                  "auth_flows", "control_state")


def connect(path: Path | str) -> sqlite3.Connection:
    """A connection with the pragmas every user of the store needs (WAL, FKs, busy timeout)."""
    conn = sqlite3.connect(str(path), timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None,
                           check_same_thread=False)
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    conn.execute("PRAGMA foreign_keys = ON")
    _enable_wal(conn)
    conn.execute("PRAGMA synchronous = NORMAL")  # with WAL: no corruption, commits survive a crash of the process
    return conn


def database_id(path: Path | str) -> str:
    """This database's random identity (`control_state` 'database_id'), made on first use. Users are
    numbered per database: processes sharing a Redis but not a database must never take user 3 of
    one for user 3 of the other (projectionist/shared_tier.py keys users' entries by it)."""
    conn = connect(path)
    try:
        conn.execute("INSERT OR IGNORE INTO control_state (name, value) VALUES ('database_id', ?)",
                     (secrets.token_hex(8),))
        return conn.execute("SELECT value FROM control_state WHERE name = 'database_id'").fetchone()[0]
    finally:
        conn.close()


def _enable_wal(conn: sqlite3.Connection) -> None:
    """WAL is persistent in the file. Switching to it takes a lock that SQLite does not retry on
    its busy handler, so processes creating the file at once retry here."""
    deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            if conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal":
                return
            conn.execute("PRAGMA journal_mode = WAL")
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


PRE_MIGRATION_KEPT = 5  # snapshots of backups/pre-migration-*.db kept


def migrate(conn: sqlite3.Connection) -> int:
    """Apply pending migrations; returns the schema version. Safe to call from racing processes.
    A database that has data and pending migrations is first copied to backups/ (a migration that
    goes wrong, or a release rolled back, leaves the previous database at hand)."""
    conn.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations "
        "(version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at TEXT NOT NULL)"
    )
    current = {row[0] for row in conn.execute("SELECT version FROM schema_migrations")}
    if current and any(version not in current for version, _, _ in MIGRATIONS):
        snapshot_before_migrating(conn, max(current))
    conn.execute("BEGIN IMMEDIATE")
    try:
        applied = {row[0] for row in conn.execute("SELECT version FROM schema_migrations")}
        for version, name, sql in sorted(MIGRATIONS):
            if version in applied:
                continue
            log.info("applying migration %d: %s", version, name)
            # executescript would COMMIT our transaction; run statement by statement instead.
            for statement in _split_sql(sql):
                conn.execute(statement)
            conn.execute(
                "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)",
                (version, name, utcnow_iso()),
            )
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return schema_version(conn)


def snapshot_before_migrating(conn: sqlite3.Connection, version: int) -> Path | None:
    """Copy the database (SQLite's online backup API) to backups/pre-migration-v<N>-<time>.db."""
    path = conn.execute("PRAGMA database_list").fetchone()[2]
    if not path:  # in memory
        return None
    directory = Path(path).parent / "backups"
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / f"pre-migration-v{version}-{datetime.now(UTC).strftime('%Y%m%dT%H%M%S%fZ')}.db"
    copy = sqlite3.connect(str(target))
    try:
        conn.backup(copy)
        copy.execute("PRAGMA journal_mode = DELETE")
    finally:
        copy.close()
    os.chmod(target, 0o600)  # it holds what the database holds
    for old in sorted(directory.glob("pre-migration-v*.db"), key=lambda p: p.stat().st_mtime)[:-PRE_MIGRATION_KEPT]:
        old.unlink(missing_ok=True)
    log.info("database copied to %s before migrating from version %d", target, version)
    return target


def schema_version(conn: sqlite3.Connection) -> int:
    row = conn.execute("SELECT max(version) FROM schema_migrations").fetchone()
    return row[0] or 0


def open_db(path: Path | str) -> sqlite_utils.Database:
    """Open (creating and migrating if needed) the store at `path`."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    conn = connect(path)
    migrate(conn)
    return sqlite_utils.Database(conn)


def utcnow_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _split_sql(script: str) -> Iterable[str]:
    statement = ""
    for line in script.splitlines(keepends=True):
        if line.strip().startswith("--"):
            continue
        statement += line
        if sqlite3.complete_statement(statement):
            if statement.strip():
                yield statement.strip()
            statement = ""
    if statement.strip():
        raise ValueError(f"incomplete SQL statement in migration: {statement!r}")


# --- usage -----------------------------------------------------------------------------------------

USAGE_COLUMNS = (
    "ts", "listener", "upstream", "route", "method", "status", "latency_ms",
    "bytes_in", "bytes_out", "cache", "user_id", "credential", "error", "cache_reason",
)


@dataclass(slots=True)
class UsageEvent:
    """One proxied request, as recorded. Holds no URL and no header: nothing here can be a secret."""

    ts: float
    listener: str
    upstream: str
    route: str
    method: str
    status: int | None
    latency_ms: float | None
    bytes_in: int = 0
    bytes_out: int = 0
    cache: str = "none"
    user_id: int | None = None
    credential: str | None = None
    error: str | None = None
    cache_reason: str | None = None

    def as_row(self) -> tuple:
        return tuple(getattr(self, c) for c in USAGE_COLUMNS)


_INSERT_USAGE = (
    f"INSERT INTO usage_events ({', '.join(USAGE_COLUMNS)}) "
    f"VALUES ({', '.join('?' for _ in USAGE_COLUMNS)})"
)
# Upper bounds (ms) of the cumulative latency histogram in usage_hourly (lat_le_N columns, migration 4).
LATENCY_BOUNDS_MS: tuple[int, ...] = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000)
_HOURLY_COLUMNS = (
    "requests", "errors", "bytes_out", "cache_hits", "cache_misses", "cache_stale", "latency_ms_sum",
    "latency_ms_max", "client_errors", "rate_limited", "bytes_in", "cache_bytes", "latency_count",
    *(f"lat_le_{b}" for b in LATENCY_BOUNDS_MS),
)
_UPSERT_HOURLY = (
    f"INSERT INTO usage_hourly (hour, upstream, route, user_id, {', '.join(_HOURLY_COLUMNS)}) "
    f"VALUES (?, ?, ?, ?, {', '.join('?' for _ in _HOURLY_COLUMNS)}) "
    "ON CONFLICT (hour, upstream, route, user_id) DO UPDATE SET "
    + ", ".join(f"{c} = max({c}, excluded.{c})" if c == "latency_ms_max" else f"{c} = {c} + excluded.{c}"
                for c in _HOURLY_COLUMNS)
)
_UPSERT_CREDENTIAL = """
INSERT INTO credential_hourly (hour, upstream, credential, user_id, requests, errors, rate_limited)
VALUES (?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (hour, upstream, credential, user_id) DO UPDATE SET
    requests = requests + excluded.requests,
    errors = errors + excluded.errors,
    rate_limited = rate_limited + excluded.rate_limited
"""


def _is_error(e: UsageEvent) -> bool:
    return bool(e.error or (e.status or 0) >= 500 or e.status is None)


def hourly_rollup(events: Iterable[UsageEvent]) -> list[tuple]:
    """Summarise events into usage_hourly rows (one per hour/upstream/route/user)."""
    from bisect import bisect_left

    buckets: dict[tuple, list] = {}
    n_bounds = len(LATENCY_BOUNDS_MS)
    hours: dict[int, str] = {}
    for e in events:
        hour_ts = int(e.ts // 3600)
        hour = hours.get(hour_ts)
        if hour is None:
            hour = hours[hour_ts] = datetime.fromtimestamp(hour_ts * 3600, UTC).strftime("%Y-%m-%dT%H:00")
        key = (hour, e.upstream, e.route, e.user_id or 0)
        b = buckets.get(key)
        if b is None:
            b = buckets[key] = [0, 0, 0, 0, 0, 0, 0.0, 0.0, 0, 0, 0, 0, 0] + [0] * (n_bounds + 1)
        status = e.status or 0
        b[0] += 1
        b[1] += _is_error(e)
        b[2] += e.bytes_out
        b[3] += e.cache == "hit"
        b[4] += e.cache == "miss"
        b[5] += e.cache == "stale"
        b[6] += e.latency_ms or 0.0
        b[7] = max(b[7], e.latency_ms or 0.0)
        b[8] += 400 <= status < 500
        b[9] += status == 429
        b[10] += e.bytes_in
        b[11] += e.bytes_out if e.cache in ("hit", "stale") else 0
        if e.latency_ms is not None:
            b[12] += 1
            b[13 + bisect_left(LATENCY_BOUNDS_MS, e.latency_ms)] += 1  # per bucket; cumulated below
    rows = []
    for key, b in buckets.items():
        cumulative, running = [], 0
        for count in b[13:13 + n_bounds]:
            running += count
            cumulative.append(running)
        rows.append(key + tuple(b[:13]) + tuple(cumulative))
    return rows


_UPSERT_CACHE_REASON = """
INSERT INTO cache_reason_hourly (hour, upstream, route, reason, requests) VALUES (?, ?, ?, ?, ?)
ON CONFLICT (hour, upstream, route, reason) DO UPDATE SET requests = requests + excluded.requests
"""


def cache_reason_rollup(events: Iterable[UsageEvent]) -> list[tuple]:
    """cache_reason_hourly rows: requests per hour/upstream/route/reason (those with a reason)."""
    counts: dict[tuple, int] = {}
    for e in events:
        if e.cache_reason:
            key = (datetime.fromtimestamp(e.ts, UTC).strftime("%Y-%m-%dT%H:00"), e.upstream, e.route, e.cache_reason)
            counts[key] = counts.get(key, 0) + 1
    return [key + (n,) for key, n in counts.items()]


def credential_rollup(events: Iterable[UsageEvent]) -> list[tuple]:
    """credential_hourly rows: requests per hour/upstream/credential kind/user (credentialed ones only)."""
    buckets: dict[tuple, list] = {}
    for e in events:
        if not e.credential:
            continue
        hour = datetime.fromtimestamp(e.ts, UTC).strftime("%Y-%m-%dT%H:00")
        b = buckets.setdefault((hour, e.upstream, e.credential, e.user_id or 0), [0, 0, 0])
        b[0] += 1
        b[1] += _is_error(e)
        b[2] += e.status == 429
    return [key + tuple(v) for key, v in buckets.items()]


class UsageWriter:
    """Commits usage rows in batches from its own thread, so a slow disk never slows a request.

    `record()` only appends to a queue. The thread flushes every `interval` seconds or as soon as
    `batch_size` rows are waiting; `close()` flushes whatever is left. A failed write (the database
    locked for longer than the busy timeout, a full disk, a read-only file) keeps the rows and
    retries, warning at most once a minute; past `max_pending` rows the oldest are dropped and
    counted (projectionist_usage_rows_dropped), never a crash.

    Durability (issue 16 case 6): rows are queued before the answer goes out and committed within
    `interval` (50 ms) plus one commit; WAL with synchronous=NORMAL keeps every commit through a
    crash of the process, so `kill -9` loses at most the rows of the last ~interval, a clean stop none.
    """

    WARN_EVERY = 60.0  # seconds between two warnings about failing writes

    def __init__(self, db_path: Path | str, *, interval: float = 0.05, batch_size: int = 500,
                 max_pending: int = 100_000):
        self.db_path = Path(db_path)
        self.interval = interval
        self.batch_size = batch_size
        self.max_pending = max_pending
        self.written = 0
        self.dropped = 0
        self._warned_at = -self.WARN_EVERY
        self._failures = 0
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="usage-writer", daemon=True)
        self._started = False

    def start(self) -> UsageWriter:
        if not self._started:
            self._started = True
            self._thread.start()
        return self

    def record(self, event: UsageEvent) -> None:
        self._queue.put(event)
        if self._queue.qsize() >= self.batch_size:  # a burst: flush now, not at the interval
            self._wake.set()

    def close(self, timeout: float = 10.0) -> None:
        if self._started and self._thread.is_alive():
            self._closing = True
            self._wake.set()
            self._thread.join(timeout)

    def _run(self) -> None:
        conn = connect(self.db_path)
        pending: list[UsageEvent] = []
        try:
            while True:
                # Woken once per interval (or per full batch), not once per row: a thread woken for
                # every row takes the GIL from the event loop thousands of times a second.
                self._wake.wait(self.interval)
                self._wake.clear()
                stopping = self._closing
                pending.extend(_drain(self._queue))
                while pending:
                    batch = pending[:self.batch_size]
                    if not self._write_or_warn(conn, batch):
                        break
                    del pending[:len(batch)]
                    self.written += len(batch)
                    USAGE_ROWS_WRITTEN.inc(len(batch))
                    self._failures = 0
                if len(pending) > self.max_pending:  # the database has been failing for a while
                    excess = len(pending) - self.max_pending
                    del pending[:excess]
                    self.dropped += excess
                    USAGE_ROWS_DROPPED.inc(excess)
                if stopping:
                    break
            if pending:  # the last try, on shutdown, failed
                USAGE_ROWS_DROPPED.inc(len(pending))
                log.error("usage writer: %d rows could not be written at shutdown", len(pending))
        finally:
            conn.close()

    def _write_or_warn(self, conn: sqlite3.Connection, events: list) -> bool:
        """One try; a failure is warned about at most once a minute (a full disk fails every batch)."""
        cause: object = "see the debug log"
        try:
            if self._write(conn, events):
                self._failures = 0
                return True
        except sqlite3.Error as exc:
            cause = exc
            if conn.in_transaction:
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
        self._failures += 1
        now = time.monotonic()
        if now - self._warned_at >= self.WARN_EVERY:
            self._warned_at = now
            log.warning("%s: %d rows not written yet (%s); keeping up to %d in memory and retrying",
                        type(self).__name__, len(events), cause, self.max_pending)
        time.sleep(min(1.0, self.interval * self._failures))  # back off while it keeps failing
        return False

    @staticmethod
    def _write(conn: sqlite3.Connection, events: list[UsageEvent]) -> bool:
        try:
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany(_INSERT_USAGE, [e.as_row() for e in events])
            conn.executemany(_UPSERT_HOURLY, hourly_rollup(events))
            conn.executemany(_UPSERT_CREDENTIAL, credential_rollup(events))
            conn.executemany(_UPSERT_CACHE_REASON, cache_reason_rollup(events))
            conn.execute("COMMIT")
            return True
        except sqlite3.Error:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise  # _write_or_warn warns (once a minute) and retries


def _drain(q: queue.SimpleQueue) -> list:
    items = []
    while True:
        try:
            items.append(q.get_nowait())
        except queue.Empty:
            return items

