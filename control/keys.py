"""The control plane app's typed keys (`app[KEY]`), in one place so every module can import them."""

from __future__ import annotations

import asyncio
import sqlite3
from typing import TYPE_CHECKING

import aiohttp
from aiohttp import web

from projectionist.config import Config

if TYPE_CHECKING:  # only for the annotations: these modules import this one
    pass

CONFIG = web.AppKey("config", Config)
DB = web.AppKey("db", sqlite3.Connection)  # read-mostly queries (health, statistics), under DB_LOCK
DB_LOCK = web.AppKey("db_lock", asyncio.Lock)
OPTIONS = web.AppKey("options", "ControlOptions")
VAULT = web.AppKey("vault", "VaultExecutor")  # identity, sessions, settings, secrets: one worker thread
HTTP = web.AppKey("http", aiohttp.ClientSession)  # to plex.tv and TMDB
UPSTREAMS = web.AppKey("upstreams", "Upstreams")
AUTH_RATE_LIMITER = web.AppKey("auth_rate_limiter", "RateLimiter")
OPERATIONS = web.AppKey("operations", "list[Operation]")
PLEX_CLIENT_ID = web.AppKey("plex_client_id", str)
LIVE_RULES = web.AppKey("live_rules", "LiveRules")  # rules.yaml, re-read when it changes
UPSTREAM_HEALTH = web.AppKey("upstream_health", "UpstreamHealth")
