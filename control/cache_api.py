"""Cache administration API: /api/cache/stats, /api/cache/flush, /api/cache/keys (issue: response cache)."""

from __future__ import annotations

from aiohttp import web

routes = web.RouteTableDef()
