"""The settings page: one static HTML page with its script and style, talking to the JSON API.

No inline script or style, so the strict Content-Security-Policy (script-src 'self') holds.
"""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

STATIC_DIR = Path(__file__).resolve().parent / "static"

routes = web.RouteTableDef()


@routes.get("/")
async def settings_page(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC_DIR / "settings.html", headers={"Cache-Control": "no-cache"})


routes.static("/static", STATIC_DIR, append_version=False)
