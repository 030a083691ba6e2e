"""A second, small fake Plex Media Server of the owner: its own machine identifier, token and library.

Tests of an account that reaches several servers (issue 17) need a server that is not the first
one in every way a mix-up would show: `/identity` names another machine, only its own token is
accepted (the first server's token, or any other, is PMS's text/html 401), and its sections and
titles are its own. It serves what those tests browse: `/identity`, `/`, `/library/sections`,
`/library/sections/{key}/all` and `/library/metadata/{ratingKey}`, XML or JSON by `Accept`.
"""

from __future__ import annotations

from aiohttp import web

from . import data
from .common import FakeState, build_app, param
from .mediacontainer import UNAUTHORIZED_HTML, Node, container, html_error, respond
from .plex import PMS_CORS

routes = web.RouteTableDef()


class SecondPlexState(FakeState):
    name = "plex_second"


STATE_KEY = web.AppKey("fake_second_plex_state", SecondPlexState)


def _require_token(request: web.Request) -> None:
    if param(request, "X-Plex-Token") != data.SECOND_PMS_TOKEN:
        raise web.HTTPUnauthorized(text=UNAUTHORIZED_HTML, headers={"Content-Type": "text/html"})


def _attrs() -> dict:
    return {"friendlyName": data.SECOND_PMS_FRIENDLY_NAME, "machineIdentifier": data.SECOND_PMS_MACHINE_ID,
            "version": data.PMS_VERSION}


@routes.get("/identity")
async def identity(request: web.Request) -> web.Response:
    return respond(request, Node("MediaContainer", {"size": 0, "claimed": True, **_attrs()}))


@routes.get("/")
async def root(request: web.Request) -> web.Response:
    _require_token(request)
    return respond(request, container(_attrs(), [Node("Directory", {"key": "library", "title": "library"})]))


@routes.get("/library/sections")
async def sections(request: web.Request) -> web.Response:
    _require_token(request)
    nodes = [Node("Directory", {"key": key, "type": kind, "title": title, "agent": "tv.plex.agents.movie"})
             for key, kind, title in data.SECOND_PMS_SECTIONS]
    return respond(request, container({"title1": "Plex Library", **_attrs()}, nodes))


def _item(key: str, rating_key: str, title: str, year: int) -> Node:
    return Node("Video", {"ratingKey": rating_key, "key": f"/library/metadata/{rating_key}", "type": "movie",
                          "title": title, "year": year, "librarySectionID": int(key)})


@routes.get("/library/sections/{key}/all")
async def section_items(request: web.Request) -> web.Response:
    _require_token(request)
    key = request.match_info["key"]
    if key not in data.SECOND_PMS_ITEMS:
        return html_error(404)
    nodes = [_item(key, *item) for item in data.SECOND_PMS_ITEMS[key]]
    return respond(request, container({"librarySectionID": int(key), **_attrs()}, nodes))


@routes.get("/library/metadata/{rk}")
async def metadata(request: web.Request) -> web.Response:
    _require_token(request)
    for key, items in data.SECOND_PMS_ITEMS.items():
        for item in items:
            if item[0] == request.match_info["rk"]:
                return respond(request, container(_attrs(), [_item(key, *item)]))
    return html_error(404)


def create_app(state: SecondPlexState | None = None) -> web.Application:
    return build_app(state or SecondPlexState(), STATE_KEY, routes, cors=PMS_CORS,
                     not_found=lambda request: html_error(404),
                     default_headers={"X-Plex-Protocol": "1.0", "Cache-Control": "no-cache"})
