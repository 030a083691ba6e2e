"""The fake upstreams, checked with real clients (plexapi, tmdbsimple, aiohttp, Pillow) and no proxy."""

from __future__ import annotations

import asyncio
import io
import json
import socket
import xml.etree.ElementTree as ET
from urllib.parse import quote

import aiohttp
import pytest
import requests
from PIL import Image

from fake_upstreams import FakeUpstreams
from fake_upstreams.data import (
    MATRIX_PART_SIZE, MOVIES_BY_TMDB, PLEX_ACCOUNT_TOKEN, PLEX_ACCOUNT_TOKEN_2, PLEX_SERVER_TOKEN, PLEX_SERVER_TOKEN_2,
    PMS_MACHINE_ID, TMDB_V3_KEY, TMDB_V4_TOKEN, TRAKT_ACCESS_TOKEN, TRAKT_CLIENT_ID, TRAKT_CLIENT_SECRET,
    TRAKT_REFRESH_TOKEN,
)
from fake_upstreams.images import BOMB_NAME, NOT_AN_IMAGE_NAME
from fake_upstreams.plex_playback import part_bytes

MATRIX_PART = f"/library/parts/3001/1700503600/file.mp4?X-Plex-Token={PLEX_SERVER_TOKEN}"
JSON = {"Accept": "application/json"}
TRAKT_HEADERS = {"trakt-api-version": "2", "trakt-api-key": TRAKT_CLIENT_ID, "Content-Type": "application/json"}


@pytest.fixture
async def fakes():
    async with FakeUpstreams() as running:
        yield running


@pytest.fixture
async def http():
    async with aiohttp.ClientSession() as session:
        yield session


class RewritingSession(requests.Session):
    """Sends requests for hard-coded public hosts to the fakes (what the proxy does in the real setup)."""

    def __init__(self, mapping: dict[str, str]) -> None:
        super().__init__()
        self.mapping = mapping

    def request(self, method, url, *args, **kwargs):
        for public, local in self.mapping.items():
            if url.startswith(public):
                url = local + url[len(public):]
        return super().request(method, url, *args, **kwargs)


def plex_url(fakes: FakeUpstreams, path: str, token: str | None = PLEX_SERVER_TOKEN) -> str:
    sep = "&" if "?" in path else "?"
    return fakes.urls["plex"] + path + (f"{sep}X-Plex-Token={token}" if token else "")


# --- Plex Media Server -----------------------------------------------------------------------------
async def test_plexapi_browses_the_fake_pms(fakes):
    from plexapi.server import PlexServer

    def browse():
        plex = PlexServer(fakes.urls["plex"], PLEX_SERVER_TOKEN)
        movies = plex.library.section("Films")
        matrix = plex.fetchItem(1001)
        matrix.reload()
        show = plex.library.section("TV Shows").get("Breaking Bad")
        return {
            "server": (plex.friendlyName, plex.machineIdentifier, plex.version),
            "sections": [s.title for s in plex.library.sections()],
            "movies": [m.title for m in movies.all()],
            "matrix": (matrix.title, matrix.year, [g.id for g in matrix.guids], matrix.media[0].parts[0].size,
                       [s.displayTitle for s in matrix.media[0].parts[0].audioStreams()]),
            "search": sorted(i.title for i in plex.search("matrix")),
            "on_deck": [i.title for i in plex.library.onDeck()],
            "episodes": [e.title for e in show.episodes()][:2],
        }

    got = await asyncio.to_thread(browse)
    assert got["server"] == ("nebuchadnezzar", PMS_MACHINE_ID, "1.43.2.10687-563d026ea")
    assert got["sections"] == ["Films", "TV Shows"]
    assert sorted(got["movies"]) == ["Arrival", "Blade Runner 2049", "Inception", "The Matrix",
                                     "The Matrix Reloaded"]
    title, year, guids, size, audio = got["matrix"]
    assert (title, year, size) == ("The Matrix", 1999, MATRIX_PART_SIZE)
    assert "tmdb://603" in guids and "imdb://tt0133093" in guids
    assert audio == ["English (AAC 5.1)", "Deutsch (AAC Stereo)"]
    assert got["search"] == ["The Matrix", "The Matrix Reloaded"]
    assert got["on_deck"] == ["Inception", "Cat's in the Bag..."]
    assert got["episodes"] == ["Pilot", "Cat's in the Bag..."]


async def test_plex_answers_xml_by_default_and_json_on_accept(fakes, http):
    url = plex_url(fakes, "/library/metadata/1001")
    async with http.get(url) as resp:
        assert resp.headers["Content-Type"] == "text/xml;charset=utf-8"
        assert resp.headers["X-Plex-Protocol"] == "1.0"
        body = await resp.text()
    assert body.startswith('<?xml version="1.0" encoding="UTF-8"?>\n<MediaContainer size="1"')
    video = ET.fromstring(body.encode()).find("Video")
    async with http.get(url, headers=JSON) as resp:
        assert resp.headers["Content-Type"].startswith("application/json")
        doc = await resp.json()
    meta = doc["MediaContainer"]["Metadata"][0]
    assert meta["ratingKey"] == video.get("ratingKey") == "1001"
    assert meta["title"] == video.get("title") == "The Matrix"
    assert meta["year"] == 1999 and video.get("year") == "1999"
    part = meta["Media"][0]["Part"][0]
    assert part["size"] == MATRIX_PART_SIZE and part["key"].startswith("/library/parts/3001/")
    assert {s["streamType"] for s in part["Stream"]} == {1, 2, 3}
    assert {"id": "tmdb://603"} in meta["Guid"]
    assert video.find("Media/Part").get("key") == part["key"]

    async with http.get(plex_url(fakes, "/hubs/search?query=breaking"), headers=JSON) as resp:
        hubs = (await resp.json())["MediaContainer"]["Hub"]
    assert [h["Metadata"][0]["title"] for h in hubs if h.get("Metadata")] == ["Breaking Bad"]


async def test_plex_paging_sorting_and_guid_lookup(fakes, http):
    url = plex_url(fakes, "/library/sections/1/all?sort=titleSort&X-Plex-Container-Start=1&X-Plex-Container-Size=2")
    async with http.get(url, headers=JSON) as resp:
        assert resp.headers["X-Plex-Container-Start"] == "1"
        assert resp.headers["X-Plex-Container-Total-Size"] == "5"
        mc = (await resp.json())["MediaContainer"]
    assert (mc["offset"], mc["size"], mc["totalSize"]) == (1, 2, 5)
    assert [m["title"] for m in mc["Metadata"]] == ["Blade Runner 2049", "Inception"]

    # paging as headers, XML answer
    headers = {"X-Plex-Container-Start": "0", "X-Plex-Container-Size": "1"}
    async with http.get(plex_url(fakes, "/library/sections/1/all?sort=year:desc"), headers=headers) as resp:
        root = ET.fromstring(await resp.read())
    assert (root.get("size"), root.get("totalSize"), root.find("Video").get("title")) == ("1", "5",
                                                                                        "Blade Runner 2049")

    async with http.get(plex_url(fakes, "/library/all?guid=tmdb%3A%2F%2F603&type=1"), headers=JSON) as resp:
        found = (await resp.json())["MediaContainer"]["Metadata"]
    assert [m["ratingKey"] for m in found] == ["1001"]
    async with http.get(plex_url(fakes, "/library/sections/2/all?guid=tmdb://603"), headers=JSON) as resp:
        assert (await resp.json())["MediaContainer"]["size"] == 0

    async with http.get(plex_url(fakes, "/library/sections/1/genre"), headers=JSON) as resp:
        genres = {d["title"] for d in (await resp.json())["MediaContainer"]["Directory"]}
    assert {"Action", "Science Fiction"} <= genres
    async with http.get(plex_url(fakes, "/library/sections/1/collections"), headers=JSON) as resp:
        assert (await resp.json())["MediaContainer"]["Metadata"][0]["title"] == "The Matrix Collection"
    async with http.get(plex_url(fakes, "/library/metadata/2002/children"), headers=JSON) as resp:
        eps = (await resp.json())["MediaContainer"]["Metadata"]
    assert len(eps) == 7 and eps[0]["grandparentTitle"] == "Breaking Bad"


async def test_plex_errors_look_like_pms(fakes, http):
    for token in (None, "wrong-token-0123456789"):
        async with http.get(plex_url(fakes, "/library/sections", token)) as resp:
            assert resp.status == 401
            assert resp.headers["Content-Type"].startswith("text/html")
            assert "<h1>401 Unauthorized</h1>" in await resp.text()
    async with http.get(fakes.urls["plex"] + "/library/sections", headers={"X-Plex-Token": PLEX_SERVER_TOKEN}) as r:
        assert r.status == 200
    async with http.get(fakes.urls["plex"] + "/identity") as resp:
        assert resp.status == 200
    for path, status in (("/library/metadata/999999", 404), ("/hubs/search", 400), ("/no/such/endpoint", 404)):
        async with http.get(plex_url(fakes, path)) as resp:
            assert resp.status == status, path
            assert resp.headers["Content-Type"] == "text/html"
            assert await resp.read() == b""

    preflight = {"Origin": "https://player.example", "Access-Control-Request-Method": "PUT",
                 "Access-Control-Request-Headers": "x-plex-token,accept"}
    async with http.options(fakes.urls["plex"] + "/library/parts/3001", headers=preflight) as resp:
        assert resp.status == 200
        assert resp.headers["Access-Control-Allow-Origin"] == "https://player.example"
        assert "PUT" in resp.headers["Access-Control-Allow-Methods"]
        assert resp.headers["Access-Control-Allow-Headers"] == "x-plex-token,accept"
    async with http.get(plex_url(fakes, "/library/onDeck"), headers={"Origin": "https://player.example"}) as resp:
        assert resp.headers["Access-Control-Allow-Origin"] == "https://player.example"


async def test_plex_part_supports_ranges_without_reading_500_mb(fakes, http):
    url = fakes.urls["plex"] + MATRIX_PART
    async with http.get(url, headers={"Range": "bytes=0-15"}) as resp:
        assert resp.status == 206
        assert resp.headers["Content-Range"] == f"bytes 0-15/{MATRIX_PART_SIZE}"
        assert resp.headers["Accept-Ranges"] == "bytes"
        assert resp.headers["Content-Type"] == "video/mp4"
        first = await resp.read()
    assert first[4:8] == b"ftyp" and first == part_bytes(3001, 0, 15)

    middle = 250_000_000
    async with http.get(url, headers={"Range": f"bytes={middle}-{middle + 199_999}"}) as resp:
        assert resp.status == 206 and resp.content_length == 200_000
        assert await resp.read() == part_bytes(3001, middle, middle + 199_999)
    async with http.get(url, headers={"Range": "bytes=-100"}) as resp:
        assert resp.headers["Content-Range"] == f"bytes {MATRIX_PART_SIZE - 100}-{MATRIX_PART_SIZE - 1}/" \
                                                f"{MATRIX_PART_SIZE}"
        assert len(await resp.read()) == 100
    async with http.get(url, headers={"Range": f"bytes={MATRIX_PART_SIZE}-"}) as resp:
        assert resp.status == 416
        assert resp.headers["Content-Range"] == f"bytes */{MATRIX_PART_SIZE}"
    async with http.head(url) as resp:
        assert resp.status == 200 and int(resp.headers["Content-Length"]) == MATRIX_PART_SIZE
    async with http.get(url) as resp:  # full GET: read a little, then hang up
        assert resp.status == 200 and resp.content_length == MATRIX_PART_SIZE
        assert len(await resp.content.readexactly(1 << 20)) == 1 << 20
    async with http.get(plex_url(fakes, "/library/parts/9999/1/file.mp4")) as resp:
        assert resp.status == 404


async def test_plex_artwork_and_photo_transcoder(fakes, http):
    async with http.get(plex_url(fakes, "/library/metadata/1001/thumb/1700503600")) as resp:
        assert resp.headers["Content-Type"] == "image/jpeg"
        poster = Image.open(io.BytesIO(await resp.read()))
    assert (poster.format, poster.size) == ("JPEG", (1000, 1500))
    source = quote("/library/metadata/1001/art/1700503600", safe="")
    async with http.get(plex_url(fakes, f"/photo/:/transcode?width=320&height=180&minSize=1&upscale=1&url={source}")) \
            as resp:
        thumb = Image.open(io.BytesIO(await resp.read()))
    assert (thumb.format, thumb.size) == ("JPEG", (320, 180))
    remote = quote("https://image.tmdb.org/t/p/w500/x.jpg", safe="")
    async with http.get(plex_url(fakes, f"/photo/:/transcode?width=320&height=180&url={remote}")) as resp:
        assert resp.status == 400


async def test_plex_dash_session_serves_tokenless_segments(fakes, http):
    params = "path=%2Flibrary%2Fmetadata%2F1001&protocol=dash&session=abc123&directPlay=0&directStream=1"
    async with http.get(plex_url(fakes, f"/video/:/transcode/universal/decision?{params}"), headers=JSON) as resp:
        mc = (await resp.json())["MediaContainer"]
    assert mc["generalDecisionCode"] == 1001
    assert mc["Metadata"][0]["Media"][0]["Part"][0]["decision"] == "transcode"
    async with http.get(plex_url(fakes, f"/video/:/transcode/universal/start.mpd?{params}")) as resp:
        assert resp.headers["Content-Type"] == "application/dash+xml"
        mpd = ET.fromstring(await resp.read())
    ns = {"d": "urn:mpeg:dash:schema:mpd:2011"}
    templates = mpd.findall(".//d:SegmentTemplate", ns)
    assert [t.get("initialization") for t in templates] == ["session/abc123/0/header", "session/abc123/1/header"]
    assert templates[0].get("media") == "session/abc123/0/$Number$.m4s"

    base = fakes.urls["plex"] + "/video/:/transcode/universal/"
    async with http.get(base + "session/abc123/0/header") as resp:  # no token, like the browser
        assert resp.status == 200 and (await resp.read())[4:8] == b"ftyp"
    async with http.get(base + "session/abc123/1/3.m4s") as resp:
        assert resp.status == 200 and (await resp.read())[4:8] == b"styp"
    async with http.get(base + "session/nope/0/header") as resp:
        assert resp.status == 404
    async with http.get(plex_url(fakes, "/video/:/transcode/universal/stop?session=abc123")) as resp:
        assert resp.status == 200
    async with http.get(base + "session/abc123/0/0.m4s") as resp:
        assert resp.status == 404
    async with http.get(fakes.urls["plex"] + f"/video/:/transcode/universal/start.mpd?{params}") as resp:
        assert resp.status == 401


async def test_plex_play_state_is_per_user(fakes, http):
    async def deck(token):
        async with http.get(plex_url(fakes, "/library/onDeck", token), headers=JSON) as resp:
            return [m["ratingKey"] for m in (await resp.json())["MediaContainer"].get("Metadata", [])]

    assert await deck(PLEX_SERVER_TOKEN) == ["1003", "2004"]
    assert await deck(PLEX_SERVER_TOKEN_2) == []
    async with http.get(plex_url(fakes, "/:/timeline?ratingKey=1005&key=%2Flibrary%2Fmetadata%2F1005"
                                        "&state=playing&time=60000&duration=9840000", PLEX_SERVER_TOKEN_2)) as resp:
        assert resp.status == 200
    assert await deck(PLEX_SERVER_TOKEN_2) == ["1005"]
    assert "1005" not in await deck(PLEX_SERVER_TOKEN)
    async with http.get(plex_url(fakes, "/:/scrobble?key=1005&identifier=com.plexapp.plugins.library",
                                 PLEX_SERVER_TOKEN_2)) as resp:
        assert resp.status == 200
    async with http.get(plex_url(fakes, "/library/metadata/1005", PLEX_SERVER_TOKEN_2), headers=JSON) as resp:
        meta = (await resp.json())["MediaContainer"]["Metadata"][0]
    assert meta["viewCount"] == 1 and "viewOffset" not in meta
    async with http.put(plex_url(fakes, "/library/parts/3001?audioStreamID=30013")) as resp:
        assert resp.status == 200
    async with http.put(plex_url(fakes, "/library/parts/3001?audioStreamID=12")) as resp:
        assert resp.status == 400
    async with http.post(plex_url(fakes, f"/playQueues?type=video&uri=server%3A%2F%2F{PMS_MACHINE_ID}"
                                         "%2Fcom.plexapp.plugins.library%2Flibrary%2Fmetadata%2F2002"),
                         headers=JSON) as resp:
        queue = (await resp.json())["MediaContainer"]
    assert queue["playQueueTotalCount"] == 7 and queue["Metadata"][0]["title"] == "Pilot"


# --- TMDB ------------------------------------------------------------------------------------------
@pytest.fixture
def tmdb_client(fakes, monkeypatch):
    import tmdbsimple

    monkeypatch.setattr(tmdbsimple, "API_KEY", TMDB_V3_KEY)
    monkeypatch.setattr(tmdbsimple, "REQUESTS_SESSION",
                        RewritingSession({"https://api.themoviedb.org": fakes.urls["tmdb"]}))
    return tmdbsimple


async def test_tmdbsimple_works_against_the_fake(fakes, tmdb_client, monkeypatch):
    def calls():
        movie = tmdb_client.Movies(603)
        return (movie.info(), movie.credits(), tmdb_client.Search().movie(query="matrix"),
                tmdb_client.TV(1396).info(), tmdb_client.TV_Seasons(1396, 1).info(),
                tmdb_client.Movies(603).info(append_to_response="videos,external_ids"))

    info, credits, search, tv, season, appended = await asyncio.to_thread(calls)
    assert (info["title"], info["imdb_id"], info["runtime"]) == ("The Matrix", "tt0133093", 136)
    assert info["poster_path"].endswith(".jpg") and info["poster_path"].startswith("/")
    assert credits["cast"][0]["name"] == "Keanu Reeves"
    assert 603 in [r["id"] for r in search["results"]]
    assert set(search) == {"page", "results", "total_pages", "total_results"}
    assert tv["name"] == "Breaking Bad" and tv["seasons"][0]["season_number"] == 1
    assert [e["name"] for e in season["episodes"]][:1] == ["Pilot"]
    assert appended["external_ids"]["imdb_id"] == "tt0133093" and appended["videos"]["results"]
    assert fakes.requests["tmdb"][0].param("api_key") == TMDB_V3_KEY

    monkeypatch.setattr(tmdb_client, "USE_BEARER_AUTH", True, raising=False)
    monkeypatch.setattr(tmdb_client, "API_KEY", TMDB_V4_TOKEN)
    trending = await asyncio.to_thread(lambda: tmdb_client.Trending("movie", "week").info())
    assert trending["results"] and fakes.requests["tmdb"][-1].headers["Authorization"] == f"Bearer {TMDB_V4_TOKEN}"


async def test_tmdb_error_bodies_are_exact(fakes, http):
    base = fakes.urls["tmdb"] + "/3"
    async with http.get(base + "/movie/603") as resp:
        assert resp.status == 401
        assert resp.headers["Content-Type"] == "application/json;charset=utf-8"
        assert await resp.json() == {"status_code": 7, "status_message":
                                     "Invalid API key: You must be granted a valid key.", "success": False}
    async with http.get(base + "/movie/603", headers={"Authorization": "Bearer nope"}) as resp:
        assert resp.status == 401
    not_found = {"success": False, "status_code": 34,
                 "status_message": "The resource you requested could not be found."}
    for path in ("/movie/99999999", "/tv/1396/season/9", "/no/such/thing"):
        async with http.get(base + path, params={"api_key": TMDB_V3_KEY}) as resp:
            assert resp.status == 404 and await resp.json() == not_found, path
    fakes.tmdb.mode_429 = True
    async with http.get(base + "/movie/603", headers={"Authorization": f"Bearer {TMDB_V4_TOKEN}"}) as resp:
        assert resp.status == 429 and resp.headers["Retry-After"] == "3"
        assert await resp.json() == {"status_code": 25, "status_message":
                                     "Your request count (#) is over the allowed limit of (40).", "success": False}
    fakes.tmdb.mode_429 = False
    headers = {"Authorization": f"Bearer {TMDB_V4_TOKEN}", "Origin": "https://player.example"}
    async with http.get(base + "/trending/all/day", headers=headers) as resp:
        assert resp.status == 200 and resp.headers["Access-Control-Allow-Origin"] == "*"
        assert resp.headers["Cache-Control"].startswith("public, max-age=")
        etag = resp.headers["ETag"]
        body = await resp.json()
    assert {r["media_type"] for r in body["results"]} == {"movie", "tv"}
    async with http.get(base + "/trending/all/day", headers={**headers, "If-None-Match": etag}) as resp:
        assert resp.status == 304
    async with http.options(base + "/search/multi", headers={
            "Origin": "https://player.example", "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": "authorization"}) as resp:
        assert resp.status == 204 and resp.headers["Access-Control-Allow-Headers"] == "authorization"
    async with http.get(base + "/movie/upcoming", params={"api_key": TMDB_V3_KEY, "region": "US"}) as resp:
        assert {"dates", "page", "results", "total_pages", "total_results"} == set(await resp.json())


async def test_tmdb_images_are_real_pictures(fakes, http):
    base = fakes.urls["tmdb_images"] + "/t/p"
    async with http.get(fakes.urls["tmdb"] + "/3/movie/603", params={"api_key": TMDB_V3_KEY}) as resp:
        movie = await resp.json()
    cases = [(f"/w342{movie['poster_path']}", "JPEG", (342, 513)),
             (f"/w780{movie['backdrop_path']}", "JPEG", (780, 439)),
             (f"/original{movie['poster_path']}", "JPEG", (2000, 3000)),
             ("/w500/someLogoFile123.png", "PNG", (500, 150))]
    for path, fmt, size in cases:
        async with http.get(base + path) as resp:
            assert resp.status == 200, path
            assert resp.headers["Cache-Control"] == "max-age=31536000"
            assert resp.headers["Access-Control-Allow-Origin"] == "*"
            assert resp.headers["ETag"] and resp.headers["Last-Modified"]
            raw = await resp.read()
        assert int(resp.headers["Content-Length"]) == len(raw) > 5000  # textured, not a flat colour
        img = Image.open(io.BytesIO(raw))
        assert (img.format, img.size) == (fmt, size), path
    async with http.get(base + f"/w342{movie['poster_path']}") as again:
        assert await again.read() == (await (await http.get(base + f"/w342{movie['poster_path']}")).read())
    async with http.get(base + "/w999/x.jpg") as resp:
        assert resp.status == 404
    async with http.get(base + f"/original/{BOMB_NAME}") as resp:
        bomb = await resp.read()
    assert len(bomb) < 500_000
    with pytest.raises(Image.DecompressionBombError):
        Image.open(io.BytesIO(bomb))
    async with http.get(base + f"/w500/{NOT_AN_IMAGE_NAME}") as resp:
        assert resp.headers["Content-Type"] == "image/jpeg"
        junk = await resp.read()
    with pytest.raises(Exception):
        Image.open(io.BytesIO(junk))


# --- plex.tv ------------------------------------------------------------------------------------------
async def test_plextv_pin_flow_and_resources(fakes, http):
    base = fakes.urls["plextv"]
    async with http.post(base + "/api/v2/pins?strong=true", headers=JSON) as resp:
        assert resp.status == 400
        assert (await resp.json())["errors"][0]["code"] == 1000
    client = {**JSON, "X-Plex-Client-Identifier": "0d2c1e9a-test-client", "X-Plex-Product": "Player"}
    async with http.post(base + "/api/v2/pins?strong=true", headers=client) as resp:
        assert resp.status == 201
        pin = await resp.json()
    assert pin["authToken"] is None and len(pin["code"]) == 25 and pin["clientIdentifier"] == "0d2c1e9a-test-client"
    async with http.get(base + f"/api/v2/pins/{pin['id']}", headers=client) as resp:
        assert (await resp.json())["authToken"] is None
    fakes.plextv.link_pin(pin["id"], account_token=PLEX_ACCOUNT_TOKEN)
    async with http.get(base + f"/api/v2/pins/{pin['id']}", headers=client) as resp:
        assert (await resp.json())["authToken"] == PLEX_ACCOUNT_TOKEN

    async with http.post(base + "/api/v2/pins", headers=client) as resp:
        pin2 = await resp.json()
    async with http.post(base + f"/test/link/{pin2['id']}", data={"account_token": PLEX_ACCOUNT_TOKEN_2}) as resp:
        assert resp.status == 200
    async with http.get(base + f"/api/v2/pins/{pin2['id']}", headers=client) as resp:
        assert (await resp.json())["authToken"] == PLEX_ACCOUNT_TOKEN_2

    async with http.get(base + "/api/v2/resources?includeHttps=1&includeRelay=1",
                        headers={**client, "X-Plex-Token": PLEX_ACCOUNT_TOKEN}) as resp:
        resources = await resp.json()
    servers = [r for r in resources if r["provides"] == "server"]
    assert len(servers) == 1 and servers[0]["clientIdentifier"] == PMS_MACHINE_ID
    assert servers[0]["accessToken"] == PLEX_SERVER_TOKEN
    assert servers[0]["connections"][0]["uri"] == fakes.urls["plex"]
    async with http.get(servers[0]["connections"][0]["uri"] + "/library/sections",
                        params={"X-Plex-Token": servers[0]["accessToken"]}) as resp:
        assert resp.status == 200

    async with http.get(base + "/api/v2/user", headers={**JSON, "X-Plex-Token": PLEX_ACCOUNT_TOKEN_2}) as resp:
        user = await resp.json()
    assert user["username"] == "trinity_k" and user["authToken"] == PLEX_ACCOUNT_TOKEN_2
    async with http.get(base + "/api/v2/user", headers={**JSON, "X-Plex-Token": "bad"}) as resp:
        assert resp.status == 401
        assert await resp.json() == {"errors": [{"code": 1001, "message": "User could not be authenticated",
                                                 "status": 401}]}


async def test_plexapi_account_and_resource_connect(fakes):
    from plexapi.myplex import MyPlexAccount

    def login():
        session = RewritingSession({"https://plex.tv": fakes.urls["plextv"]})
        account = MyPlexAccount(token=PLEX_ACCOUNT_TOKEN_2, session=session)
        resource = account.resource("nebuchadnezzar")
        server = resource.connect()
        return account.username, account.id, resource.owned, server.machineIdentifier, [u.username for u in
                                                                                         account.users()]

    username, account_id, owned, machine_id, friends = await asyncio.to_thread(login)
    assert (username, account_id, owned, machine_id) == ("trinity_k", 24689013, False, PMS_MACHINE_ID)
    assert friends == ["mrandersson"]


async def test_discover_watchlist_is_per_account(fakes, http):
    base = fakes.urls["plextv"] + "/library/sections/watchlist/all"

    async def titles(token):
        async with http.get(base, params={"X-Plex-Token": token, "X-Plex-Container-Size": "200"},
                            headers=JSON) as resp:
            assert resp.headers["X-Plex-Container-Total-Size"]
            return [m["title"] for m in (await resp.json())["MediaContainer"].get("Metadata", [])]

    assert await titles(PLEX_ACCOUNT_TOKEN) == ["Dune: Part Two", "Severance", "Arrival"]
    assert await titles(PLEX_ACCOUNT_TOKEN_2) == []
    async with http.get(plex_url(fakes, "/library/metadata/1001"), headers=JSON) as resp:
        plex_guid = (await resp.json())["MediaContainer"]["Metadata"][0]["guid"]
    matrix_key = plex_guid.rsplit("/", 1)[-1]  # PMS and discover share the plex:// id
    assert matrix_key == MOVIES_BY_TMDB[603].plex_guid_id
    watch = fakes.urls["plextv"] + f"/library/metadata/{matrix_key}/watchlist"
    async with http.put(watch, params={"X-Plex-Token": PLEX_ACCOUNT_TOKEN_2}) as resp:
        assert resp.status == 200
    assert await titles(PLEX_ACCOUNT_TOKEN_2) == ["The Matrix"]
    async with http.delete(watch, params={"X-Plex-Token": PLEX_ACCOUNT_TOKEN_2}) as resp:
        assert resp.status == 200
    assert await titles(PLEX_ACCOUNT_TOKEN_2) == []
    async with http.get(base, params={"X-Plex-Token": PLEX_ACCOUNT_TOKEN}) as resp:  # XML by default
        assert ET.fromstring(await resp.read()).get("totalSize") == "3"


# --- Trakt -----------------------------------------------------------------------------------------------
async def test_trakt_device_flow_and_tokens(fakes, http):
    base = fakes.urls["trakt"]
    async with http.get(base + "/users/me", headers={"trakt-api-version": "2"}) as resp:
        assert resp.status == 403
    async with http.get(base + "/users/me", headers=TRAKT_HEADERS) as resp:
        assert resp.status == 401
    creds = {"client_id": TRAKT_CLIENT_ID, "client_secret": TRAKT_CLIENT_SECRET}
    async with http.post(base + "/oauth/device/code", json={"client_id": TRAKT_CLIENT_ID},
                         headers=TRAKT_HEADERS) as resp:
        code = await resp.json()
    assert set(code) == {"device_code", "user_code", "verification_url", "expires_in", "interval"}
    poll = {"code": code["device_code"], **creds}
    async with http.post(base + "/oauth/device/token", json=poll, headers=TRAKT_HEADERS) as resp:
        assert resp.status == 400
    async with http.post(base + "/oauth/device/token", json={**poll, "client_secret": "x"},
                         headers=TRAKT_HEADERS) as resp:
        assert resp.status == 401 and (await resp.json())["error"] == "invalid_client"
    fakes.trakt.approve(code["device_code"])
    async with http.post(base + "/oauth/device/token", json=poll, headers=TRAKT_HEADERS) as resp:
        tokens = await resp.json()
    assert (tokens["access_token"], tokens["refresh_token"]) == (TRAKT_ACCESS_TOKEN, TRAKT_REFRESH_TOKEN)
    async with http.post(base + "/oauth/device/token", json=poll, headers=TRAKT_HEADERS) as resp:
        assert resp.status == 409
    auth = {**TRAKT_HEADERS, "Authorization": f"Bearer {TRAKT_ACCESS_TOKEN}"}
    async with http.get(base + "/users/me", headers=auth) as resp:
        assert (await resp.json())["username"] == "mrandersson"
    async with http.post(base + "/oauth/token", headers=TRAKT_HEADERS, json={
            "refresh_token": TRAKT_REFRESH_TOKEN, "grant_type": "refresh_token",
            "redirect_uri": "urn:ietf:wg:oauth:2.0:oob", **creds}) as resp:
        fresh = await resp.json()
    assert fresh["access_token"] != TRAKT_ACCESS_TOKEN
    async with http.post(base + "/oauth/revoke", json={"token": fresh["access_token"], **creds},
                         headers=TRAKT_HEADERS) as resp:
        assert resp.status == 200
    async with http.get(base + "/users/me", headers={**auth, "Authorization": f"Bearer {fresh['access_token']}"}) \
            as resp:
        assert resp.status == 401


async def test_trakt_lists_pagination_and_watchlist_sync(fakes, http):
    base = fakes.urls["trakt"]
    async with http.get(base + "/movies/trending?page=1&limit=2", headers=TRAKT_HEADERS) as resp:
        assert resp.headers["X-Pagination-Page"] == "1" and resp.headers["X-Pagination-Limit"] == "2"
        assert int(resp.headers["X-Pagination-Item-Count"]) >= 5
        trending = await resp.json()
    assert len(trending) == 2 and set(trending[0]) == {"watchers", "movie"}
    auth = {**TRAKT_HEADERS, "Authorization": f"Bearer {TRAKT_ACCESS_TOKEN}"}
    async with http.post(base + "/sync/watchlist", headers=auth,
                         json={"movies": [{"ids": {"tmdb": 603}}, {"ids": {"tmdb": 1}}]}) as resp:
        assert resp.status == 201
        result = await resp.json()
    assert result["added"]["movies"] == 1 and result["not_found"]["movies"] == [{"ids": {"tmdb": 1}}]
    async with http.get(base + "/users/me/watchlist/movies", headers=auth) as resp:
        assert "The Matrix" in [e["movie"]["title"] for e in await resp.json()]
    async with http.post(base + "/sync/watchlist/remove", headers=auth,
                         json={"movies": [{"ids": {"trakt": 481}}]}) as resp:
        assert (await resp.json())["deleted"]["movies"] == 1
    async with http.get(base + "/users/me/history/movies", headers=auth) as resp:
        assert resp.headers["X-Pagination-Item-Count"] == "2"
    async with http.get(base + "/recommendations/movies?limit=3", headers=auth) as resp:
        assert len(await resp.json()) <= 3


# --- the container ---------------------------------------------------------------------------------------
async def test_recording_clear_and_down(fakes, http):
    async with http.options(fakes.urls["tmdb"] + "/3/configuration", headers={"Origin": "https://x.example"}):
        pass
    async with http.post(fakes.urls["trakt"] + "/oauth/device/code", json={"client_id": TRAKT_CLIENT_ID}):
        pass
    recorded = fakes.requests["tmdb"][-1]
    assert (recorded.method, recorded.path) == ("OPTIONS", "/3/configuration")
    assert recorded.headers["origin"] == "https://x.example" and recorded.time > 0
    assert json.loads(fakes.requests["trakt"][-1].body) == {"client_id": TRAKT_CLIENT_ID}
    fakes.clear()
    assert all(not reqs for reqs in fakes.requests.values())

    fakes.set_down("tmdb", True)
    with pytest.raises(aiohttp.ServerDisconnectedError):
        async with http.get(fakes.urls["tmdb"] + "/3/configuration", params={"api_key": TMDB_V3_KEY}):
            pass
    assert fakes.requests["tmdb"], "requests to a down fake are still recorded"
    fakes.set_down("tmdb", False)
    async with http.get(fakes.urls["tmdb"] + "/3/configuration", params={"api_key": TMDB_V3_KEY}) as resp:
        assert resp.status == 200


async def test_fixed_ports():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    async with FakeUpstreams(ports={"plex": port}) as fixed:
        assert fixed.urls["plex"] == f"http://127.0.0.1:{port}"
        assert fixed.plextv.pms_url == fixed.urls["plex"]


def test_latency_option_names_fakes_and_seconds():
    import argparse

    from fake_upstreams.__main__ import parse_latency
    assert parse_latency("plex=0.08,tmdb=0.15") == {"plex": 0.08, "tmdb": 0.15}
    with pytest.raises(argparse.ArgumentTypeError):
        parse_latency("nosuch=1")


async def test_plextv_lists_the_owners_second_server_only_when_asked_and_it_is_a_server_of_its_own(fakes, http):
    from fake_upstreams import data

    async def servers(accept: str = "application/json") -> bytes:
        async with http.get(fakes.urls["plextv"] + "/api/v2/resources",
                            headers={"X-Plex-Token": data.PLEX_ACCOUNT_TOKEN, "Accept": accept}) as r:
            assert r.status == 200
            return await r.read()

    def ids(body: bytes) -> list[str]:
        return [r["clientIdentifier"] for r in json.loads(body) if "server" in r["provides"]]

    assert ids(await servers()) == [data.PMS_MACHINE_ID]
    fakes.plextv.list_second_server = True
    both = json.loads(await servers())
    assert ids(json.dumps(both).encode()) == [data.PMS_MACHINE_ID, data.SECOND_PMS_MACHINE_ID]
    second = both[1]
    assert second["accessToken"] == data.SECOND_PMS_TOKEN
    local = second["connections"][0]
    assert local["local"] and local["uri"].endswith(f".{data.SECOND_PMS_HASH}.plex.direct:{local['port']}")
    assert fakes.second_plex_url.endswith(f":{local['port']}")
    xml = ET.fromstring(await servers("application/xml"))
    assert data.SECOND_PMS_MACHINE_ID in [n.get("clientIdentifier") for n in xml.iter("resource")]

    base = fakes.second_plex_url
    async with http.get(base + "/identity", headers=JSON) as r:
        assert (await r.json())["MediaContainer"]["machineIdentifier"] == data.SECOND_PMS_MACHINE_ID
    async with http.get(base + "/library/sections", headers={"X-Plex-Token": PLEX_SERVER_TOKEN, **JSON}) as r:
        assert r.status == 401  # the first server's token is no token here
    async with http.get(base + "/library/sections/7/all", headers={"X-Plex-Token": data.SECOND_PMS_TOKEN}) as r:
        assert r.status == 200 and b'title="Koyaanisqatsi"' in await r.read()
    assert "second_plex" not in fakes.urls and len(fakes.second_plex.requests) == 3
    fakes.clear()
    assert fakes.second_plex.requests == []
