"""Fake Plex Media Server: library browsing, search and the app factory.

Mirrors PMS 1.43: token in `X-Plex-Token` (query or header) or a text/html 401; XML unless
`Accept: application/json`; `X-Plex-Container-Start/Size` paging (query or header) answered with
`offset`/`totalSize` and `X-Plex-Container-Start`/`X-Plex-Container-Total-Size`; unknown metadata is a
404 with an empty text/html body and `/hubs/search` without `query` a 400 (as in the traffic capture);
`/identity` needs no token. CORS like PMS: the request's Origin is echoed back and preflights are answered
for any path. Playback, images and write endpoints live in `plex_playback`.
"""

from __future__ import annotations

import random
from typing import Any, Callable

from aiohttp import web

from . import data, plex_playback
from .common import CorsPolicy, build_app
from .mediacontainer import (
    BadPaging, Node, container, html_error, paginate, respond,
)
from .plex_model import (
    ITEMS, SECTION_ITEMS, SECTIONS_BY_KEY, STATE_KEY, TYPE_NUMBERS, Ctx, Item, PlexState, children_of,
    container_attrs, get_state, item_node, leaves_of, require_account,
)

routes = web.RouteTableDef()

ROOT_ATTRS: dict[str, Any] = {
    # Taken from a real PMS 1.43.2 root document (traffic capture); identity fields are the fake's own.
    "allowCameraUpload": False, "allowChannelAccess": True, "allowMediaDeletion": True, "allowSharing": True,
    "allowSync": False, "allowTuners": True, "apiVersion": "1.2.2", "backgroundProcessing": True,
    "certificate": True, "companionProxy": True, "countryCode": "usa",
    "diagnostics": "logs,databases,streaminglogs", "eventStream": True, "friendlyName": data.PMS_FRIENDLY_NAME,
    "hubSearch": True, "itemClusters": True, "livetv": 7, "machineIdentifier": data.PMS_MACHINE_ID,
    "mediaProviders": True, "multiuser": True, "musicAnalysis": 2, "myPlex": True,
    "myPlexMappingState": "mapped", "myPlexSigninState": "ok", "myPlexSubscription": True,
    "myPlexUsername": data.ACCOUNTS[0].email, "offlineTranscode": 1,
    "ownerFeatures": "adaptive_bitrate,collections,federated-auth,home,kevin-bacon,livetv,radio,"
                     "tuner-sharing,unsupportedtuners",
    "platform": data.PMS_PLATFORM, "platformVersion": data.PMS_PLATFORM_VERSION, "pluginHost": True,
    "pushNotifications": False, "readOnlyLibraries": False, "streamingBrainABRVersion": 3,
    "streamingBrainVersion": 2, "sync": True, "transcoderActiveVideoSessions": 0, "transcoderAudio": True,
    "transcoderLyrics": True, "transcoderPhoto": True, "transcoderSubtitles": True, "transcoderVideo": True,
    "transcoderVideoBitrates": "64,96,208,320,720,1500,2000,3000,4000,8000,10000,12000,20000",
    "transcoderVideoQualities": "0,1,2,3,4,5,6,7,8,9,10,11,12",
    "transcoderVideoResolutions": "128,128,160,240,320,480,768,720,720,1080,1080,1080,1080",
    "updatedAt": data.PMS_UPDATED_AT, "updater": True, "version": data.PMS_VERSION, "voiceSearch": True,
}
ROOT_DIRECTORIES = ("actions", "activities", "butler", "channels", "clients", "devices", "diagnostics",
                    "downloadQueue", "hubs", "library", "livetv", "media", "neighborhood", "playQueues",
                    "playlists", "resources", "search", "server", "servers", "service", "statistics",
                    "system", "transcode", "updater", "user")


def both_slashes(path: str) -> list[str]:
    return [path, path + "/"]


def paged(request: web.Request, items: list[Item], render: Callable[[Item], Node],
          attrs: dict[str, Any]) -> web.Response:
    try:
        page, page_attrs, headers = paginate(request, items)
    except BadPaging:
        return html_error(400)
    return respond(request, container({**attrs, **page_attrs}, [render(i) for i in page]), headers=headers)


# --- root & identity ---------------------------------------------------------------------------------
@routes.get("/")
async def root(request: web.Request) -> web.Response:
    require_account(request)
    dirs = [Node("Directory", {"count": 3 if d in ("library", "livetv", "media") else 1, "key": d, "title": d})
            for d in ROOT_DIRECTORIES]
    return respond(request, container(ROOT_ATTRS, dirs))


@routes.get("/identity")
async def identity(request: web.Request) -> web.Response:
    return respond(request, Node("MediaContainer", {
        "size": 0, "apiVersion": "1.2.2", "claimed": True, "machineIdentifier": data.PMS_MACHINE_ID,
        "version": data.PMS_VERSION}))


for _path in both_slashes("/library"):
    @routes.get(_path)
    async def library_root(request: web.Request) -> web.Response:
        require_account(request)
        dirs = [Node("Directory", {"key": "sections", "title": "Library Sections"}),
                Node("Directory", {"key": "recentlyAdded", "title": "Recently Added Content"}),
                Node("Directory", {"key": "onDeck", "title": "On Deck Content"})]
        return respond(request, container({
            "allowSync": False, "art": "/:/resources/library-art.png", "content": "",
            "identifier": "com.plexapp.plugins.library", "mediaTagPrefix": "/system/bundle/media/flags/",
            "mediaTagVersion": 1731000000, "title1": "Plex Library", "title2": ""}, dirs))


# --- sections ------------------------------------------------------------------------------------------
def _section_node(section: data.Section) -> Node:
    kind = section.type
    return Node("Directory", {
        "allowSync": True, "art": f"/:/resources/{kind}-fanart.jpg",
        "composite": f"/library/sections/{section.key}/composite/{data.PMS_UPDATED_AT}", "filters": True,
        "refreshing": False, "thumb": f"/:/resources/{kind}.png", "key": section.key, "type": kind,
        "title": section.title, "agent": section.agent, "scanner": section.scanner, "language": "en-US",
        "uuid": section.uuid, "updatedAt": data.PMS_UPDATED_AT, "createdAt": section.created_at,
        "scannedAt": data.PMS_UPDATED_AT, "content": True, "directory": True,
        "contentChangedAt": 48213, "hidden": 0,
    }, [Node("Location", {"id": int(section.key), "path": section.location})])


for _path in both_slashes("/library/sections"):
    @routes.get(_path)
    async def sections(request: web.Request) -> web.Response:
        require_account(request)
        nodes = [_section_node(s) for s in data.SECTIONS]
        return respond(request, container({"allowSync": False, "title1": "Plex Library"}, nodes))


def _section(request: web.Request) -> data.Section:
    section = SECTIONS_BY_KEY.get(request.match_info["section"])
    if section is None:
        raise web.HTTPNotFound()
    return section


SORT_FIELDS: dict[str, Callable[[Item, Ctx], Any]] = {
    "titleSort": lambda i, c: i.title_sort.lower(),
    "title": lambda i, c: i.title.lower(),
    "addedAt": lambda i, c: i.added_at,
    "updatedAt": lambda i, c: c.state.updated_at(i),
    "originallyAvailableAt": lambda i, c: i.originally_available_at or "",
    "year": lambda i, c: i.year or 0,
    "audienceRating": lambda i, c: getattr(i.obj, "vote_average", 0),
    "rating": lambda i, c: getattr(i.obj, "vote_average", 0),
    "duration": lambda i, c: i.duration,
    "lastViewedAt": lambda i, c: c.state.view(c.account, i.rating_key).last_viewed_at or 0,
    "viewCount": lambda i, c: c.state.view(c.account, i.rating_key).view_count,
}


def sort_items(items: list[Item], sort: str | None, ctx: Ctx) -> list[Item]:
    """PMS `sort=field[:desc][,field2...]`; `random` shuffles; unknown fields are ignored."""
    if not sort:
        return sorted(items, key=lambda i: i.title_sort.lower())
    out = list(items)
    for spec in reversed(sort.split(",")):
        name, _, direction = spec.partition(":")
        if name == "random":
            random.shuffle(out)
        elif name in SORT_FIELDS:
            out.sort(key=lambda i, f=SORT_FIELDS[name]: f(i, ctx), reverse=direction == "desc")
    return out


def filter_items(request: web.Request, items: list[Item]) -> list[Item]:
    """The filters the frontend uses: `type`, `guid` (external or plex GUID), `title`, `genre`, `year`."""
    q = request.query
    if "type" in q:
        wanted = {int(t) for t in q["type"].split(",") if t.isdigit()}
        items = [i for i in items if TYPE_NUMBERS[i.type] in wanted]
    if "guid" in q:
        guid = q["guid"]
        items = [i for i in items if guid == i.plex_guid or guid in i.guids()]
    if "title" in q:
        needle = q["title"].lower()
        items = [i for i in items if needle in i.title.lower()]
    if "genre" in q:
        wanted_genres = {int(g) for g in q["genre"].split(",") if g.isdigit()}
        items = [i for i in items if wanted_genres & set(getattr(i.obj, "genre_ids", ()))]
    if "year" in q and q["year"].isdigit():
        items = [i for i in items if i.year == int(q["year"])]
    return items


def _expand_types(request: web.Request, section: data.Section) -> list[Item]:
    """A show section lists shows by default; `type=3`/`type=4` list its seasons/episodes instead."""
    items = list(SECTION_ITEMS[section.key])
    types = request.query.get("type", "")
    if section.type == "show" and any(t in types.split(",") for t in ("3", "4")):
        for show in SECTION_ITEMS[section.key]:
            items += children_of(show) + leaves_of(show)
    return items


@routes.get("/library/sections/{section}/all")
async def section_all(request: web.Request) -> web.Response:
    account = require_account(request)
    section = _section(request)
    ctx = Ctx.from_request(request, account)
    items = sort_items(filter_items(request, _expand_types(request, section)), request.query.get("sort"), ctx)
    kind = section.type
    attrs = container_attrs(section, art=f"/:/resources/{kind}-fanart.jpg", thumb=f"/:/resources/{kind}.png",
                            title1=section.title, title2=f"All {section.title}", viewGroup=kind,
                            viewMode=65592)
    return paged(request, items, lambda i: item_node(ctx, i), attrs)


@routes.get("/library/sections/{section}/genre")
async def section_genres(request: web.Request) -> web.Response:
    require_account(request)
    section = _section(request)
    names = data.MOVIE_GENRES if section.type == "movie" else data.TV_GENRES
    used = sorted({g for item in SECTION_ITEMS[section.key] for g in item.obj.genre_ids}, key=lambda g: names[g])
    nodes = [Node("Directory", {"fastKey": f"/library/sections/{section.key}/all?genre={g}", "key": str(g),
                                "title": names[g], "type": "genre"}) for g in used]
    attrs = container_attrs(None, art=f"/:/resources/{section.type}-fanart.jpg", content="secondary",
                            thumb=f"/:/resources/{section.type}.png", title1=section.title, title2="By Genre",
                            viewGroup="secondary", viewMode=65592)
    attrs["allowSync"] = False
    return respond(request, container(attrs, nodes))


@routes.get("/library/sections/{section}/collections")
async def section_collections(request: web.Request) -> web.Response:
    account = require_account(request)
    section = _section(request)
    ctx = Ctx.from_request(request, account)
    items = [ITEMS[data.COLLECTION_RATING_KEY]] if section.type == "movie" else []
    attrs = container_attrs(section, art=f"/:/resources/{section.type}-fanart.jpg", title1=section.title,
                            title2="Collections", viewGroup="secondary", viewMode=65592)
    return paged(request, items, lambda i: item_node(ctx, i), attrs)


@routes.get("/library/collections/{rating_key}/children")
async def collection_children(request: web.Request) -> web.Response:
    account = require_account(request)
    item = ITEMS.get(request.match_info["rating_key"])
    if item is None or item.type != "collection":
        return html_error(404)
    ctx = Ctx.from_request(request, account)
    attrs = container_attrs(item.section, title1=item.section.title, title2=item.title)
    return paged(request, children_of(item), lambda i: item_node(ctx, i), attrs)


@routes.get("/library/all")
async def library_all(request: web.Request) -> web.Response:
    account = require_account(request)
    ctx = Ctx.from_request(request, account)
    everything = [i for i in ITEMS.values() if i.type in ("movie", "show", "season", "episode")]
    if "type" not in request.query:
        everything = [i for i in everything if i.type in ("movie", "show")]
    items = sort_items(filter_items(request, everything), request.query.get("sort"), ctx)
    return paged(request, items, lambda i: item_node(ctx, i), container_attrs(None, allowSync=False))


# --- on deck / recently added --------------------------------------------------------------------------
def on_deck(state: PlexState, account: data.Account, section_key: str | None = None) -> list[Item]:
    """In-progress items, plus the next episode of shows the user is part-way through, newest first."""
    deck: list[Item] = []
    for item in ITEMS.values():
        if item.type not in ("movie", "episode") or (section_key and item.section.key != section_key):
            continue
        vs = state.view_states.get((account.id, item.rating_key))
        if vs and vs.view_offset:
            deck.append(item)
    for show in (i for i in ITEMS.values() if i.type == "show"):
        if section_key and show.section.key != section_key:
            continue
        leaves = leaves_of(show)
        if any(leaf in deck for leaf in leaves):
            continue
        watched = [n for n, leaf in enumerate(leaves) if state.view(account, leaf.rating_key).view_count]
        if watched and watched[-1] + 1 < len(leaves):
            deck.append(leaves[watched[-1] + 1])
    return sorted(deck, key=lambda i: state.view(account, i.rating_key).last_viewed_at or 0, reverse=True)


@routes.get("/library/onDeck")
async def library_on_deck(request: web.Request) -> web.Response:
    account = require_account(request)
    ctx = Ctx.from_request(request, account)
    items = on_deck(ctx.state, account)
    return paged(request, items, lambda i: item_node(ctx, i),
                 container_attrs(None, allowSync=False, mixedParents=True, title1="On Deck"))


@routes.get("/library/sections/{section}/onDeck")
async def section_on_deck(request: web.Request) -> web.Response:
    account = require_account(request)
    section = _section(request)
    ctx = Ctx.from_request(request, account)
    return paged(request, on_deck(ctx.state, account, section.key), lambda i: item_node(ctx, i),
                 container_attrs(section, mixedParents=True, title1=section.title, title2="On Deck"))


@routes.get("/library/recentlyAdded")
async def recently_added(request: web.Request) -> web.Response:
    account = require_account(request)
    ctx = Ctx.from_request(request, account)
    items = sorted((i for i in ITEMS.values() if i.type in ("movie", "season")), key=lambda i: -i.added_at)
    return paged(request, items, lambda i: item_node(ctx, i),
                 container_attrs(None, allowSync=False, mixedParents=True, title1="Recently Added"))


# --- metadata -----------------------------------------------------------------------------------------
def _lookup(request: web.Request) -> Item:
    item = ITEMS.get(request.match_info["rating_key"])
    if item is None:
        raise web.HTTPNotFound()
    return item


@routes.get(r"/library/metadata/{rating_keys:[0-9,]+}")
async def metadata(request: web.Request) -> web.Response:
    """One or more (comma separated) items with full detail; flags like includeExtras are honoured."""
    account = require_account(request)
    keys = [k for k in request.match_info["rating_keys"].split(",") if k]
    items = [ITEMS[k] for k in keys if k in ITEMS]
    if not items:
        return html_error(404)
    ctx = Ctx.from_request(request, account, detail=True)
    section = items[0].section
    return paged(request, items, lambda i: item_node(ctx, i), container_attrs(section))


@routes.get(r"/library/metadata/{rating_key:\d+}/children")
async def metadata_children(request: web.Request) -> web.Response:
    account = require_account(request)
    item = _lookup(request)
    ctx = Ctx.from_request(request, account)
    attrs = container_attrs(item.section, key=item.rating_key, nocache=True, title1=item.section.title
                            if item.section else "", title2=item.title)
    if item.type == "show":
        attrs.update(parentIndex=1, parentTitle=item.title, parentYear=item.year, summary=item.obj.overview,
                     thumb=f"/library/metadata/{item.rating_key}/thumb/{item.updated_at}",
                     art=f"/library/metadata/{item.rating_key}/art/{item.updated_at}",
                     viewGroup="season", viewMode=65593)
    elif item.type == "season":
        attrs.update(grandparentRatingKey=item.show.rating_key, grandparentTitle=item.show.name,
                     parentIndex=item.obj.number, parentTitle=item.title, viewGroup="episode", viewMode=65592)
    return paged(request, children_of(item), lambda i: item_node(ctx, i), attrs)


@routes.get(r"/library/metadata/{rating_key:\d+}/allLeaves")
async def metadata_leaves(request: web.Request) -> web.Response:
    account = require_account(request)
    item = _lookup(request)
    ctx = Ctx.from_request(request, account)
    attrs = container_attrs(item.section, key=item.rating_key, title1=item.title, title2="All episodes",
                            viewGroup="episode", viewMode=65592)
    return paged(request, leaves_of(item), lambda i: item_node(ctx, i), attrs)


# --- search -----------------------------------------------------------------------------------------
def search_items(query: str, section_id: str | None = None) -> list[Item]:
    needle = query.lower().strip()
    out = []
    for item in ITEMS.values():
        if item.type not in ("movie", "show", "episode") or (section_id and item.section.key != section_id):
            continue
        if needle and needle in item.title.lower():
            out.append(item)
    return out


@routes.get("/search")
async def legacy_search(request: web.Request) -> web.Response:
    account = require_account(request)
    query = request.query.get("query")
    if not query:
        return html_error(400)
    ctx = Ctx.from_request(request, account)
    items = filter_items(request, search_items(query))
    limit = request.query.get("limit")
    if limit and limit.isdigit():
        items = items[:int(limit)]
    return paged(request, items, lambda i: item_node(ctx, i), container_attrs(None))


HUBS = (("movie", "Movies", "hub.movie"), ("show", "Shows", "hub.show"), ("episode", "Episodes", "hub.episode"))


@routes.get("/hubs/search")
async def hub_search(request: web.Request) -> web.Response:
    account = require_account(request)
    query = request.query.get("query")
    if query is None:
        return html_error(400)
    ctx = Ctx.from_request(request, account)
    limit = int(request.query["limit"]) if request.query.get("limit", "").isdigit() else 10
    matches = search_items(query, request.query.get("sectionId"))
    hubs = []
    for kind, title, context in HUBS:
        found = [i for i in matches if i.type == kind]
        shown = found[:limit]
        hubs.append(Node("Hub", {
            "title": title, "type": kind, "hubIdentifier": kind, "context": context, "size": len(shown),
            "more": len(found) > len(shown), "style": "shelf",
            "hubKey": "/library/metadata/" + ",".join(i.rating_key for i in shown) if shown else None,
        }, [item_node(ctx, i) for i in shown]))
    try:
        page, page_attrs, headers = paginate(request, hubs)
    except BadPaging:
        return html_error(400)
    return respond(request, container(page_attrs, page), headers=headers)


def _not_found(request: web.Request) -> web.Response:
    return html_error(404)


# --- watch history (what the history import reads) -------------------------------------------------
@routes.get("/status/sessions/history/all")
async def history_all(request: web.Request) -> web.Response:
    """Every account's views, newest first (PMS: the owner sees all accounts, others 401). One entry
    per watched item and account, from the fake's view states (`viewedAt` = last viewed)."""
    account = require_account(request)
    if not account.owner:
        raise web.HTTPUnauthorized()
    views = sorted(((acc_id, key, v) for (acc_id, key), v in get_state(request).view_states.items()
                    if v.view_count and v.last_viewed_at and key in ITEMS), key=lambda e: -e[2].last_viewed_at)
    nodes = []
    for n, (acc_id, key, view) in enumerate(views):
        item = ITEMS[key]
        attrs = {"historyKey": f"/status/sessions/history/{5000 + n}", "key": f"/library/metadata/{key}",
                 "ratingKey": key, "title": item.title, "type": item.type, "viewedAt": view.last_viewed_at,
                 "accountID": acc_id, "deviceID": 1}
        if item.type == "episode":
            attrs.update(grandparentTitle=item.show.name, parentIndex=item.season.number, index=item.obj.number)
        nodes.append(Node("Video", attrs, json_key="Metadata"))
    try:
        page, page_attrs, headers = paginate(request, nodes)
    except BadPaging:
        return html_error(400)
    return respond(request, container(page_attrs, page), headers=headers)


PMS_CORS = CorsPolicy(
    echo_origin=True,
    allow_methods="POST, GET, OPTIONS, DELETE, PUT, HEAD",
    expose_headers="Location, Date, Content-Range, Accept-Ranges, Content-Length, X-Plex-Protocol, "
                   "X-Plex-Container-Start, X-Plex-Container-Total-Size",
    max_age=1209600,
    preflight_status=200,
)


def create_app(state: PlexState | None = None) -> web.Application:
    app = build_app(state or PlexState(), STATE_KEY, routes, cors=PMS_CORS, not_found=_not_found,
                    default_headers={"X-Plex-Protocol": "1.0", "Cache-Control": "no-cache"})
    app.router.add_routes(plex_playback.routes)
    return app


__all__ = ["PlexState", "STATE_KEY", "create_app", "get_state", "routes"]
