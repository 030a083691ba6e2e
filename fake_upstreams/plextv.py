"""Fake plex.tv (API v1/v2) plus the discover.provider.plex.tv watchlist endpoints.

Mirrors plex.tv: v2 answers JSON for `Accept: application/json` and XML otherwise (what plexapi parses);
tokens come from the `X-Plex-Token` header or query; a bad token is 401
`{"errors":[{"code":1001,"message":"User could not be authenticated","status":401}]}`; creating a PIN
without `X-Plex-Client-Identifier` is 400 code 1000. PIN login: `POST /api/v2/pins` (201), poll
`GET /api/v2/pins/{id}` until `authToken` is set. `GET /api/v2/resources` lists the fake PMS with this
user's `accessToken` and a connection whose `uri` is the fake PMS base URL (and, for the owner while
`list_second_server` is on, the second fake PMS with its own token and `*.plex.direct` connections). Discover:
`/library/sections/watchlist/{filter}` (MediaContainer, paged; `Guid` ids with `includeGuids=1`, and each
item's `watchlistedAt`), `PUT|DELETE /library/metadata/{id}/watchlist` (the web player's calls),
`PUT /actions/addToWatchlist|removeFromWatchlist?ratingKey=` (plexapi's), and `/library/search` (titles).
CORS: the Origin is echoed and preflights answered.

Test hooks: `PlexTvState.link_pin(pin_id, account_token=...)` and `POST /test/link/{pin_id}`
(optional `account_token` in query, form or JSON body) act as the user approving the PIN on app.plex.tv;
`PlexTvState.revoke_account(token)` as the user signing out everywhere (401 until the next link_pin).
"""

from __future__ import annotations

import itertools
import json
import secrets
import time
from datetime import datetime, timezone
from typing import Any
from urllib.parse import urlsplit
from xml.sax.saxutils import escape

from aiohttp import web

from . import data
from .common import CorsPolicy, FakeState, build_app, param
from .mediacontainer import BadPaging, Node, container, paginate, respond
from .mediacontainer import to_xml as media_container_xml

PIN_LIFETIME = 1800  # seconds; plex.tv strong PINs live 30 minutes
CODE_ALPHABET = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"
STRONG_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"
LOCATION = {"code": "US", "european_union_member": False, "continent_code": "NA",
            "country": "United States", "city": "Chicago", "time_zone": "America/Chicago",
            "postal_code": "60601", "in_privacy_restricted_country": False,
            "in_privacy_restricted_region": False, "subdivisions": "Illinois",
            "coordinates": "41.8858, -87.6181"}


class PlexTvState(FakeState):
    name = "plextv"

    def __init__(self, pms_url: str = "http://127.0.0.1:32400") -> None:
        super().__init__()
        self.pms_url = pms_url  # where the resources' connection URIs point (set by FakeUpstreams)
        # The owner's second server (fake_upstreams/plex_second.py), listed only while
        # `list_second_server` is on: tests of several servers turn it on, the rest see one server.
        self.second_pms_url = ""
        self.list_second_server = False
        self.pins: dict[int, dict[str, Any]] = {}
        self._pin_ids = itertools.count(2071245123)
        self.watchlists: dict[int, list[str]] = data.initial_watchlists()
        self.watchlisted_at: dict[tuple[int, str], int] = {}  # (account, ratingKey) -> when it was added
        self.unshared: set[int] = set()  # account ids the owner stopped sharing the server with (tests)
        self.revoked: set[str] = set()  # tokens plex.tv no longer accepts (revoke_account; a new sign-in restores)

    def create_pin(self, client_id: str, product: str, strong: bool) -> dict[str, Any]:
        now = int(time.time())
        alphabet, length = (STRONG_ALPHABET, 25) if strong else (CODE_ALPHABET, 4)
        code = "".join(secrets.choice(alphabet) for _ in range(length))
        pin = {"id": next(self._pin_ids), "code": code, "product": product, "trusted": False,
               "qr": f"https://plex.tv/api/v2/pins/qr/{code}", "clientIdentifier": client_id,
               "location": dict(LOCATION), "expiresIn": PIN_LIFETIME, "createdAt": _iso(now),
               "expiresAt": _iso(now + PIN_LIFETIME), "authToken": None, "newRegistration": None,
               "_created": now}
        self.pins[pin["id"]] = pin
        return pin

    def link_pin(self, pin_id: int, account_token: str = data.PLEX_ACCOUNT_TOKEN) -> None:
        """Act as the user signing in on app.plex.tv: the next poll of the PIN returns `account_token`."""
        account = data.plextv_account_by_token(account_token)
        if account is None:
            raise ValueError("unknown account token")
        self.revoked -= {account.account_token, account.server_token}  # a fresh sign-in: its tokens work again
        self.pins[int(pin_id)]["authToken"] = account_token

    def revoke_account(self, account_token: str) -> None:
        """Act as the user signing out of every device at plex.tv: the account's tokens stop working."""
        account = data.plextv_account_by_token(account_token)
        self.revoked |= {account.account_token, account.server_token}


STATE_KEY = web.AppKey("fake_plextv_state", PlexTvState)
routes = web.RouteTableDef()


def _iso(ts: int) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# --- JSON / XML rendering ---------------------------------------------------------------------------
SINGULAR = {"connections": "connection", "resources": "resource", "features": "feature", "roles": "role",
            "entitlements": "entitlement", "services": "service", "subscriptions": "subscription",
            "users": "user", "errors": "error", "friends": "friend", "sharedServers": "sharedServer"}


def _xml_attr(value: Any) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    return escape(str(value), {'"': "&quot;", "\n": "&#10;"})


def _xml(tag: str, obj: Any, out: list[str]) -> None:
    """plex.tv v2 XML: scalars become attributes, objects child elements, lists wrapper elements."""
    if isinstance(obj, list):
        child = SINGULAR.get(tag, tag.rstrip("s"))
        out.append(f'<{tag} size="{len(obj)}">')
        for value in obj:
            _xml(child, value if isinstance(value, (dict, list)) else {"id": value}, out)
        out.append(f"</{tag}>")
        return
    attrs = "".join(f' {k}="{_xml_attr(v)}"' for k, v in obj.items()
                    if v is not None and not isinstance(v, (dict, list)))
    nested = [(k, v) for k, v in obj.items() if isinstance(v, (dict, list))]
    if not nested:
        out.append(f"<{tag}{attrs}/>")
        return
    out.append(f"<{tag}{attrs}>")
    for key, value in nested:
        _xml(key, value, out)
    out.append(f"</{tag}>")


def to_xml(tag: str, obj: Any) -> bytes:
    out = ['<?xml version="1.0" encoding="UTF-8"?>']
    _xml(tag, obj, out)
    return ("\n".join(out) + "\n").encode()


def _public(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _public(v) for k, v in obj.items() if not k.startswith("_")}
    return obj


def render(request: web.Request, tag: str, obj: Any, status: int = 200) -> web.Response:
    obj = _public(obj)
    if "application/json" in request.headers.get("Accept", ""):
        return web.Response(text=json.dumps(obj), status=status, content_type="application/json",
                            charset="utf-8")
    return web.Response(body=to_xml(tag, obj), status=status,
                        headers={"Content-Type": "application/xml; charset=utf-8"})


def error(request: web.Request, status: int, code: int, message: str) -> web.Response:
    """plex.tv errors: `{"errors": [...]}` in JSON, `<errors><error .../></errors>` in XML."""
    errors = [{"code": code, "message": message, "status": status}]
    if "application/json" in request.headers.get("Accept", ""):
        return web.json_response({"errors": errors}, status=status)
    return render(request, "errors", errors, status)


def unauthorized(request: web.Request) -> web.Response:
    return error(request, 401, 1001, "User could not be authenticated")


def _account(request: web.Request) -> data.Account | None:
    token = param(request, "X-Plex-Token")
    return None if token in get_state(request).revoked else data.plextv_account_by_token(token)


def get_state(request: web.Request) -> PlexTvState:
    return request.app[STATE_KEY]


# --- PIN login -----------------------------------------------------------------------------------------
@routes.post("/api/v2/pins")
async def create_pin(request: web.Request) -> web.Response:
    client_id = param(request, "X-Plex-Client-Identifier")
    if not client_id:
        return error(request, 400, 1000, "X-Plex-Client-Identifier is missing")
    form = await request.post() if request.content_type == "application/x-www-form-urlencoded" else {}
    strong = (request.query.get("strong") or form.get("strong") or "").lower() in ("true", "1")
    pin = get_state(request).create_pin(client_id, param(request, "X-Plex-Product") or "Plex Web", strong)
    return render(request, "pin", pin, status=201)


def _live_pin(request: web.Request, pin_id: str) -> dict[str, Any] | None:
    pin = get_state(request).pins.get(int(pin_id)) if pin_id.isdigit() else None
    if pin is None:
        return None
    remaining = pin["_created"] + PIN_LIFETIME - int(time.time())
    if remaining <= 0:
        return None
    pin["expiresIn"] = remaining
    return pin


@routes.get("/api/v2/pins/{pin_id}")
async def get_pin(request: web.Request) -> web.Response:
    if not param(request, "X-Plex-Client-Identifier"):
        return error(request, 400, 1000, "X-Plex-Client-Identifier is missing")
    pin = _live_pin(request, request.match_info["pin_id"])
    if pin is None:
        return error(request, 404, 1020, "Code not found or expired")
    return render(request, "pin", pin)


@routes.put("/api/v2/pins/link")
async def link_pin_by_code(request: web.Request) -> web.Response:
    """What app.plex.tv does when a signed-in user enters/approves a code."""
    account = _account(request)
    if account is None:
        return unauthorized(request)
    form = await request.post()
    code = request.query.get("code") or form.get("code")
    for pin in get_state(request).pins.values():
        if pin["code"] == code:
            pin["authToken"] = account.account_token
            return web.Response(status=204)
    return error(request, 404, 1020, "Code not found or expired")


@routes.post("/test/link/{pin_id}")
async def test_link(request: web.Request) -> web.Response:
    token = request.query.get("account_token")
    if token is None and request.body_exists:
        if request.content_type == "application/json":
            token = (await request.json()).get("account_token")
        else:
            token = (await request.post()).get("account_token")
    state = get_state(request)
    pin_id = request.match_info["pin_id"]
    if not pin_id.isdigit() or int(pin_id) not in state.pins:
        return error(request, 404, 1020, "Code not found or expired")
    try:
        state.link_pin(int(pin_id), token or data.PLEX_ACCOUNT_TOKEN)
    except ValueError:
        return unauthorized(request)
    return render(request, "pin", state.pins[int(pin_id)])


# --- account ---------------------------------------------------------------------------------------
def user_json(account: data.Account) -> dict[str, Any]:
    plex_pass = account.owner
    subscription = {"active": plex_pass, "subscribedAt": "2021-04-12T18:21:12Z" if plex_pass else None,
                    "status": "Active" if plex_pass else "Inactive", "paymentService": "braintree" if plex_pass
                    else None, "plan": "lifetime" if plex_pass else None,
                    "features": ["adaptive_bitrate", "collections", "federated-auth", "home"] if plex_pass else []}
    return {
        "id": account.id, "uuid": account.uuid, "username": account.username, "title": account.username,
        "email": account.email, "friendlyName": "", "locale": None, "confirmed": True, "joinedAt": account.joined_at,
        "emailOnlyAuth": False, "hasPassword": True, "protected": False, "thumb": account.thumb,
        "authToken": account.account_token, "mailingListStatus": "active", "mailingListActive": False,
        "scrobbleTypes": "", "country": "US", "subscription": subscription,
        "subscriptionDescription": "Lifetime Plex Pass" if plex_pass else None, "restricted": False,
        "anonymous": None, "home": account.owner, "guest": False, "homeSize": 1, "homeAdmin": account.owner,
        "maxHomeSize": 15, "rememberExpiresAt": account.joined_at + 10 ** 8, "adsConsent": None,
        "adsConsentSetAt": None, "adsConsentReminderAt": None, "experimentalFeatures": False,
        "twoFactorEnabled": False, "backupCodesCreated": False, "attributionPartner": None,
        "profile": {"autoSelectAudio": True, "defaultAudioLanguage": "en", "defaultSubtitleLanguage": "en",
                    "autoSelectSubtitle": 1, "defaultSubtitleAccessibility": 0, "defaultSubtitleForced": 1,
                    "watchedIndicator": 1, "mediaReviewsVisibility": 0},
        "entitlements": ["all"] if plex_pass else [], "roles": ["plexpass"] if plex_pass else [],
        "services": [{"identifier": "metadata", "endpoint": "https://metadata.provider.plex.tv",
                      "token": None, "secret": None, "status": "online"},
                     {"identifier": "discover", "endpoint": "https://discover.provider.plex.tv",
                      "token": None, "secret": None, "status": "online"}],
        "subscriptions": [subscription],
    }


@routes.get("/api/v2/user")
async def get_user(request: web.Request) -> web.Response:
    account = _account(request)
    if account is None:
        return unauthorized(request)
    return render(request, "user", user_json(account))


@routes.get("/users/account")
async def users_account(request: web.Request) -> web.Response:
    """Legacy v1 account document (older plexapi versions)."""
    account = _account(request)
    if account is None:
        return unauthorized(request)
    return render(request, "user", {**user_json(account), "authenticationToken": account.account_token})


@routes.get("/users/account.json")
async def users_account_json(request: web.Request) -> web.Response:
    account = _account(request)
    if account is None:
        return unauthorized(request)
    body = {"user": {**user_json(account), "authentication_token": account.account_token}}
    return web.json_response(body)


def _other_users(account: data.Account) -> list[data.Account]:
    return [a for a in data.ACCOUNTS if a.id != account.id]


@routes.get("/api/v2/users")
@routes.get("/api/v2/friends")
async def v2_users(request: web.Request) -> web.Response:
    account = _account(request)
    if account is None:
        return unauthorized(request)
    users = [{"id": a.id, "uuid": a.uuid, "title": a.username, "username": a.username, "email": a.email,
              "thumb": a.thumb, "restricted": False, "home": False, "status": "accepted",
              "sharedServers": [{"id": 907759180, "machineIdentifier": data.PMS_MACHINE_ID,
                                 "name": data.PMS_FRIENDLY_NAME, "numLibraries": len(data.SECTIONS)}]
              if account.owner and a.id not in get_state(request).unshared else [], "sharedSources": []}
             for a in _other_users(account)]
    return render(request, "users", users)


@routes.get("/api/users")
@routes.get("/api/users/")
async def v1_users(request: web.Request) -> web.Response:
    """v1 friends list (always XML), what plexapi's `MyPlexAccount.users()` reads."""
    account = _account(request)
    if account is None:
        return unauthorized(request)
    nodes = [Node("User", {"id": a.id, "title": a.username, "username": a.username, "email": a.email,
                           "recommendationsPlaylistId": "", "thumb": a.thumb, "protected": False, "home": False,
                           "allowTuners": 0, "allowSync": True, "allowCameraUpload": False, "allowChannels": True,
                           "filterAll": "", "filterMovies": "", "filterMusic": "", "filterPhotos": "",
                           "filterTelevision": "", "restricted": False},
                  [Node("Server", {"id": 907759180, "serverId": 9999999, "machineIdentifier": data.PMS_MACHINE_ID,
                                   "name": data.PMS_FRIENDLY_NAME, "lastSeenAt": int(time.time()),
                                   "numLibraries": len(data.SECTIONS), "allLibraries": True, "owned": True,
                                   "pending": False})] if account.owner else [])
             for a in _other_users(account)]
    root = container({"friendlyName": "myPlex", "identifier": "com.plexapp.plugins.myplex",
                      "machineIdentifier": data.PMS_MACHINE_ID, "totalSize": len(nodes)}, nodes)
    return web.Response(body=media_container_xml(root), headers={"Content-Type": "application/xml; charset=utf-8"})


# --- resources -------------------------------------------------------------------------------------
def _stranger_resources() -> list[dict[str, Any]]:
    """The stranger's own server, somewhere else; the fake PMS is not shared with them."""
    return [{
        "name": data.STRANGER_SERVER_NAME, "product": "Plex Media Server", "productVersion": data.PMS_VERSION,
        "platform": "Windows", "platformVersion": "10.0 (Build 19045)", "device": "PC",
        "clientIdentifier": data.STRANGER_SERVER_MACHINE_ID, "createdAt": "2024-02-01T10:00:00Z",
        "lastSeenAt": _iso(int(time.time())), "provides": "server", "ownerId": None, "sourceTitle": None,
        "publicAddress": "198.51.100.80", "accessToken": data.STRANGER.server_token, "owned": True,
        "home": False, "synced": False, "relay": True, "presence": True, "httpsRequired": True,
        "publicAddressMatches": True, "dnsRebindingProtection": False, "natLoopbackSupported": True,
        "connections": [{"protocol": "https", "address": "192.168.7.20", "port": 32400,
                         "uri": "https://192-168-7-20.7d2e91c0a4b84f5fa3c6e0d1b2a9f8e7.plex.direct:32400",
                         "local": True, "relay": False, "IPv6": False}],
    }]


def second_server_resource(pms_url: str) -> dict[str, Any]:
    """The owner's second server as plex.tv lists it: a local plex.direct connection (the name embeds
    the fake's 127.0.0.1, so a proxy connects there without DNS), a remote one and a relay."""
    parts = urlsplit(pms_url)
    local = f"http://{parts.hostname.replace('.', '-')}.{data.SECOND_PMS_HASH}.plex.direct:{parts.port}"
    return {
        "name": data.SECOND_PMS_FRIENDLY_NAME, "product": "Plex Media Server", "productVersion": data.PMS_VERSION,
        "platform": data.PMS_PLATFORM, "platformVersion": data.PMS_PLATFORM_VERSION, "device": "PC",
        "clientIdentifier": data.SECOND_PMS_MACHINE_ID, "createdAt": "2024-03-02T09:00:00Z",
        "lastSeenAt": _iso(int(time.time())), "provides": "server", "ownerId": None, "sourceTitle": None,
        "publicAddress": "203.0.113.90", "accessToken": data.SECOND_PMS_TOKEN, "owned": True,
        "home": False, "synced": False, "relay": True, "presence": True, "httpsRequired": False,
        "publicAddressMatches": True, "dnsRebindingProtection": False, "natLoopbackSupported": False,
        "connections": [
            {"protocol": "http", "address": parts.hostname, "port": parts.port, "uri": local,
             "local": True, "relay": False, "IPv6": False},
            {"protocol": "https", "address": "203.0.113.90", "port": 32400, "local": False, "relay": False,
             "uri": f"https://203-0-113-90.{data.SECOND_PMS_HASH}.plex.direct:32400", "IPv6": False},
            {"protocol": "https", "address": "198.51.100.2", "port": 8443, "local": False, "relay": True,
             "uri": f"https://198-51-100-2.{data.SECOND_PMS_HASH}.plex.direct:8443", "IPv6": False},
        ],
    }


def resources_for(account: data.Account, pms_url: str, second_pms_url: str = "") -> list[dict[str, Any]]:
    if account is data.STRANGER:
        return _stranger_resources()
    parts = urlsplit(pms_url)
    owner = data.ACCOUNTS[0]
    server = {
        "name": data.PMS_FRIENDLY_NAME, "product": "Plex Media Server", "productVersion": data.PMS_VERSION,
        "platform": data.PMS_PLATFORM, "platformVersion": data.PMS_PLATFORM_VERSION, "device": "PC",
        "clientIdentifier": data.PMS_MACHINE_ID, "createdAt": "2023-11-14T22:13:20Z",
        "lastSeenAt": _iso(int(time.time())), "provides": "server",
        "ownerId": None if account.owner else owner.id, "sourceTitle": None if account.owner else owner.username,
        "publicAddress": "203.0.113.17", "accessToken": account.server_token, "owned": account.owner,
        "home": False, "synced": False, "relay": True, "presence": True, "httpsRequired": False,
        "publicAddressMatches": True, "dnsRebindingProtection": False, "natLoopbackSupported": False,
        "connections": [{"protocol": parts.scheme, "address": parts.hostname,
                         "port": parts.port or (443 if parts.scheme == "https" else 80),
                         # the owner is on the server's LAN; the friend reaches it remotely
                         "uri": pms_url.rstrip("/"), "local": account.owner, "relay": False, "IPv6": False}],
    }
    resources = [server]
    if account.owner and second_pms_url:
        resources.append(second_server_resource(second_pms_url))
    if account.owner:
        resources.append({
            "name": "Living Room SHIELD", "product": "Plex for Android (TV)", "productVersion": "10.20.0.1234",
            "platform": "Android", "platformVersion": "11", "device": "SHIELD Android TV",
            "clientIdentifier": "a567da2b81af8f82-com-plexapp-android", "createdAt": "2024-01-03T19:44:10Z",
            "lastSeenAt": _iso(int(time.time()) - 86400), "provides": "player,pubsub-player,controller",
            "ownerId": None, "sourceTitle": None, "publicAddress": "203.0.113.17", "accessToken": None,
            "owned": True, "home": False, "synced": False, "relay": False, "presence": False,
            "httpsRequired": False, "publicAddressMatches": True, "dnsRebindingProtection": False,
            "natLoopbackSupported": False, "connections": [],
        })
    return resources


@routes.get("/api/v2/resources")
async def get_resources(request: web.Request) -> web.Response:
    account = _account(request)
    if account is None:
        return unauthorized(request)
    state = get_state(request)
    second = state.second_pms_url if state.list_second_server else ""
    return render(request, "resources", resources_for(account, state.pms_url, second))


# --- discover.provider.plex.tv watchlist ---------------------------------------------------------------
def _discover_items() -> dict[str, tuple[str, Any]]:
    items: dict[str, tuple[str, Any]] = {}
    for movie in data.MOVIES:
        items[movie.plex_guid_id] = ("movie", movie)
    for show in data.SHOWS:
        items[show.plex_guid_id] = ("show", show)
    return items


DISCOVER_ITEMS = _discover_items()


WATCHLISTED_BEFORE = 1730000000  # watchlistedAt of the initial entries (added before the fakes started)


def _discover_guids(kind: str, obj: Any) -> list[Node]:
    ids = [f"imdb://{obj.imdb_id}", f"tmdb://{obj.tmdb_id}"] + ([f"tvdb://{obj.tvdb_id}"] if kind == "show" else [])
    return [Node("Guid", {"id": g}) for g in ids]


def _discover_node(rating_key: str, guids: bool = False, extra: dict[str, Any] | None = None) -> Node:
    kind, obj = DISCOVER_ITEMS[rating_key]
    title = obj.title if kind == "movie" else obj.name
    date = obj.release_date if kind == "movie" else obj.first_air_date
    return Node("Video" if kind == "movie" else "Directory", {
        "art": f"https://image.tmdb.org/t/p/original{obj.backdrop}", "guid": f"plex://{kind}/{rating_key}",
        "key": f"/library/metadata/{rating_key}" + ("/children" if kind == "show" else ""),
        "ratingKey": rating_key, "studio": obj.studio, "type": kind, "title": title, "slug": obj.slug,
        "contentRating": obj.content_rating, "summary": obj.overview,
        "audienceRating": obj.vote_average, "year": obj.year,
        "thumb": f"https://image.tmdb.org/t/p/original{obj.poster}", "originallyAvailableAt": date,
        "duration": obj.runtime * 60000 if kind == "movie" else None,
        "publicPagesURL": f"https://watch.plex.tv/{kind}/{obj.slug}", **(extra or {}),
    }, [Node("Image", {"alt": title, "type": "coverPoster", "url": f"https://image.tmdb.org/t/p/original{obj.poster}"}),
        *(_discover_guids(kind, obj) if guids else [])], json_key="Metadata")


@routes.get("/library/sections/watchlist/{filter}")
async def watchlist(request: web.Request) -> web.Response:
    account = _account(request)
    if account is None:
        return unauthorized(request)
    keys = list(get_state(request).watchlists.get(account.id, []))
    libtype = request.query.get("libtype")
    if libtype in ("movie", "show"):
        keys = [k for k in keys if DISCOVER_ITEMS[k][0] == libtype]
    if request.match_info["filter"] == "released":
        keys = [k for k in keys if DISCOVER_ITEMS[k][1].year <= datetime.now(timezone.utc).year]
    try:
        page, page_attrs, headers = paginate(request, keys)
    except BadPaging:
        return error(request, 400, 1000, "Invalid paging parameters")
    attrs = {"librarySectionID": "watchlist", "librarySectionTitle": "Watchlist", "offset": 0,
             "totalSize": len(keys), "identifier": "tv.plex.provider.discover", **page_attrs}
    state, guids = get_state(request), request.query.get("includeGuids") == "1"
    root = container(attrs, [_discover_node(k, guids, {"watchlistedAt": state.watchlisted_at.get(
        (account.id, k), WATCHLISTED_BEFORE)}) for k in page])
    headers.setdefault("X-Plex-Container-Start", str(attrs["offset"]))
    headers.setdefault("X-Plex-Container-Total-Size", str(len(keys)))
    return respond(request, root, headers=headers)


@routes.put("/library/metadata/{rating_key}/watchlist")
@routes.delete("/library/metadata/{rating_key}/watchlist")
async def change_watchlist(request: web.Request) -> web.Response:
    account = _account(request)
    if account is None:
        return unauthorized(request)
    return _change(request, account, request.match_info["rating_key"], request.method == "PUT")


@routes.put("/actions/addToWatchlist")
@routes.put("/actions/removeFromWatchlist")
async def watchlist_action(request: web.Request) -> web.Response:
    account = _account(request)
    if account is None:
        return unauthorized(request)
    key = request.query.get("ratingKey")
    if not key:
        return error(request, 400, 1000, "Missing ratingKey")
    return _change(request, account, key, request.path.endswith("/addToWatchlist"))


def _change(request: web.Request, account: data.Account, key: str, add: bool) -> web.Response:
    if key not in DISCOVER_ITEMS:
        return error(request, 404, 1020, "Item not found")
    state = get_state(request)
    keys = state.watchlists.setdefault(account.id, [])
    if add and key in keys:
        return web.Response(status=200)  # already there: plex.tv keeps its place and date
    if key in keys:
        keys.remove(key)
    state.watchlisted_at.pop((account.id, key), None)
    if add:
        keys.insert(0, key)
        state.watchlisted_at[(account.id, key)] = int(time.time())
    return web.Response(status=200)


@routes.get("/library/search")
async def search(request: web.Request) -> web.Response:
    """Discover search: movies and shows whose title contains the query (case-insensitive)."""
    if _account(request) is None:
        return unauthorized(request)
    query = (request.query.get("query") or "").strip().lower()
    types = {"movies": "movie", "tv": "show"}
    wanted = {types[t] for t in (request.query.get("searchTypes") or "movies,tv").split(",") if t in types}
    keys = [k for k, (kind, obj) in DISCOVER_ITEMS.items() if query and kind in wanted
            and query in (obj.title if kind == "movie" else obj.name).lower()]
    keys = keys[:max(1, int(request.query.get("limit") or 10))]
    guids = request.query.get("includeGuids") == "1"
    return respond(request, container({"identifier": "tv.plex.provider.discover"},
                                      [_discover_node(k, guids) for k in keys]))


def _not_found(request: web.Request) -> web.Response:
    return error(request, 404, 1002, "Not Found")


def create_app(state: PlexTvState | None = None) -> web.Application:
    from . import plextv_web  # the app.plex.tv sign-in page and avatars (it uses this module's helpers)

    return build_app(state or PlexTvState(), STATE_KEY, [*routes, *plextv_web.routes],
                     cors=CorsPolicy(echo_origin=True, max_age=86400),
                     not_found=_not_found, default_headers={"Cache-Control": "no-cache"})
