"""Fake TMDB API v3 (api.themoviedb.org/3).

Mirrors TMDB: auth with `?api_key=<v3 key>` or `Authorization: Bearer <v4 read token>`, otherwise 401
status_code 7; unknown ids and paths 404 status_code 34; `mode_429` answers every request with 429
status_code 25 and `Retry-After`. Responses are `application/json;charset=utf-8` with
`Cache-Control: public, max-age=...` and an `ETag` (304 on `If-None-Match`); CORS is
`Access-Control-Allow-Origin: *` and preflights are answered without credentials. Lists are paged
(`page`, `results`, `total_pages`, `total_results`, 20 per page, page 1..500). `append_to_response`
works on movie/tv/person details.
"""

from __future__ import annotations

import hashlib
import json
import math
from datetime import date, timedelta
from typing import Any, Callable

from aiohttp import web

from . import data, images
from .common import CorsPolicy, FakeState, bearer, build_app
from .data import Movie, Person, Season, Show

PAGE_SIZE = 20
INVALID_KEY = {"status_code": 7, "status_message": "Invalid API key: You must be granted a valid key.",
               "success": False}
NOT_FOUND = {"success": False, "status_code": 34,
             "status_message": "The resource you requested could not be found."}
TOO_MANY = {"status_code": 25, "status_message": "Your request count (#) is over the allowed limit of (40).",
            "success": False}
BAD_PAGE = {"success": False, "status_code": 22,
            "status_message": "Invalid page: Pages start at 1 and max at 500. They are expected to be an integer."}


class TmdbState(FakeState):
    name = "tmdb"

    def __init__(self) -> None:
        super().__init__()
        self.mode_429 = False
        self.retry_after = 3


STATE_KEY = web.AppKey("fake_tmdb_state", TmdbState)
routes = web.RouteTableDef()


class NotFound(Exception):
    pass


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    raw = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
    return web.Response(body=raw, status=status,
                        headers={"Content-Type": "application/json;charset=utf-8", **(headers or {})})


def ok(request: web.Request, body: Any, max_age: int = 28800) -> web.Response:
    raw = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
    etag = f'W/"{hashlib.md5(raw).hexdigest()}"'
    headers = {"Content-Type": "application/json;charset=utf-8", "Cache-Control": f"public, max-age={max_age}",
               "ETag": etag, "Vary": "Accept-Encoding"}
    if request.headers.get("If-None-Match") == etag:
        headers.pop("Content-Type")
        return web.Response(status=304, headers=headers)
    return web.Response(body=raw, headers=headers)


def _authorised(request: web.Request) -> bool:
    token = bearer(request)
    if token is not None:
        return token == data.TMDB_V4_TOKEN
    return request.query.get("api_key") == data.TMDB_V3_KEY


def api(path: str, max_age: int = 28800) -> Callable:
    """Register a GET route with TMDB's auth, rate-limit and not-found behaviour around it."""

    def wrap(fn: Callable[[web.Request], Any]) -> Callable:
        @routes.get(path)
        async def handler(request: web.Request) -> web.Response:
            state: TmdbState = request.app[STATE_KEY]
            if state.mode_429:
                return _json(TOO_MANY, 429, {"Retry-After": str(state.retry_after)})
            if not _authorised(request):
                return _json(INVALID_KEY, 401)
            try:
                return ok(request, fn(request), max_age)
            except NotFound:
                return _json(NOT_FOUND, 404)
            except BadPage:
                return _json(BAD_PAGE, 400)

        handler.__name__ = fn.__name__
        return fn

    return wrap


class BadPage(Exception):
    pass


def paged(request: web.Request, results: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    raw = request.query.get("page", "1")
    if not raw.isdigit() or not 1 <= int(raw) <= 500:
        raise BadPage()
    page = int(raw)
    start = (page - 1) * PAGE_SIZE
    return {**extra, "page": page, "results": results[start:start + PAGE_SIZE],
            "total_pages": max(1, math.ceil(len(results) / PAGE_SIZE)) if results else 1,
            "total_results": len(results)}


# --- object shapes -------------------------------------------------------------------------------
def movie_item(m: Movie, media_type: bool = False) -> dict[str, Any]:
    out = {"adult": False, "backdrop_path": m.backdrop, "genre_ids": list(m.genre_ids), "id": m.tmdb_id,
           "original_language": "en", "original_title": m.title, "overview": m.overview,
           "popularity": m.popularity, "poster_path": m.poster, "release_date": m.release_date, "title": m.title,
           "video": False, "vote_average": m.vote_average, "vote_count": m.vote_count}
    if media_type:
        out["media_type"] = "movie"
    return out


def tv_item(s: Show, media_type: bool = False) -> dict[str, Any]:
    out = {"adult": False, "backdrop_path": s.backdrop, "genre_ids": list(s.genre_ids), "id": s.tmdb_id,
           "origin_country": ["US"], "original_language": "en", "original_name": s.name, "overview": s.overview,
           "popularity": s.popularity, "poster_path": s.poster, "first_air_date": s.first_air_date,
           "name": s.name, "vote_average": s.vote_average, "vote_count": s.vote_count}
    if media_type:
        out["media_type"] = "tv"
    return out


def person_item(p: Person, media_type: bool = False) -> dict[str, Any]:
    out = {"adult": False, "gender": p.gender, "id": p.id, "known_for_department": p.department, "name": p.name,
           "original_name": p.name, "popularity": p.popularity, "profile_path": p.profile_path,
           "known_for": [movie_item(m, True) for m in data.MOVIES if _credited(p.id, m)][:3]
           + [tv_item(s, True) for s in data.SHOWS if _credited(p.id, s)][:3]}
    if media_type:
        out["media_type"] = "person"
    return out


def _credited(person_id: int, obj: Movie | Show) -> bool:
    return any(pid == person_id for pid, _ in obj.cast) or any(
        c[0] == person_id for c in getattr(obj, "crew", ())) or person_id in getattr(obj, "creators", ())


def _credit_id(*parts: Any) -> str:
    return data.hex_id("credit-" + "-".join(map(str, parts)))


def _person_credit(p: Person) -> dict[str, Any]:
    return {"adult": False, "gender": p.gender, "id": p.id, "known_for_department": p.department,
            "name": p.name, "original_name": p.name, "popularity": p.popularity, "profile_path": p.profile_path}


def movie_credits(m: Movie) -> dict[str, Any]:
    cast = [{**_person_credit(data.PEOPLE[pid]), "cast_id": n + 1, "character": character,
             "credit_id": _credit_id(m.tmdb_id, pid, "cast"), "order": n} for n, (pid, character) in enumerate(m.cast)]
    crew = [{**_person_credit(data.PEOPLE[pid]), "credit_id": _credit_id(m.tmdb_id, pid, job),
             "department": dept, "job": job} for pid, dept, job in m.crew]
    return {"id": m.tmdb_id, "cast": cast, "crew": crew}


def tv_credits(s: Show) -> dict[str, Any]:
    cast = [{**_person_credit(data.PEOPLE[pid]), "character": character,
             "credit_id": _credit_id(s.tmdb_id, pid, "cast"), "order": n} for n, (pid, character) in enumerate(s.cast)]
    crew = [{**_person_credit(data.PEOPLE[pid]), "credit_id": _credit_id(s.tmdb_id, pid, "creator"),
             "department": "Writing", "job": "Creator"} for pid in s.creators]
    return {"cast": cast, "crew": crew, "id": s.tmdb_id}


def videos(tmdb_id: int, title: str, key: str) -> dict[str, Any]:
    return {"id": tmdb_id, "results": [{
        "iso_639_1": "en", "iso_3166_1": "US", "name": f"{title} - Official Trailer", "key": key, "site": "YouTube",
        "size": 1080, "type": "Trailer", "official": True, "published_at": "2019-05-21T16:00:02.000Z",
        "id": data.hex_id(f"video-{tmdb_id}")}]}


def image_list(tmdb_id: int, poster: str, backdrop: str, request: web.Request) -> dict[str, Any]:
    def entry(path: str, w: int, h: int, lang: str | None, votes: float) -> dict[str, Any]:
        return {"aspect_ratio": round(w / h, 3), "height": h, "iso_639_1": lang, "file_path": path,
                "vote_average": votes, "vote_count": int(votes * 3), "width": w}

    out = {
        "backdrops": [entry(backdrop, 1920, 1080, None, 5.6),
                      entry(data.tmdb_file(f"{tmdb_id}-backdrop-en"), 3840, 2160, "en", 5.3)],
        "id": tmdb_id,
        "logos": [entry(data.tmdb_file(f"{tmdb_id}-logo", ".png"), 1000, 300, "en", 5.4)],
        "posters": [entry(poster, 2000, 3000, "en", 5.5),
                    entry(data.tmdb_file(f"{tmdb_id}-poster-de"), 1000, 1500, "de", 5.2),
                    entry(data.tmdb_file(f"{tmdb_id}-poster-null"), 2000, 3000, None, 5.1)],
    }
    langs = request.query.get("include_image_language")
    if langs:
        allowed = {None if lang == "null" else lang for lang in langs.split(",")}
        allowed.add(request.query.get("language", "en-US")[:2])
        for key in ("backdrops", "logos", "posters"):
            out[key] = [e for e in out[key] if e["iso_639_1"] in allowed]
    return out


def _related(items: list[Any], exclude: int, genres: tuple[int, ...]) -> list[Any]:
    return sorted((i for i in items if i.tmdb_id != exclude and set(i.genre_ids) & set(genres)),
                  key=lambda i: -i.popularity)


# --- configuration & lists ------------------------------------------------------------------------
@api("/3/configuration", max_age=86400)
def configuration(request: web.Request) -> dict[str, Any]:
    return {"change_keys": ["adult", "air_date", "also_known_as", "alternative_titles", "biography", "birthday",
                            "budget", "cast", "certifications", "character_names", "created_by", "crew",
                            "deathday", "episode", "episode_number", "episode_run_time", "freebase_id",
                            "freebase_mid", "general", "genres", "guest_stars", "homepage", "images", "imdb_id",
                            "languages", "name", "network", "origin_country", "original_name", "original_title",
                            "overview", "parts", "place_of_birth", "plot_keywords", "production_code",
                            "production_companies", "production_countries", "releases", "revenue", "runtime",
                            "season", "season_number", "season_regular", "spoken_languages", "status",
                            "tagline", "title", "translations", "tvdb_id", "tvrage_id", "type", "video",
                            "videos"],
            "images": {"base_url": "http://image.tmdb.org/t/p/", "secure_base_url": "https://image.tmdb.org/t/p/",
                       "backdrop_sizes": list(images.BACKDROP_SIZES), "logo_sizes": list(images.LOGO_SIZES),
                       "poster_sizes": list(images.POSTER_SIZES), "profile_sizes": list(images.PROFILE_SIZES),
                       "still_sizes": list(images.STILL_SIZES)}}


@api("/3/genre/movie/list", max_age=86400)
def movie_genres(request: web.Request) -> dict[str, Any]:
    return {"genres": [{"id": k, "name": v} for k, v in data.MOVIE_GENRES.items()]}


@api("/3/genre/tv/list", max_age=86400)
def tv_genres(request: web.Request) -> dict[str, Any]:
    return {"genres": [{"id": k, "name": v} for k, v in data.TV_GENRES.items()]}


@api(r"/3/trending/{media_type:movie|tv|all|person}/{window}", max_age=3600)
def trending(request: web.Request) -> dict[str, Any]:
    if request.match_info["window"] not in ("day", "week"):
        raise NotFound()
    kind = request.match_info["media_type"]
    released = [m for m in data.MOVIES if m.release_date <= date.today().isoformat()]
    entries: list[tuple[float, dict[str, Any]]] = []
    if kind in ("movie", "all"):
        entries += [(m.popularity, movie_item(m, True)) for m in released]
    if kind in ("tv", "all"):
        entries += [(s.popularity, tv_item(s, True)) for s in data.SHOWS]
    if kind == "person":
        entries += [(p.popularity, person_item(p, True)) for p in data.PEOPLE.values()]
    if request.match_info["window"] == "week":
        entries.reverse()  # a different but stable order for the weekly chart
    return paged(request, [e for _, e in sorted(entries, key=lambda e: -e[0])])


@api("/3/movie/popular", max_age=3600)
def movie_popular(request: web.Request) -> dict[str, Any]:
    return paged(request, [movie_item(m) for m in sorted(data.MOVIES, key=lambda m: -m.popularity)
                           if m.release_date <= date.today().isoformat()])


@api("/3/movie/top_rated", max_age=3600)
def movie_top_rated(request: web.Request) -> dict[str, Any]:
    return paged(request, [movie_item(m) for m in sorted(data.MOVIES, key=lambda m: -m.vote_average)
                           if m.vote_count])


@api("/3/movie/upcoming", max_age=3600)
def movie_upcoming(request: web.Request) -> dict[str, Any]:
    today = date.today()
    upcoming = [movie_item(m) for m in data.MOVIES if m.release_date >= (today - timedelta(days=30)).isoformat()]
    return paged(request, upcoming, dates={"maximum": (today + timedelta(days=800)).isoformat(),
                                           "minimum": (today - timedelta(days=30)).isoformat()})


@api("/3/tv/popular", max_age=3600)
def tv_popular(request: web.Request) -> dict[str, Any]:
    return paged(request, [tv_item(s) for s in sorted(data.SHOWS, key=lambda s: -s.popularity)])


@api("/3/tv/top_rated", max_age=3600)
def tv_top_rated(request: web.Request) -> dict[str, Any]:
    return paged(request, [tv_item(s) for s in sorted(data.SHOWS, key=lambda s: -s.vote_average)])


# --- search -------------------------------------------------------------------------------------------
def _matches(query: str, *names: str) -> bool:
    q = query.lower().strip()
    return bool(q) and any(q in n.lower() for n in names)


@api(r"/3/search/{kind:multi|movie|tv|person}", max_age=3600)
def search(request: web.Request) -> dict[str, Any]:
    kind, query = request.match_info["kind"], request.query.get("query", "")
    year = request.query.get("year") or request.query.get("primary_release_year")
    hits: list[tuple[float, dict[str, Any]]] = []
    if kind in ("multi", "movie"):
        hits += [(m.popularity, movie_item(m, kind == "multi")) for m in data.MOVIES
                 if _matches(query, m.title) and (not year or str(m.year) == year)]
    if kind in ("multi", "tv"):
        hits += [(s.popularity, tv_item(s, kind == "multi")) for s in data.SHOWS if _matches(query, s.name)]
    if kind in ("multi", "person"):
        hits += [(p.popularity, person_item(p, kind == "multi")) for p in data.PEOPLE.values()
                 if _matches(query, p.name)]
    return paged(request, [h for _, h in sorted(hits, key=lambda h: -h[0])])


@api("/3/find/{external_id}", max_age=86400)
def find(request: web.Request) -> dict[str, Any]:
    ext, source = request.match_info["external_id"], request.query.get("external_source", "")
    out: dict[str, list[Any]] = {"movie_results": [], "person_results": [], "tv_results": [],
                                 "tv_episode_results": [], "tv_season_results": []}
    if source == "imdb_id":
        out["movie_results"] = [movie_item(m, True) for m in data.MOVIES if m.imdb_id == ext]
        out["tv_results"] = [tv_item(s, True) for s in data.SHOWS if s.imdb_id == ext]
        out["person_results"] = [person_item(p, True) for p in data.PEOPLE.values() if p.imdb_id == ext]
    elif source == "tvdb_id":
        out["tv_results"] = [tv_item(s, True) for s in data.SHOWS if str(s.tvdb_id) == ext]
    return out


# --- movies -------------------------------------------------------------------------------------------
def _movie(request: web.Request) -> Movie:
    movie = data.MOVIES_BY_TMDB.get(int(request.match_info["id"]))
    if movie is None:
        raise NotFound()
    return movie


def movie_details(m: Movie) -> dict[str, Any]:
    return {
        "adult": False, "backdrop_path": m.backdrop,
        "belongs_to_collection": {"id": m.collection[0], "name": m.collection[1],
                                  "poster_path": data.tmdb_file(f"collection-{m.collection[0]}-poster"),
                                  "backdrop_path": data.tmdb_file(f"collection-{m.collection[0]}-backdrop")}
        if m.collection else None,
        "budget": m.budget, "genres": [{"id": g, "name": data.MOVIE_GENRES[g]} for g in m.genre_ids],
        "homepage": "", "id": m.tmdb_id, "imdb_id": m.imdb_id, "origin_country": ["US"],
        "original_language": "en", "original_title": m.title, "overview": m.overview, "popularity": m.popularity,
        "poster_path": m.poster,
        "production_companies": [{"id": 79, "logo_path": data.tmdb_file(f"company-{m.studio}", ".png"),
                                  "name": m.studio, "origin_country": "US"}],
        "production_countries": [{"iso_3166_1": "US", "name": "United States of America"}],
        "release_date": m.release_date, "revenue": m.revenue, "runtime": m.runtime,
        "spoken_languages": [{"english_name": "English", "iso_639_1": "en", "name": "English"}],
        "status": "Released" if m.release_date <= date.today().isoformat() else "Post Production",
        "tagline": m.tagline, "title": m.title, "video": False, "vote_average": m.vote_average,
        "vote_count": m.vote_count,
    }


def movie_external_ids(m: Movie) -> dict[str, Any]:
    return {"id": m.tmdb_id, "imdb_id": m.imdb_id, "wikidata_id": None, "facebook_id": None,
            "instagram_id": None, "twitter_id": None}


def movie_related(request: web.Request, m: Movie) -> dict[str, Any]:
    return paged(request, [movie_item(x) for x in _related(list(data.MOVIES), m.tmdb_id, m.genre_ids)])


MOVIE_PARTS: dict[str, Callable[[web.Request, Movie], Any]] = {
    "credits": lambda r, m: movie_credits(m),
    "external_ids": lambda r, m: movie_external_ids(m),
    "recommendations": movie_related,
    "similar": movie_related,
    "videos": lambda r, m: videos(m.tmdb_id, m.title, m.trailer_key),
    "images": lambda r, m: image_list(m.tmdb_id, m.poster, m.backdrop, r),
    "release_dates": lambda r, m: {"id": m.tmdb_id, "results": [{"iso_3166_1": "US", "release_dates": [{
        "certification": m.content_rating, "descriptors": [], "iso_639_1": "", "note": "",
        "release_date": f"{m.release_date}T00:00:00.000Z", "type": 3}]}]},
    "keywords": lambda r, m: {"id": m.tmdb_id, "keywords": []},
}


def _append(request: web.Request, body: dict[str, Any], parts: dict[str, Callable], obj: Any) -> dict[str, Any]:
    for name in filter(None, request.query.get("append_to_response", "").split(",")):
        if name in parts:
            extra = parts[name](request, obj)
            # appended sub-documents come without their own `id`
            body[name] = {k: v for k, v in extra.items() if k != "id"}
    return body


@api(r"/3/movie/{id:\d+}")
def movie(request: web.Request) -> dict[str, Any]:
    m = _movie(request)
    return _append(request, movie_details(m), MOVIE_PARTS, m)


@api(r"/3/movie/{id:\d+}/{part:credits|external_ids|recommendations|similar|videos|images|release_dates|keywords}")
def movie_part(request: web.Request) -> dict[str, Any]:
    return MOVIE_PARTS[request.match_info["part"]](request, _movie(request))


# --- tv -------------------------------------------------------------------------------------------------
def _show(request: web.Request) -> Show:
    show = data.SHOWS_BY_TMDB.get(int(request.match_info["id"]))
    if show is None:
        raise NotFound()
    return show


def _season_summary(s: Season) -> dict[str, Any]:
    return {"air_date": s.air_date, "episode_count": s.episode_count, "id": s.tmdb_id, "name": f"Season {s.number}",
            "overview": s.overview, "poster_path": s.poster_path, "season_number": s.number, "vote_average": 8.3}


def _episodes(show: Show, season: Season) -> list[dict[str, Any]]:
    if season.episodes:
        eps = [(e.number, e.tmdb_id, e.title, e.air_date, e.runtime, e.overview, e.still_path)
               for e in season.episodes]
    else:  # seasons without hand-written episodes get plausible generated ones
        start = date.fromisoformat(season.air_date)
        eps = [(n, season.tmdb_id * 100 + n, f"Episode {n}", (start + timedelta(weeks=n - 1)).isoformat(), 50, "",
                data.tmdb_file(f"episode-{season.tmdb_id}-{n}")) for n in range(1, season.episode_count + 1)]
    return [{"air_date": air, "episode_number": n, "episode_type": "finale" if n == len(eps) else "standard",
             "id": tmdb_id, "name": title, "overview": overview, "production_code": "", "runtime": runtime,
             "season_number": season.number, "show_id": show.tmdb_id, "still_path": still, "vote_average": 8.1,
             "vote_count": 200, "crew": [], "guest_stars": []}
            for n, tmdb_id, title, air, runtime, overview, still in eps]


def tv_details(s: Show) -> dict[str, Any]:
    last_season = s.seasons[-1]
    last_ep = _episodes(s, last_season)[-1]
    return {
        "adult": False, "backdrop_path": s.backdrop,
        "created_by": [{"id": pid, "credit_id": _credit_id(s.tmdb_id, pid, "creator"), "name": data.PEOPLE[pid].name,
                        "original_name": data.PEOPLE[pid].name, "gender": data.PEOPLE[pid].gender,
                        "profile_path": data.PEOPLE[pid].profile_path} for pid in s.creators],
        "episode_run_time": [], "first_air_date": s.first_air_date,
        "genres": [{"id": g, "name": data.TV_GENRES[g]} for g in s.genre_ids], "homepage": "", "id": s.tmdb_id,
        "in_production": s.status != "Ended", "languages": ["en"], "last_air_date": s.last_air_date,
        "last_episode_to_air": {k: v for k, v in last_ep.items() if k not in ("crew", "guest_stars")},
        "name": s.name, "next_episode_to_air": None,
        "networks": [{"id": s.network[0], "logo_path": data.tmdb_file(f"network-{s.network[0]}", ".png"),
                      "name": s.network[1], "origin_country": "US"}],
        "number_of_episodes": s.number_of_episodes, "number_of_seasons": len(s.seasons), "origin_country": ["US"],
        "original_language": "en", "original_name": s.name, "overview": s.overview, "popularity": s.popularity,
        "poster_path": s.poster, "production_companies": [{"id": 11073, "logo_path": None, "name": s.studio,
                                                           "origin_country": "US"}],
        "production_countries": [{"iso_3166_1": "US", "name": "United States of America"}],
        "seasons": [_season_summary(x) for x in s.seasons],
        "spoken_languages": [{"english_name": "English", "iso_639_1": "en", "name": "English"}],
        "status": s.status, "tagline": s.tagline, "type": "Scripted", "vote_average": s.vote_average,
        "vote_count": s.vote_count,
    }


def tv_external_ids(s: Show) -> dict[str, Any]:
    return {"id": s.tmdb_id, "imdb_id": s.imdb_id, "freebase_mid": None, "freebase_id": None,
            "tvdb_id": s.tvdb_id, "tvrage_id": None, "wikidata_id": None, "facebook_id": None,
            "instagram_id": None, "twitter_id": None}


def tv_related(request: web.Request, s: Show) -> dict[str, Any]:
    return paged(request, [tv_item(x) for x in _related(list(data.SHOWS), s.tmdb_id, s.genre_ids)])


TV_PARTS: dict[str, Callable[[web.Request, Show], Any]] = {
    "credits": lambda r, s: tv_credits(s),
    "aggregate_credits": lambda r, s: tv_credits(s),
    "external_ids": lambda r, s: tv_external_ids(s),
    "recommendations": tv_related,
    "similar": tv_related,
    "videos": lambda r, s: videos(s.tmdb_id, s.name, s.trailer_key),
    "images": lambda r, s: image_list(s.tmdb_id, s.poster, s.backdrop, r),
    "content_ratings": lambda r, s: {"id": s.tmdb_id, "results": [{"descriptors": [], "iso_3166_1": "US",
                                                                    "rating": s.content_rating}]},
    "keywords": lambda r, s: {"id": s.tmdb_id, "results": []},
}


@api(r"/3/tv/{id:\d+}")
def tv(request: web.Request) -> dict[str, Any]:
    s = _show(request)
    return _append(request, tv_details(s), TV_PARTS, s)


@api(r"/3/tv/{id:\d+}/{part:credits|aggregate_credits|external_ids|recommendations|similar|videos|images"
     r"|content_ratings|keywords}")
def tv_part(request: web.Request) -> dict[str, Any]:
    return TV_PARTS[request.match_info["part"]](request, _show(request))


def _season(request: web.Request) -> tuple[Show, Season]:
    show = _show(request)
    number = int(request.match_info["season"])
    for season in show.seasons:
        if season.number == number:
            return show, season
    raise NotFound()


@api(r"/3/tv/{id:\d+}/season/{season:\d+}")
def tv_season(request: web.Request) -> dict[str, Any]:
    show, season = _season(request)
    return {"_id": data.hex_id(f"season-{season.tmdb_id}"), "air_date": season.air_date,
            "episodes": _episodes(show, season), "name": f"Season {season.number}",
            "networks": tv_details(show)["networks"], "overview": season.overview, "id": season.tmdb_id,
            "poster_path": season.poster_path, "season_number": season.number, "vote_average": 8.3}


@api(r"/3/tv/{id:\d+}/season/{season:\d+}/episode/{episode:\d+}")
def tv_episode(request: web.Request) -> dict[str, Any]:
    show, season = _season(request)
    number = int(request.match_info["episode"])
    for ep in _episodes(show, season):
        if ep["episode_number"] == number:
            return ep
    raise NotFound()


# --- people ---------------------------------------------------------------------------------------------
def _person(request: web.Request) -> Person:
    person = data.PEOPLE.get(int(request.match_info["id"]))
    if person is None:
        raise NotFound()
    return person


def person_details(p: Person) -> dict[str, Any]:
    return {"adult": False, "also_known_as": [], "biography": f"{p.name} is known for {p.department.lower()}.",
            "birthday": p.birthday, "deathday": None, "gender": p.gender, "homepage": None, "id": p.id,
            "imdb_id": p.imdb_id, "known_for_department": p.department, "name": p.name,
            "place_of_birth": p.place_of_birth, "popularity": p.popularity, "profile_path": p.profile_path}


def combined_credits(p: Person) -> dict[str, Any]:
    cast, crew = [], []
    for m in data.MOVIES:
        for n, (pid, character) in enumerate(m.cast):
            if pid == p.id:
                cast.append({**movie_item(m), "character": character,
                             "credit_id": _credit_id(m.tmdb_id, pid, "cast"), "order": n, "media_type": "movie"})
        for pid, dept, job in m.crew:
            if pid == p.id:
                crew.append({**movie_item(m), "credit_id": _credit_id(m.tmdb_id, pid, job), "department": dept,
                             "job": job, "media_type": "movie"})
    for s in data.SHOWS:
        for pid, character in s.cast:
            if pid == p.id:
                cast.append({**tv_item(s), "character": character, "credit_id": _credit_id(s.tmdb_id, pid, "cast"),
                             "episode_count": s.number_of_episodes, "first_credit_air_date": s.first_air_date,
                             "media_type": "tv"})
        if p.id in s.creators:
            crew.append({**tv_item(s), "credit_id": _credit_id(s.tmdb_id, p.id, "creator"), "department": "Writing",
                         "job": "Creator", "episode_count": s.number_of_episodes, "media_type": "tv"})
    return {"cast": cast, "crew": crew, "id": p.id}


PERSON_PARTS: dict[str, Callable[[web.Request, Person], Any]] = {
    "combined_credits": lambda r, p: combined_credits(p),
    "movie_credits": lambda r, p: {**combined_credits(p), "cast": [c for c in combined_credits(p)["cast"]
                                                                   if c["media_type"] == "movie"]},
    "tv_credits": lambda r, p: {**combined_credits(p), "cast": [c for c in combined_credits(p)["cast"]
                                                                if c["media_type"] == "tv"]},
    "external_ids": lambda r, p: {"id": p.id, "imdb_id": p.imdb_id, "wikidata_id": None, "facebook_id": None,
                                  "instagram_id": None, "tiktok_id": None, "twitter_id": None},
    "images": lambda r, p: {"id": p.id, "profiles": [{"aspect_ratio": 0.667, "height": 1500, "iso_639_1": None,
                                                       "file_path": p.profile_path, "vote_average": 5.3,
                                                       "vote_count": 4, "width": 1000}]},
}


@api(r"/3/person/{id:\d+}")
def person(request: web.Request) -> dict[str, Any]:
    p = _person(request)
    return _append(request, person_details(p), PERSON_PARTS, p)


@api(r"/3/person/{id:\d+}/{part:combined_credits|movie_credits|tv_credits|external_ids|images}")
def person_part(request: web.Request) -> dict[str, Any]:
    return PERSON_PARTS[request.match_info["part"]](request, _person(request))


@api(r"/3/collection/{id:\d+}")
def collection(request: web.Request) -> dict[str, Any]:
    cid = int(request.match_info["id"])
    parts = [m for m in data.MOVIES if m.collection and m.collection[0] == cid]
    if not parts:
        raise NotFound()
    return {"id": cid, "name": parts[0].collection[1], "overview": "", "poster_path":
            data.tmdb_file(f"collection-{cid}-poster"), "backdrop_path": data.tmdb_file(f"collection-{cid}-backdrop"),
            "parts": [movie_item(m, True) for m in parts]}


def _not_found(request: web.Request) -> web.Response:
    state: TmdbState = request.app[STATE_KEY]
    if state.mode_429:
        return _json(TOO_MANY, 429, {"Retry-After": str(state.retry_after)})
    if not _authorised(request):
        return _json(INVALID_KEY, 401)
    return _json(NOT_FOUND, 404)


def create_app(state: TmdbState | None = None) -> web.Application:
    cors = CorsPolicy(echo_origin=False, allow_methods="GET, HEAD, POST, PUT, DELETE, OPTIONS",
                      expose_headers="ETag, Retry-After, X-RateLimit-Limit", max_age=86400)
    return build_app(state or TmdbState(), STATE_KEY, routes, cors=cors, not_found=_not_found,
                     server="openresty")
