"""The fake PMS's library index, per-user state, token check and metadata → MediaContainer nodes.

Node shapes follow a real Plex Media Server 1.4x: `<Video>` for movies/episodes/clips, `<Directory>` for
shows/seasons/collections, `Media > Part > Stream` (streams only on the item detail page), tags
(`Genre`, `Country`, `Director`, `Writer`, `Role`) and external `Guid` ids (in lists only with
`includeGuids=1`). Thumb/art keys are `/library/metadata/{ratingKey}/thumb/{updatedAt}`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Union

from aiohttp import web

from . import data
from .common import FakeState, param
from .data import Account, Episode, Movie, Season, Section, Show, ViewState
from .mediacontainer import UNAUTHORIZED_HTML, Node

IDENTIFIER = "com.plexapp.plugins.library"
MEDIA_TAG_PREFIX = "/system/bundle/media/flags/"
MEDIA_TAG_VERSION = 1731000000
PLAYED_FRACTION = 0.9  # PMS marks an item watched when a stop lands past ~90%


@dataclass
class Session:
    """A DASH transcode session, started by an authenticated decision/start.mpd request."""

    session_id: str
    account_id: int
    rating_key: str
    duration: int
    started_at: float = field(default_factory=time.time)


class PlexState(FakeState):
    name = "plex"

    def __init__(self) -> None:
        super().__init__()
        self.view_states: dict[tuple[int, str], ViewState] = data.initial_view_states()
        self.part_sizes: dict[int, int] = dict(PART_SIZES)
        self.sessions: dict[str, Session] = {}
        self.selected_streams: dict[tuple[int, int], dict[str, int]] = {}
        self.play_queues: dict[int, list[str]] = {}
        self.next_play_queue_id = 4101
        self.edits: dict[str, tuple[str, int]] = {}  # rating key -> (title, updatedAt): see retitle()

    def view(self, account: Account, rating_key: str) -> ViewState:
        return self.view_states.setdefault((account.id, rating_key), ViewState())

    def retitle(self, rating_key: str, title: str) -> None:
        """A metadata edit on the server: the movie's title changes and so does its updatedAt."""
        self.edits[rating_key] = (title, int(time.time()))

    def updated_at(self, item: "Item") -> int:
        return self.edits[item.rating_key][1] if item.rating_key in self.edits else item.updated_at


STATE_KEY = web.AppKey("fake_plex_state", PlexState)


def get_state(request: web.Request) -> PlexState:
    return request.app[STATE_KEY]


def require_account(request: web.Request) -> Account:
    """PMS takes the token from `X-Plex-Token` (query or header); anything else is a text/html 401."""
    account = data.account_by_token(param(request, "X-Plex-Token"))
    if account is None:
        raise web.HTTPUnauthorized(text=UNAUTHORIZED_HTML, headers={"Content-Type": "text/html"})
    return account


# --- library index ---------------------------------------------------------------------------------
Obj = Union[Movie, Show, Season, Episode, None]


@dataclass(frozen=True)
class Item:
    rating_key: str
    type: str  # movie | show | season | episode | collection | clip
    section: Section | None
    obj: Obj
    added_at: int
    show: Show | None = None
    season: Season | None = None

    @property
    def updated_at(self) -> int:
        return self.added_at + 3600

    @property
    def title(self) -> str:
        if self.type == "collection":
            return "The Matrix Collection"
        if self.type == "season":
            return f"Season {self.obj.number}"
        if self.type == "clip":
            return "The Matrix"
        return self.obj.name if self.type == "show" else self.obj.title

    @property
    def title_sort(self) -> str:
        for article in ("The ", "A ", "An "):
            if self.title.startswith(article):
                return self.title[len(article):]
        return self.title

    @property
    def duration(self) -> int:
        if self.type == "movie":
            return self.obj.runtime * 60_000
        if self.type == "episode":
            return self.obj.runtime * 60_000
        if self.type == "clip":
            return 147_000
        if self.type in ("show", "season"):
            return 48 * 60_000
        return 0

    @property
    def year(self) -> int | None:
        if self.type in ("movie", "show"):
            return self.obj.year
        if self.type == "episode":
            return int(self.obj.air_date[:4])
        if self.type == "season":
            return int(self.obj.air_date[:4])
        return None

    @property
    def originally_available_at(self) -> str | None:
        if self.type == "movie":
            return self.obj.release_date
        if self.type == "show":
            return self.obj.first_air_date
        if self.type in ("episode", "season"):
            return self.obj.air_date
        return None

    @property
    def part_id(self) -> int | None:
        if self.type in ("movie", "episode"):
            return self.obj.part_id
        if self.type == "clip":
            return data.MATRIX_TRAILER_PART_ID
        return None

    def guids(self) -> list[str]:
        if self.type == "movie":
            return [f"imdb://{self.obj.imdb_id}", f"tmdb://{self.obj.tmdb_id}"]
        if self.type == "show":
            return [f"imdb://{self.obj.imdb_id}", f"tmdb://{self.obj.tmdb_id}", f"tvdb://{self.obj.tvdb_id}"]
        if self.type == "season":
            return [f"tmdb://{self.obj.tmdb_id}"]
        if self.type == "episode":
            return [f"tmdb://{self.obj.tmdb_id}", f"tvdb://{self.obj.tvdb_id}"]
        return []

    @property
    def plex_guid(self) -> str:
        if self.type == "collection":
            return "collection://542a1e7d-6f2b-4b36-9a3e-2a7c3a9d1100"
        if self.type in ("movie", "show"):
            # the same id discover.provider.plex.tv uses as ratingKey (watchlist PUT/DELETE)
            return f"plex://{self.type}/{self.obj.plex_guid_id}"
        return f"plex://{self.type}/{data.hex_id(f'plex-{self.type}-{self.rating_key}')}"


def _build_index() -> tuple[dict[str, Item], dict[str, list[Item]], dict[int, Item]]:
    items: dict[str, Item] = {}
    by_section: dict[str, list[Item]] = {s.key: [] for s in data.SECTIONS}
    by_part: dict[int, Item] = {}
    movies, shows = data.SECTIONS
    added = 1700500000
    for i, movie in enumerate(m for m in data.MOVIES if m.rating_key):
        item = Item(movie.rating_key, "movie", movies, movie, added + i * 259200)
        items[item.rating_key] = item
        by_section[movies.key].append(item)
        by_part[movie.part_id] = item
    for show in (s for s in data.SHOWS if s.rating_key):
        item = Item(show.rating_key, "show", shows, show, added + 100000)
        items[item.rating_key] = item
        by_section[shows.key].append(item)
        for season in (x for x in show.seasons if x.rating_key):
            items[season.rating_key] = Item(season.rating_key, "season", shows, season, added + 100000, show=show)
            for ep in season.episodes:
                ep_item = Item(ep.rating_key, "episode", shows, ep, added + 100000 + ep.number, show, season)
                items[ep.rating_key] = ep_item
                by_part[ep.part_id] = ep_item
    items[data.COLLECTION_RATING_KEY] = Item(data.COLLECTION_RATING_KEY, "collection", movies, None, added + 50)
    clip = Item(data.MATRIX_TRAILER_RATING_KEY, "clip", None, data.MOVIES_BY_TMDB[603], added)
    items[clip.rating_key] = clip
    by_part[data.MATRIX_TRAILER_PART_ID] = clip
    return items, by_section, by_part


ITEMS, SECTION_ITEMS, ITEMS_BY_PART = _build_index()
SECTIONS_BY_KEY = {s.key: s for s in data.SECTIONS}
PART_SIZES = {pid: (item.obj.part_size if item.type != "clip" else data.MATRIX_TRAILER_PART_SIZE)
              for pid, item in ITEMS_BY_PART.items()}
COLLECTION_CHILDREN = [ITEMS["1001"], ITEMS["1002"]]
TYPE_NUMBERS = {"movie": 1, "show": 2, "season": 3, "episode": 4, "collection": 18, "clip": 1}


def children_of(item: Item) -> list[Item]:
    if item.type == "show":
        return [ITEMS[s.rating_key] for s in item.obj.seasons if s.rating_key]
    if item.type == "season":
        return [ITEMS[e.rating_key] for e in item.obj.episodes]
    if item.type == "collection":
        return list(COLLECTION_CHILDREN)
    return []


def leaves_of(item: Item) -> list[Item]:
    if item.type == "show":
        return [leaf for season in children_of(item) for leaf in children_of(season)]
    if item.type == "season":
        return children_of(item)
    return []


def streams_of(item: Item) -> list[dict[str, Any]]:
    """Video, audio and subtitle streams of an item's part (ids derive from the part id)."""
    pid = item.part_id
    if pid is None:
        return []
    base = pid * 10
    video = {"id": base + 1, "streamType": 1, "default": True, "codec": "h264", "index": 0, "bitrate": 4211,
             "language": "English", "languageTag": "en", "languageCode": "eng", "bitDepth": 8,
             "chromaLocation": "left", "chromaSubsampling": "4:2:0", "codedHeight": 800, "codedWidth": 1920,
             "frameRate": 23.976, "height": 800, "width": 1920, "level": 40, "profile": "high",
             "refFrames": 4, "scanType": "progressive", "displayTitle": "1080p (H.264)",
             "extendedDisplayTitle": "1080p (H.264)"}
    audio = [{"id": base + 2, "streamType": 2, "selected": True, "default": True, "codec": "aac", "index": 1,
              "channels": 6, "bitrate": 384, "language": "English", "languageTag": "en", "languageCode": "eng",
              "audioChannelLayout": "5.1(side)", "samplingRate": 48000, "profile": "lc",
              "displayTitle": "English (AAC 5.1)", "extendedDisplayTitle": "English (AAC 5.1)"}]
    subs = [{"id": base + 4, "streamType": 3, "codec": "srt", "index": 3, "language": "English",
             "languageTag": "en", "languageCode": "eng", "key": f"/library/streams/{base + 4}",
             "displayTitle": "English (SRT External)", "extendedDisplayTitle": "English (SRT External)"}]
    if item.type == "movie" and item.obj.tmdb_id == 603:
        audio.append({"id": base + 3, "streamType": 2, "codec": "aac", "index": 2, "channels": 2, "bitrate": 192,
                      "language": "Deutsch", "languageTag": "de", "languageCode": "ger",
                      "audioChannelLayout": "stereo", "samplingRate": 48000, "profile": "lc",
                      "displayTitle": "Deutsch (AAC Stereo)", "extendedDisplayTitle": "Deutsch (AAC Stereo)"})
        subs.append({"id": base + 5, "streamType": 3, "codec": "srt", "index": 4, "language": "Español",
                     "languageTag": "es", "languageCode": "spa", "key": f"/library/streams/{base + 5}",
                     "displayTitle": "Español (SRT External)", "extendedDisplayTitle": "Español (SRT External)"})
    if item.type == "clip":
        return [video, audio[0]]
    return [video, *audio, *subs]


# --- node rendering ---------------------------------------------------------------------------------
@dataclass
class Ctx:
    """What the current request asked for and who asked."""

    state: PlexState
    account: Account
    detail: bool = False
    include_guids: bool = False
    include_extras: bool = False
    include_markers: bool = False
    include_children: bool = False

    @classmethod
    def from_request(cls, request: web.Request, account: Account, detail: bool = False) -> "Ctx":
        def flag(name: str) -> bool:
            return request.query.get(name) == "1"

        return cls(get_state(request), account, detail, flag("includeGuids") or detail,
                   flag("includeExtras"), flag("includeMarkers"), flag("includeChildren"))


def _img(item: Item, kind: str, rating_key: str | None = None) -> str:
    return f"/library/metadata/{rating_key or item.rating_key}/{kind}/{item.updated_at}"


def _section_attrs(item: Item) -> dict[str, Any]:
    if item.section is None:
        return {}
    return {"librarySectionTitle": item.section.title, "librarySectionID": int(item.section.key),
            "librarySectionKey": f"/library/sections/{item.section.key}"}


def _view_attrs(ctx: Ctx, item: Item) -> dict[str, Any]:
    vs = ctx.state.view_states.get((ctx.account.id, item.rating_key))
    if vs is None:
        return {}
    return {"viewOffset": vs.view_offset or None, "viewCount": vs.view_count or None,
            "lastViewedAt": vs.last_viewed_at, "userRating": vs.user_rating}


def _viewed_leaves(ctx: Ctx, item: Item) -> int:
    return sum(1 for leaf in leaves_of(item)
               if (vs := ctx.state.view_states.get((ctx.account.id, leaf.rating_key))) and vs.view_count)


def _tag(tag: str, tag_id: int, name: str, filter_key: str, **extra: Any) -> Node:
    return Node(tag, {"id": tag_id, "filter": f"{filter_key}={tag_id}", "tag": name, **extra})


def _people_tags(ctx: Ctx, obj: Movie | Show) -> list[Node]:
    nodes: list[Node] = []
    crew = getattr(obj, "crew", ())
    limit = None if ctx.detail else 3
    for tag, job_match, filter_key in (("Director", "Director", "director"), ("Writer", "Writer", "writer")):
        seen = set()
        for pid, _dept, job in crew:
            if job_match in job and pid not in seen:
                seen.add(pid)
                nodes.append(_tag(tag, pid, data.PEOPLE[pid].name, filter_key))
    for pid, character in obj.cast[:limit]:
        person = data.PEOPLE[pid]
        nodes.append(_tag("Role", pid, person.name, "actor", tagKey=data.hex_id(f"person-{pid}"), role=character,
                          thumb=f"https://image.tmdb.org/t/p/original{person.profile_path}"))
    return nodes


def media_node(ctx: Ctx, item: Item) -> Node:
    pid = item.part_id
    size = ctx.state.part_sizes.get(pid, 0)
    duration = item.duration
    bitrate = max(1, size * 8 // max(duration, 1))  # kbit/s
    clip = item.type == "clip"
    container_fmt = "mp4"  # the fake serves real MP4 (fake_upstreams/media.py) for every part
    height = 1080 if clip else (800 if item.type == "movie" else 720)
    width = 1920 if height != 720 else 1280
    part_attrs = {
        "id": pid, "key": f"/library/parts/{pid}/{item.updated_at}/file.{container_fmt}", "duration": duration,
        "file": _file_path(item, container_fmt), "size": size, "audioProfile": "lc", "container": container_fmt,
        "videoProfile": "high", "hasThumbnail": None if clip else True,
    }
    part = Node("Part", part_attrs)
    if ctx.detail:
        chosen = ctx.state.selected_streams.get((ctx.account.id, pid), {})
        for stream in streams_of(item):
            attrs = dict(stream)
            if stream["streamType"] == 2 and "audio" in chosen:
                attrs["selected"] = True if stream["id"] == chosen["audio"] else None
            if stream["streamType"] == 3:
                attrs["selected"] = True if chosen.get("subtitle") == stream["id"] else None
            part.children.append(Node("Stream", attrs))
    media_id = pid + 1000
    return Node("Media", {
        "id": media_id, "duration": duration, "bitrate": bitrate, "width": width, "height": height,
        "aspectRatio": 2.35 if height == 800 else 1.78, "audioChannels": 6 if not clip else 2, "audioCodec": "aac",
        "videoCodec": "h264", "videoResolution": "1080" if height >= 800 else "720", "container": container_fmt,
        "videoFrameRate": "24p", "optimizedForStreaming": clip, "audioProfile": "lc", "has64bitOffsets": False,
        "videoProfile": "high",
    }, [part])


def _file_path(item: Item, ext: str) -> str:
    if item.type == "movie":
        return f"/data/movies/{item.title} ({item.year})/{item.title} ({item.year}) - 1080p.{ext}"
    if item.type == "episode":
        show, ep = item.show, item.obj
        return (f"/data/tv/{show.name}/Season {item.season.number:02d}/"
                f"{show.name} - S{item.season.number:02d}E{ep.number:02d} - {ep.title}.{ext}")
    return f"/data/movies/The Matrix (1999)/Trailers/The Matrix (1999) Trailer.{ext}"


def item_node(ctx: Ctx, item: Item) -> Node:
    builder = {"movie": _movie, "show": _show, "season": _season, "episode": _episode,
               "collection": _collection, "clip": _clip}[item.type]
    return builder(ctx, item)


def _guid_nodes(ctx: Ctx, item: Item) -> list[Node]:
    return [Node("Guid", {"id": g}) for g in item.guids()] if ctx.include_guids else []


def _movie(ctx: Ctx, item: Item) -> Node:
    m: Movie = item.obj
    attrs = {
        "ratingKey": item.rating_key, "key": f"/library/metadata/{item.rating_key}", "guid": item.plex_guid,
        "slug": m.slug, "studio": m.studio, "type": "movie",
        "title": ctx.state.edits[item.rating_key][0] if item.rating_key in ctx.state.edits else m.title,
        **_section_attrs(item),
        "contentRating": m.content_rating, "summary": m.overview, "audienceRating": m.vote_average,
        **_view_attrs(ctx, item), "year": m.year, "tagline": m.tagline or None,
        "thumb": _img(item, "thumb"), "art": _img(item, "art"), "duration": item.duration,
        "originallyAvailableAt": m.release_date, "addedAt": item.added_at, "updatedAt": ctx.state.updated_at(item),
        "audienceRatingImage": "themoviedb://image.rating",
        "primaryExtraKey": f"/library/metadata/{data.MATRIX_TRAILER_RATING_KEY}" if m.tmdb_id == 603 else None,
    }
    children = [media_node(ctx, item)]
    children += [_tag("Genre", gid, data.MOVIE_GENRES[gid], "genre") for gid in m.genre_ids]
    children.append(_tag("Country", 1, "United States of America", "country"))
    children += _people_tags(ctx, m)
    children += _guid_nodes(ctx, item)
    if ctx.detail:
        children += _image_nodes(item)
        if ctx.include_extras and m.tmdb_id == 603:
            clip_ctx = Ctx(ctx.state, ctx.account)
            extras = Node("Extras", {"size": 1}, [_clip(clip_ctx, ITEMS[data.MATRIX_TRAILER_RATING_KEY])],
                          json_object=True)
            children.append(extras)
        if ctx.include_markers:
            children.append(_marker(item, "credits", item.duration - 420_000, item.duration))
    return Node("Video", attrs, children, json_key="Metadata")


def _image_nodes(item: Item) -> list[Node]:
    return [Node("Image", {"alt": item.title, "type": "coverPoster", "url": _img(item, "thumb")}),
            Node("Image", {"alt": item.title, "type": "background", "url": _img(item, "art")})]


def _marker(item: Item, kind: str, start: int, end: int) -> Node:
    return Node("Marker", {"id": int(item.rating_key) * 10 + (1 if kind == "intro" else 2), "type": kind,
                           "startTimeOffset": start, "endTimeOffset": end, "final": kind == "credits" or None})


def _show(ctx: Ctx, item: Item) -> Node:
    s: Show = item.obj
    leaves = leaves_of(item)
    attrs = {
        "ratingKey": item.rating_key, "key": f"/library/metadata/{item.rating_key}/children",
        "guid": item.plex_guid, "slug": s.slug, "studio": s.studio, "type": "show", "title": s.name,
        **_section_attrs(item), "contentRating": s.content_rating, "summary": s.overview, "index": 1,
        "audienceRating": s.vote_average, **_view_attrs(ctx, item), "year": s.year, "tagline": s.tagline,
        "thumb": _img(item, "thumb"), "art": _img(item, "art"), "duration": item.duration,
        "originallyAvailableAt": s.first_air_date, "leafCount": len(leaves),
        "viewedLeafCount": _viewed_leaves(ctx, item), "childCount": len(children_of(item)),
        "addedAt": item.added_at, "updatedAt": item.updated_at, "audienceRatingImage": "themoviedb://image.rating",
    }
    children = [_tag("Genre", gid, data.TV_GENRES[gid], "genre") for gid in s.genre_ids]
    children.append(_tag("Country", 1, "United States of America", "country"))
    children += _people_tags(ctx, s)
    children += _guid_nodes(ctx, item)
    if ctx.detail:
        children += _image_nodes(item)
        if ctx.include_children:
            seasons = [_season(Ctx(ctx.state, ctx.account), child) for child in children_of(item)]
            children.append(Node("Children", {"size": len(seasons)}, seasons, json_object=True))
    return Node("Directory", attrs, children, json_key="Metadata")


def _season(ctx: Ctx, item: Item) -> Node:
    season: Season = item.obj
    show_item = ITEMS[item.show.rating_key]
    attrs = {
        "ratingKey": item.rating_key, "key": f"/library/metadata/{item.rating_key}/children",
        "parentRatingKey": show_item.rating_key, "guid": item.plex_guid, "parentGuid": show_item.plex_guid,
        "parentStudio": item.show.studio, "type": "season", "title": item.title,
        "parentKey": f"/library/metadata/{show_item.rating_key}", "parentTitle": item.show.name,
        **_section_attrs(item), "summary": season.overview, "index": season.number, "parentIndex": 1,
        "parentYear": item.show.year, **_view_attrs(ctx, item), "thumb": _img(item, "thumb"),
        "art": _img(show_item, "art"), "parentThumb": _img(show_item, "thumb"),
        "leafCount": len(children_of(item)), "viewedLeafCount": _viewed_leaves(ctx, item),
        "addedAt": item.added_at, "updatedAt": item.updated_at, "year": item.year,
    }
    return Node("Directory", attrs, _guid_nodes(ctx, item), json_key="Metadata")


def _episode(ctx: Ctx, item: Item) -> Node:
    ep: Episode = item.obj
    show_item, season_item = ITEMS[item.show.rating_key], ITEMS[item.season.rating_key]
    attrs = {
        "ratingKey": item.rating_key, "key": f"/library/metadata/{item.rating_key}",
        "parentRatingKey": season_item.rating_key, "grandparentRatingKey": show_item.rating_key,
        "guid": item.plex_guid, "parentGuid": season_item.plex_guid, "grandparentGuid": show_item.plex_guid,
        "type": "episode", "title": ep.title, "grandparentKey": f"/library/metadata/{show_item.rating_key}",
        "parentKey": f"/library/metadata/{season_item.rating_key}", **_section_attrs(item),
        "grandparentTitle": item.show.name, "parentTitle": season_item.title,
        "contentRating": item.show.content_rating, "summary": ep.overview, "index": ep.number,
        "parentIndex": item.season.number, **_view_attrs(ctx, item), "year": item.year,
        "thumb": _img(item, "thumb"), "art": _img(show_item, "art"), "parentThumb": _img(season_item, "thumb"),
        "grandparentThumb": _img(show_item, "thumb"), "grandparentArt": _img(show_item, "art"),
        "duration": item.duration, "originallyAvailableAt": ep.air_date, "addedAt": item.added_at,
        "updatedAt": item.updated_at,
    }
    children = [media_node(ctx, item)]
    children += _guid_nodes(ctx, item)
    if ctx.detail:
        children += _image_nodes(item)
        if ctx.include_markers:
            children.append(_marker(item, "intro", 30_000, 85_000))
            children.append(_marker(item, "credits", item.duration - 60_000, item.duration))
    return Node("Video", attrs, children, json_key="Metadata")


def _collection(ctx: Ctx, item: Item) -> Node:
    attrs = {
        "ratingKey": item.rating_key, "key": f"/library/collections/{item.rating_key}/children",
        "guid": item.plex_guid, "type": "collection", "title": item.title, **_section_attrs(item),
        "subtype": "movie", "summary": "The Matrix film series.", "index": 1, "content": None,
        "thumb": _img(item, "thumb"), "art": _img(item, "art"), "childCount": len(COLLECTION_CHILDREN),
        "maxYear": 2003, "minYear": 1999, "addedAt": item.added_at, "updatedAt": item.updated_at,
    }
    return Node("Directory", attrs, [], json_key="Metadata")


def _clip(ctx: Ctx, item: Item) -> Node:
    attrs = {
        "ratingKey": item.rating_key, "key": f"/library/metadata/{item.rating_key}",
        "guid": "file:///data/movies/The%20Matrix%20(1999)/Trailers/The%20Matrix%20(1999)%20Trailer.mp4",
        "type": "clip", "title": "The Matrix", "summary": "", "index": 1, "thumb": _img(item, "thumb"),
        "subtype": "trailer", "duration": item.duration, "addedAt": item.added_at, "extraType": 1,
        "year": 1999,
    }
    return Node("Video", attrs, [media_node(ctx, item)], json_key="Metadata")


def container_attrs(section: Section | None = None, **extra: Any) -> dict[str, Any]:
    attrs: dict[str, Any] = {"allowSync": section is not None, "identifier": IDENTIFIER}
    if section is not None:
        attrs.update({"librarySectionID": int(section.key), "librarySectionTitle": section.title,
                      "librarySectionUUID": section.uuid})
    attrs.update({"mediaTagPrefix": MEDIA_TAG_PREFIX, "mediaTagVersion": MEDIA_TAG_VERSION})
    attrs.update(extra)
    return attrs
