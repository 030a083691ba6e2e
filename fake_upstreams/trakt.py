"""Fake Trakt API (api.trakt.tv).

Mirrors Trakt: every API call needs `trakt-api-version: 2` and `trakt-api-key: <client id>` (otherwise 403,
"invalid API key or unapproved app"); user endpoints need `Authorization: Bearer <access token>`
(otherwise 401, Doorkeeper's `invalid_token`). Device OAuth: `POST /oauth/device/code`, then
`POST /oauth/device/token` answers 400 while pending, 404 unknown code, 409 already used, 410 expired,
418 denied, 200 with tokens once approved, and 401 `invalid_client` for a wrong client id/secret;
`POST /oauth/token` (refresh_token grant) rotates tokens; `POST /oauth/revoke` revokes. Lists carry
`X-Pagination-Page/Limit/Page-Count/Item-Count`; JSON is `application/json; charset=utf-8`;
CORS is `*` with the pagination headers exposed. The 429 "slow down" answer to fast polling is not modelled.

Test hooks: `TraktState.approve(code)` / `deny(code)` (device or user code) and `POST /test/approve/{code}`.
"""

from __future__ import annotations

import json
import math
import secrets
import time
from datetime import date, datetime, timezone
from typing import Any

from aiohttp import web

from . import data
from .common import CorsPolicy, FakeState, bearer, build_app, int_arg
from .data import Movie, Show

DEVICE_CODE_TTL = 600
POLL_INTERVAL = 5
ACCESS_TOKEN_TTL = 7776000  # 3 months

INVALID_CLIENT = {"error": "invalid_client",
                  "error_description": "Client authentication failed due to unknown client, no client "
                                       "authentication included, or unsupported authentication method."}
INVALID_GRANT = {"error": "invalid_grant",
                 "error_description": "The provided authorization grant is invalid, expired, revoked, does not "
                                      "match the redirection URI used in the authorization request, or was "
                                      "issued to another client."}
INVALID_TOKEN = {"error": "invalid_token", "error_description": "The access token is invalid"}
FORBIDDEN = {"error": "forbidden", "error_description": "Invalid API key or unapproved app"}


class TraktState(FakeState):
    name = "trakt"

    def __init__(self) -> None:
        super().__init__()
        self.device_codes: dict[str, dict[str, Any]] = {}
        self.access_tokens: set[str] = {data.TRAKT_ACCESS_TOKEN}
        self.refresh_tokens: dict[str, str] = {data.TRAKT_REFRESH_TOKEN: data.TRAKT_ACCESS_TOKEN}
        self.watchlist: list[tuple[str, int, str]] = data.initial_trakt_watchlist()
        self.history = data.initial_trakt_history()

    def _find(self, code: str) -> dict[str, Any]:
        for device_code, entry in self.device_codes.items():
            if code in (device_code, entry["user_code"]):
                return entry
        raise KeyError(code)

    def approve(self, code: str) -> None:
        """Act as the user entering the code at trakt.tv/activate and allowing the app."""
        self._find(code)["status"] = "approved"

    def deny(self, code: str) -> None:
        self._find(code)["status"] = "denied"


STATE_KEY = web.AppKey("fake_trakt_state", TraktState)
routes = web.RouteTableDef()


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(text=json.dumps(body), status=status, content_type="application/json", charset="utf-8",
                        headers=headers)


def get_state(request: web.Request) -> TraktState:
    return request.app[STATE_KEY]


def _app_ok(request: web.Request) -> bool:
    return (request.headers.get("trakt-api-version") == "2"
            and request.headers.get("trakt-api-key") == data.TRAKT_CLIENT_ID)


def _user_ok(request: web.Request) -> bool:
    return bearer(request) in get_state(request).access_tokens


def _guard(request: web.Request, needs_user: bool) -> web.Response | None:
    if not _app_ok(request):
        return _json(FORBIDDEN, 403)
    if needs_user and not _user_ok(request):
        return _json(INVALID_TOKEN, 401)
    return None


async def _body(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json() if request.body_exists else {}
    except (ValueError, UnicodeDecodeError):
        raise web.HTTPBadRequest() from None
    return body if isinstance(body, dict) else {}


def _now_iso() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")


# --- object shapes -----------------------------------------------------------------------------------
def movie_obj(m: Movie, request: web.Request) -> dict[str, Any]:
    out: dict[str, Any] = {"title": m.title, "year": m.year,
                           "ids": {"trakt": m.trakt_id, "slug": m.slug, "imdb": m.imdb_id, "tmdb": m.tmdb_id}}
    if "full" in request.query.get("extended", ""):
        out.update({"tagline": m.tagline, "overview": m.overview, "released": m.release_date,
                    "runtime": m.runtime, "country": "us", "trailer": f"https://youtube.com/watch?v={m.trailer_key}",
                    "homepage": None, "status": "released" if m.release_date <= date.today().isoformat()
                    else "in production", "rating": m.vote_average, "votes": m.vote_count // 2,
                    "comment_count": 42, "updated_at": "2024-11-01T08:12:41.000Z", "language": "en",
                    "genres": [data.MOVIE_GENRES[g].lower().replace(" ", "-") for g in m.genre_ids],
                    "certification": m.content_rating})
    return out


def show_obj(s: Show, request: web.Request) -> dict[str, Any]:
    out: dict[str, Any] = {"title": s.name, "year": s.year,
                           "ids": {"trakt": s.trakt_id, "slug": s.slug, "tvdb": s.tvdb_id, "imdb": s.imdb_id,
                                   "tmdb": s.tmdb_id, "tvrage": None}}
    if "full" in request.query.get("extended", ""):
        out.update({"overview": s.overview, "first_aired": f"{s.first_air_date}T02:00:00.000Z", "runtime": 48,
                    "certification": s.content_rating, "network": s.network[1], "country": "us",
                    "trailer": f"https://youtube.com/watch?v={s.trailer_key}", "status": s.status.lower(),
                    "rating": s.vote_average, "votes": s.vote_count // 2, "language": "en",
                    "aired_episodes": s.number_of_episodes,
                    "genres": [data.TV_GENRES[g].lower().replace(" & ", "-") for g in s.genre_ids]})
    return out


def episode_obj(s: Show, season: int, number: int) -> dict[str, Any]:
    for ssn in s.seasons:
        for ep in ssn.episodes:
            if ssn.number == season and ep.number == number:
                return {"season": season, "number": number, "title": ep.title,
                        "ids": {"trakt": ep.trakt_id, "tvdb": ep.tvdb_id, "imdb": None, "tmdb": ep.tmdb_id,
                                "tvrage": None}}
    return {"season": season, "number": number, "title": f"Episode {number}", "ids": {}}


def _wrapped(kind: str, tmdb_id: int, request: web.Request) -> dict[str, Any]:
    if kind == "movie":
        return {"movie": movie_obj(data.MOVIES_BY_TMDB[tmdb_id], request)}
    return {"show": show_obj(data.SHOWS_BY_TMDB[tmdb_id], request)}


def paginated(request: web.Request, items: list[Any], default_limit: int = 10) -> web.Response:
    page = max(1, int_arg(request, "page", 1))
    limit = min(max(1, int_arg(request, "limit", default_limit)), 1000)
    headers = {"X-Pagination-Page": str(page), "X-Pagination-Limit": str(limit),
               "X-Pagination-Page-Count": str(max(1, math.ceil(len(items) / limit))),
               "X-Pagination-Item-Count": str(len(items))}
    return _json(items[(page - 1) * limit: page * limit], headers=headers)


def _released(m: Movie) -> bool:
    return m.release_date <= date.today().isoformat()


# --- OAuth --------------------------------------------------------------------------------------------
def _client_ok(body: dict[str, Any], need_secret: bool = True) -> bool:
    return body.get("client_id") == data.TRAKT_CLIENT_ID and (
        not need_secret or body.get("client_secret") == data.TRAKT_CLIENT_SECRET)


def _tokens(access: str, refresh: str) -> dict[str, Any]:
    return {"access_token": access, "token_type": "bearer", "expires_in": ACCESS_TOKEN_TTL,
            "refresh_token": refresh, "scope": "public", "created_at": int(time.time())}


@routes.post("/oauth/device/code")
async def device_code(request: web.Request) -> web.Response:
    body = await _body(request)
    if not _client_ok(body, need_secret=False):
        return _json(INVALID_CLIENT, 401)
    code = secrets.token_hex(32)
    user_code = secrets.token_hex(4).upper()
    get_state(request).device_codes[code] = {"user_code": user_code, "created": time.time(), "status": "pending"}
    return _json({"device_code": code, "user_code": user_code, "verification_url": "https://trakt.tv/activate",
                  "expires_in": DEVICE_CODE_TTL, "interval": POLL_INTERVAL})


@routes.post("/oauth/device/token")
async def device_token(request: web.Request) -> web.Response:
    body = await _body(request)
    if not _client_ok(body):
        return _json(INVALID_CLIENT, 401)
    entry = get_state(request).device_codes.get(str(body.get("code", "")))
    if entry is None:
        return _json({}, 404)
    if time.time() - entry["created"] > DEVICE_CODE_TTL:
        return _json({}, 410)
    status = entry["status"]
    if status == "pending":
        return _json({}, 400)
    if status == "denied":
        return _json({}, 418)
    if status == "used":
        return _json({}, 409)
    entry["status"] = "used"
    state = get_state(request)
    state.access_tokens.add(data.TRAKT_ACCESS_TOKEN)
    state.refresh_tokens[data.TRAKT_REFRESH_TOKEN] = data.TRAKT_ACCESS_TOKEN
    return _json(_tokens(data.TRAKT_ACCESS_TOKEN, data.TRAKT_REFRESH_TOKEN))


@routes.post("/oauth/token")
async def token(request: web.Request) -> web.Response:
    body = await _body(request)
    if not _client_ok(body):
        return _json(INVALID_CLIENT, 401)
    state = get_state(request)
    old_refresh = str(body.get("refresh_token", ""))
    if body.get("grant_type") != "refresh_token" or old_refresh not in state.refresh_tokens:
        return _json(INVALID_GRANT, 401)
    del state.refresh_tokens[old_refresh]  # refresh tokens are single use
    access, refresh = secrets.token_hex(32), secrets.token_hex(32)
    state.access_tokens.add(access)
    state.refresh_tokens[refresh] = access
    return _json(_tokens(access, refresh))


@routes.post("/oauth/revoke")
async def revoke(request: web.Request) -> web.Response:
    body = await _body(request)
    if not _client_ok(body):
        return _json(INVALID_CLIENT, 401)
    state = get_state(request)
    tok = str(body.get("token", ""))
    state.access_tokens.discard(tok)
    for refresh, access in list(state.refresh_tokens.items()):
        if tok in (refresh, access):
            del state.refresh_tokens[refresh]
            state.access_tokens.discard(access)
    return _json({})


@routes.post("/test/approve/{code}")
async def test_approve(request: web.Request) -> web.Response:
    try:
        get_state(request).approve(request.match_info["code"])
    except KeyError:
        return _json({}, 404)
    return _json({"approved": True})


# trakt.tv/activate, which the offline demo routes here: the user types the device flow's user code.
ACTIVATE_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Trakt: activate (offline demo)</title></head>
<body style="font-family: system-ui, sans-serif; max-width: 30rem; margin: 3rem auto">
<h1>Trakt</h1><p>The offline demo's stand-in for trakt.tv/activate.</p>{message}
<form method="post" action="/activate"><label>Code <input name="code" autocomplete="off" required
 autofocus></label> <button type="submit">Allow</button></form></body></html>
"""


@routes.get("/activate")
async def activate_page(_request: web.Request) -> web.Response:
    return web.Response(text=ACTIVATE_PAGE.format(message=""), content_type="text/html")


@routes.post("/activate")
async def activate(request: web.Request) -> web.Response:
    code = str((await request.post()).get("code", "")).strip().upper()
    try:
        get_state(request).approve(code)
    except KeyError:
        return web.Response(text=ACTIVATE_PAGE.format(message="<p>That code is unknown or expired.</p>"),
                            status=404, content_type="text/html")
    return web.Response(text=ACTIVATE_PAGE.format(message="<p id=done>Allowed: return to the app.</p>"),
                        content_type="text/html")


# --- public lists ---------------------------------------------------------------------------------------
def _watchers(popularity: float) -> int:
    return max(1, int(popularity // 3))


@routes.get("/movies/trending")
async def movies_trending(request: web.Request) -> web.Response:
    if denied := _guard(request, needs_user=False):
        return denied
    movies = sorted((m for m in data.MOVIES if _released(m)), key=lambda m: -m.popularity)
    return paginated(request, [{"watchers": _watchers(m.popularity), "movie": movie_obj(m, request)} for m in movies])


@routes.get("/shows/trending")
async def shows_trending(request: web.Request) -> web.Response:
    if denied := _guard(request, needs_user=False):
        return denied
    shows = sorted(data.SHOWS, key=lambda s: -s.popularity)
    return paginated(request, [{"watchers": _watchers(s.popularity), "show": show_obj(s, request)} for s in shows])


@routes.get("/movies/popular")
async def movies_popular(request: web.Request) -> web.Response:
    if denied := _guard(request, needs_user=False):
        return denied
    movies = sorted((m for m in data.MOVIES if _released(m)), key=lambda m: -m.vote_count)
    return paginated(request, [movie_obj(m, request) for m in movies])


@routes.get("/shows/popular")
async def shows_popular(request: web.Request) -> web.Response:
    if denied := _guard(request, needs_user=False):
        return denied
    return paginated(request, [show_obj(s, request) for s in sorted(data.SHOWS, key=lambda s: -s.vote_count)])


@routes.get("/movies/anticipated")
async def movies_anticipated(request: web.Request) -> web.Response:
    if denied := _guard(request, needs_user=False):
        return denied
    movies = sorted(data.MOVIES, key=lambda m: m.release_date, reverse=True)[:3]
    return paginated(request, [{"list_count": 4000 + m.tmdb_id % 5000, "movie": movie_obj(m, request)}
                               for m in movies])


@routes.get("/shows/anticipated")
async def shows_anticipated(request: web.Request) -> web.Response:
    if denied := _guard(request, needs_user=False):
        return denied
    shows = [s for s in data.SHOWS if s.status != "Ended"]
    return paginated(request, [{"list_count": 2500, "show": show_obj(s, request)} for s in shows])


PERIODS = ("daily", "weekly", "monthly", "yearly", "all")


@routes.get("/movies/watched/{period}")
async def movies_watched(request: web.Request) -> web.Response:
    if denied := _guard(request, needs_user=False):
        return denied
    if request.match_info["period"] not in PERIODS:
        return _json({}, 404)
    movies = sorted((m for m in data.MOVIES if _released(m)), key=lambda m: -m.vote_count)
    return paginated(request, [{"watcher_count": m.vote_count * 3, "play_count": m.vote_count * 5,
                                "collected_count": m.vote_count, "movie": movie_obj(m, request)} for m in movies])


@routes.get("/shows/watched/{period}")
async def shows_watched(request: web.Request) -> web.Response:
    if denied := _guard(request, needs_user=False):
        return denied
    if request.match_info["period"] not in PERIODS:
        return _json({}, 404)
    return paginated(request, [{"watcher_count": s.vote_count * 3, "play_count": s.vote_count * 40,
                                "collected_count": s.vote_count, "collector_count": s.vote_count,
                                "show": show_obj(s, request)} for s in data.SHOWS])


# --- the user -----------------------------------------------------------------------------------------
USER = {"username": "mrandersson", "private": False, "deleted": False, "name": "Thomas Anderson", "vip": False,
        "vip_ep": False, "director": False, "ids": {"slug": "mrandersson", "uuid": "b6589fc6ab0dc82cf12099d1c2d40ab9"}}


def _user_path_ok(request: web.Request) -> bool:
    return request.match_info.get("user", "me") in ("me", USER["ids"]["slug"])


@routes.get("/users/{user}")
async def user_profile(request: web.Request) -> web.Response:
    if denied := _guard(request, needs_user=True):
        return denied
    if not _user_path_ok(request):
        return _json({}, 404)
    out = dict(USER)
    if "full" in request.query.get("extended", ""):
        out.update({"joined_at": "2015-06-02T17:19:42.000Z", "location": "Chicago, IL", "about": "",
                    "gender": "male", "age": None, "images": {"avatar": {
                        "full": "https://walter-r2.trakt.tv/images/users/000/000/001/avatars/large/abc.jpg"}},
                    "vip_og": False, "vip_years": 0})
    return _json(out)


HISTORY_TYPES = {"movies": "movie", "shows": "episode", "seasons": "episode", "episodes": "episode"}


@routes.get("/users/{user}/history")
@routes.get("/users/{user}/history/{type}")
@routes.get("/users/{user}/history/{type}/{item_id}")
async def user_history(request: web.Request) -> web.Response:
    if denied := _guard(request, needs_user=True):
        return denied
    if not _user_path_ok(request):
        return _json({}, 404)
    wanted = request.match_info.get("type")
    if wanted and wanted not in HISTORY_TYPES:
        return _json({}, 404)
    entries = []
    for n, (kind, tmdb_id, season, episode, watched_at) in enumerate(get_state(request).history):
        if wanted and HISTORY_TYPES[wanted] != kind:
            continue
        entry: dict[str, Any] = {"id": 9_100_000_000 - n, "watched_at": watched_at, "action": "watch", "type": kind}
        if kind == "movie":
            entry["movie"] = movie_obj(data.MOVIES_BY_TMDB[tmdb_id], request)
        else:
            show = data.SHOWS_BY_TMDB[tmdb_id]
            entry["episode"] = episode_obj(show, season, episode)
            entry["show"] = show_obj(show, request)
        item_id = request.match_info.get("item_id")
        if item_id and item_id not in {str(v) for v in (entry.get("movie") or entry["show"])["ids"].values()}:
            continue
        entries.append(entry)
    return paginated(request, entries)


def _watchlist_entries(request: web.Request, wanted: str | None) -> list[dict[str, Any]]:
    entries = []
    for rank, (kind, tmdb_id, listed_at) in enumerate(get_state(request).watchlist, start=1):
        if wanted and wanted.rstrip("s") != kind:
            continue
        entries.append({"rank": rank, "id": 700_000 + rank, "listed_at": listed_at, "notes": None, "type": kind,
                        **_wrapped(kind, tmdb_id, request)})
    return entries


@routes.get("/users/{user}/watchlist")
@routes.get("/users/{user}/watchlist/{type}")
@routes.get("/users/{user}/watchlist/{type}/{sort}")
@routes.get("/sync/watchlist")
@routes.get("/sync/watchlist/{type}")
@routes.get("/sync/watchlist/{type}/{sort}")
async def user_watchlist(request: web.Request) -> web.Response:
    if denied := _guard(request, needs_user=True):
        return denied
    if not _user_path_ok(request):
        return _json({}, 404)
    wanted = request.match_info.get("type")
    if wanted and wanted not in ("movies", "shows", "seasons", "episodes", "all"):
        return _json({}, 404)
    entries = _watchlist_entries(request, None if wanted == "all" else wanted)
    sort = request.match_info.get("sort", "rank")
    if sort == "added":
        entries.sort(key=lambda e: e["listed_at"], reverse=True)
    headers = {"X-Sort-By": sort, "X-Sort-How": "asc"}
    if "page" in request.query or "limit" in request.query:
        response = paginated(request, entries)
        response.headers.update(headers)
        return response
    return _json(entries, headers=headers)


@routes.get("/recommendations/{type:movies|shows}")
async def recommendations(request: web.Request) -> web.Response:
    if denied := _guard(request, needs_user=True):
        return denied
    seen = {tmdb_id for _, tmdb_id, *_ in get_state(request).history}
    limit = min(max(1, int_arg(request, "limit", 10)), 100)
    if request.match_info["type"] == "movies":
        items = [{**movie_obj(m, request), "favorited_by": []} for m in data.MOVIES
                 if m.tmdb_id not in seen and _released(m)]
    else:
        items = [{**show_obj(s, request), "favorited_by": []} for s in data.SHOWS if s.tmdb_id not in seen]
    return _json(items[:limit])


# --- sync -----------------------------------------------------------------------------------------------
def _resolve(kind: str, ids: dict[str, Any]) -> int | None:
    objs = data.MOVIES if kind == "movie" else data.SHOWS
    for obj in objs:
        known = {"trakt": obj.trakt_id, "slug": obj.slug, "imdb": obj.imdb_id, "tmdb": obj.tmdb_id,
                 "tvdb": getattr(obj, "tvdb_id", None)}
        if any(key in known and known[key] is not None and str(known[key]) == str(value)
               for key, value in ids.items()):
            return obj.tmdb_id
    return None


def _empty_counts() -> dict[str, int]:
    return {"movies": 0, "shows": 0, "seasons": 0, "episodes": 0}


async def _sync(request: web.Request, add: bool) -> web.Response:
    if denied := _guard(request, needs_user=True):
        return denied
    body = await _body(request)
    state = get_state(request)
    changed, existing = _empty_counts(), _empty_counts()
    not_found: dict[str, list[Any]] = {"movies": [], "shows": [], "seasons": [], "episodes": []}
    for group, kind in (("movies", "movie"), ("shows", "show")):
        for entry in body.get(group, []):
            tmdb_id = _resolve(kind, entry.get("ids", {}) if isinstance(entry, dict) else {})
            if tmdb_id is None:
                not_found[group].append(entry)
                continue
            present = [w for w in state.watchlist if w[0] == kind and w[1] == tmdb_id]
            if add and present:
                existing[group] += 1
            elif add:
                state.watchlist.append((kind, tmdb_id, _now_iso()))
                changed[group] += 1
            elif present:
                state.watchlist.remove(present[0])
                changed[group] += 1
            else:
                not_found[group].append(entry)
    result: dict[str, Any] = {("added" if add else "deleted"): changed}
    if add:
        result["existing"] = existing
    result["not_found"] = not_found
    result["list"] = {"updated_at": _now_iso(), "item_count": len(state.watchlist)}
    return _json(result, 201 if add else 200)


@routes.post("/sync/watchlist")
async def sync_watchlist(request: web.Request) -> web.Response:
    return await _sync(request, add=True)


@routes.post("/sync/watchlist/remove")
async def sync_watchlist_remove(request: web.Request) -> web.Response:
    return await _sync(request, add=False)


def _not_found(request: web.Request) -> web.Response:
    return _json({}, 404)


def create_app(state: TraktState | None = None) -> web.Application:
    cors = CorsPolicy(echo_origin=False, expose_headers="X-Pagination-Page, X-Pagination-Limit, "
                      "X-Pagination-Page-Count, X-Pagination-Item-Count, X-Sort-By, X-Sort-How, X-Private-User",
                      max_age=86400)
    return build_app(state or TraktState(), STATE_KEY, routes, cors=cors, not_found=_not_found,
                     default_headers={"Cache-Control": "no-cache"}, server="cloudflare")
