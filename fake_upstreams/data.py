"""The shared, hand-made dataset behind every fake upstream, and the credentials they accept.

One small library that is consistent across services: the Plex movie "The Matrix" has the
`tmdb://603` / `imdb://tt0133093` GUIDs, TMDB id 603 and Trakt id 481, and its poster path is the
same file on image.tmdb.org that the Plex role/watchlist thumbs point at. Facts (titles, years,
runtimes, TMDB/IMDb/TVDB ids) are the real public ones; artwork paths and most secondary ids are
made up in the real formats.
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass

# --- credentials ---------------------------------------------------------------------------------
# Plex tokens are 20 characters of [A-Za-z0-9_-]; these look like real ones but are fixed.
PLEX_SERVER_TOKEN = "xHHVmwInU0RSMShhxqlQ"  # owner's access token for the fake PMS
PLEX_ACCOUNT_TOKEN = "dOEEgaubM7JNhl-cH8TK"  # owner's plex.tv account token (PIN login result)
PLEX_SERVER_TOKEN_2 = "dTu1rkopcCyMJb0JW3UG"  # second user: the server is shared with them
PLEX_ACCOUNT_TOKEN_2 = "rx5P2DagsbfouVGWZhIO"

TMDB_V3_KEY = "db55323b8d3e4154498498a75642b381"


def _b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


# TMDB v4 read tokens are HS256 JWTs whose `aud` is the v3 key.
TMDB_V4_TOKEN = ".".join(
    [
        _b64url(b'{"alg":"HS256"}'),
        _b64url(
            json.dumps(
                {
                    "aud": TMDB_V3_KEY,
                    "nbf": 1700000000.123,
                    "sub": "65f1c0a8e8b5c3017d2a9f41",
                    "scopes": ["api_read"],
                    "version": 1,
                },
                separators=(",", ":"),
            ).encode()
        ),
        _b64url(hashlib.sha256(b"projectionist-fake-tmdb").digest()),
    ]
)

TRAKT_CLIENT_ID = "1e1aa8a78ae0abea4d2b8703c8ceb7fe138f2698d9f32377e2b5c0ff12f6b571"
TRAKT_CLIENT_SECRET = "5b878dc4b19ad562026994f96ccb1c1d3f3566c66ee53862e94bbf144e233515"
TRAKT_ACCESS_TOKEN = "c3bc0367d429e58f669d23ce25adb5a90fa977acf6e840f57a33a726ba37c5fb"
TRAKT_REFRESH_TOKEN = "2639d1e4b9fb2b269cfce100c9840213b5feb1c9e9ec6271ec06b73e102d9b53"


# --- accounts (plex.tv) and the server (PMS) ------------------------------------------------------
@dataclass(frozen=True)
class Account:
    id: int
    uuid: str
    username: str
    email: str
    account_token: str
    server_token: str  # this user's accessToken for the fake PMS (plex.tv resources)
    owner: bool  # owns the fake PMS (user 2 has it shared)
    joined_at: int

    @property
    def thumb(self) -> str:
        return f"https://plex.tv/users/{self.uuid}/avatar?c={self.joined_at}"


ACCOUNTS = (
    Account(18573262, "001f98c91cf03911", "mrandersson", "thomas.anderson@example.com",
            PLEX_ACCOUNT_TOKEN, PLEX_SERVER_TOKEN, True, 1433271112),
    Account(24689013, "5267f11cc70e4646", "trinity_k", "trinity@example.org",
            PLEX_ACCOUNT_TOKEN_2, PLEX_SERVER_TOKEN_2, False, 1581945077),
)


# A plex.tv account the fake PMS is NOT shared with: it owns a server of its own elsewhere
# (admission tests: its sign-in must be refused). plex.tv knows it; the fake PMS does not.
PLEX_ACCOUNT_TOKEN_STRANGER = "Zq3stRaNgerAcct9xW2v"
STRANGER = Account(31337042, "9c1d5e7a2b3f4a60", "cypher_r", "cypher@example.net",
                   PLEX_ACCOUNT_TOKEN_STRANGER, "Zq3stRaNgerSrvr7kP4m", False, 1600000000)
STRANGER_SERVER_MACHINE_ID = "7d2e91c0a4b84f5fa3c6e0d1b2a9f8e7c6d5b4a3"
STRANGER_SERVER_NAME = "zion-archive"


def plextv_account_by_token(token: str | None) -> Account | None:
    """Every account plex.tv knows (the fake PMS only knows ACCOUNTS)."""
    if token and token in (STRANGER.account_token, STRANGER.server_token):
        return STRANGER
    if token and token == SECOND_PMS_TOKEN:  # the owner's token for the second server, as for the first
        return ACCOUNTS[0]
    return account_by_token(token)


def account_by_token(token: str | None) -> Account | None:
    """plex.tv accepts account tokens; the PMS also accepts each user's server token."""
    for acc in ACCOUNTS:
        if token and token in (acc.account_token, acc.server_token):
            return acc
    return None


PMS_MACHINE_ID = "ce040bbdc5ad9b157e37ac6dd751309689229a63"
PMS_FRIENDLY_NAME = "nebuchadnezzar"
PMS_VERSION = "1.43.2.10687-563d026ea"
PMS_PLATFORM = "Linux"
PMS_PLATFORM_VERSION = "6.8.0-49-generic"
PMS_UPDATED_AT = 1731000000

# --- TMDB reference tables -----------------------------------------------------------------------
MOVIE_GENRES = {28: "Action", 12: "Adventure", 878: "Science Fiction", 53: "Thriller", 18: "Drama",
                9648: "Mystery", 80: "Crime", 14: "Fantasy"}
TV_GENRES = {18: "Drama", 80: "Crime", 9648: "Mystery", 10765: "Sci-Fi & Fantasy"}


def tmdb_file(seed: str, ext: str = ".jpg") -> str:
    """A TMDB-style image path (`/` + 27 base62 chars) derived from a seed."""
    alphabet = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
    n = int.from_bytes(hashlib.sha256(seed.encode()).digest(), "big")
    chars = []
    for _ in range(27):
        n, r = divmod(n, 62)
        chars.append(alphabet[r])
    return "/" + "".join(chars) + ext


def hex_id(seed: str, n: int = 24) -> str:
    return hashlib.sha1(seed.encode()).hexdigest()[:n]


@dataclass(frozen=True)
class Person:
    id: int
    name: str
    gender: int  # TMDB: 1 female, 2 male
    department: str
    birthday: str
    place_of_birth: str
    imdb_id: str
    popularity: float

    @property
    def profile_path(self) -> str:
        return tmdb_file(f"person-{self.id}")


PEOPLE = {p.id: p for p in (
    Person(6384, "Keanu Reeves", 2, "Acting", "1964-09-02", "Beirut, Lebanon", "nm0000206", 52.3),
    Person(2975, "Laurence Fishburne", 2, "Acting", "1961-07-30", "Augusta, Georgia, USA", "nm0000401", 21.7),
    Person(530, "Carrie-Anne Moss", 1, "Acting", "1967-08-21", "Burnaby, British Columbia, Canada", "nm0005251", 18.9),
    Person(1331, "Hugo Weaving", 2, "Acting", "1960-04-04", "Ibadan, Nigeria", "nm0915989", 17.2),
    Person(9340, "Lana Wachowski", 1, "Directing", "1965-06-21", "Chicago, Illinois, USA", "nm0905154", 6.1),
    Person(9339, "Lilly Wachowski", 1, "Directing", "1967-12-29", "Chicago, Illinois, USA", "nm0905152", 4.8),
    Person(6193, "Leonardo DiCaprio", 2, "Acting", "1974-11-11", "Los Angeles, California, USA", "nm0000138", 61.4),
    Person(24045, "Joseph Gordon-Levitt", 2, "Acting", "1981-02-17", "Los Angeles, California, USA", "nm0330687", 19.5),
    Person(27578, "Elliot Page", 2, "Acting", "1987-02-21", "Halifax, Nova Scotia, Canada", "nm0680983", 17.8),
    Person(525, "Christopher Nolan", 2, "Directing", "1970-07-30", "London, England, UK", "nm0634240", 14.9),
    Person(9273, "Amy Adams", 1, "Acting", "1974-08-20", "Vicenza, Veneto, Italy", "nm0010736", 33.1),
    Person(17604, "Jeremy Renner", 2, "Acting", "1971-01-07", "Modesto, California, USA", "nm0719637", 29.0),
    Person(2178, "Forest Whitaker", 2, "Acting", "1961-07-15", "Longview, Texas, USA", "nm0001845", 20.3),
    Person(137427, "Denis Villeneuve", 2, "Directing", "1967-10-03", "Bécancour, Québec, Canada", "nm0898288", 11.6),
    Person(30614, "Ryan Gosling", 2, "Acting", "1980-11-12", "London, Ontario, Canada", "nm0331516", 48.2),
    Person(3, "Harrison Ford", 2, "Acting", "1942-07-13", "Chicago, Illinois, USA", "nm0000148", 38.6),
    Person(224513, "Ana de Armas", 1, "Acting", "1988-04-30", "Havana, Cuba", "nm1869101", 57.9),
    Person(1190668, "Timothée Chalamet", 2, "Acting", "1995-12-27", "New York City, New York, USA", "nm3154303", 71.0),
    Person(505710, "Zendaya", 1, "Acting", "1996-09-01", "Oakland, California, USA", "nm3918035", 69.3),
    Person(17419, "Bryan Cranston", 2, "Acting", "1956-03-07", "Hollywood, California, USA", "nm0186505", 37.5),
    Person(84497, "Aaron Paul", 2, "Acting", "1979-08-27", "Emmett, Idaho, USA", "nm0666739", 24.9),
    Person(134531, "Anna Gunn", 1, "Acting", "1968-08-11", "Cleveland, Ohio, USA", "nm0348152", 12.4),
    Person(66633, "Vince Gilligan", 2, "Writing", "1967-02-10", "Richmond, Virginia, USA", "nm0319213", 8.7),
    Person(1230, "Adam Scott", 2, "Acting", "1973-04-03", "Santa Cruz, California, USA", "nm0777465", 21.2),
    Person(2227, "Britt Lower", 1, "Acting", "1985-10-02", "Chicago, Illinois, USA", "nm2008337", 16.1),
    Person(2231, "Ben Stiller", 2, "Directing", "1965-11-30", "New York City, New York, USA", "nm0001774", 25.5),
)}


@dataclass(frozen=True)
class Movie:
    tmdb_id: int
    imdb_id: str
    title: str
    release_date: str
    runtime: int  # minutes
    genre_ids: tuple[int, ...]
    overview: str
    tagline: str
    vote_average: float
    vote_count: int
    popularity: float
    budget: int
    revenue: int
    studio: str
    content_rating: str
    cast: tuple[tuple[int, str], ...]  # (person id, character)
    crew: tuple[tuple[int, str, str], ...]  # (person id, department, job)
    trakt_id: int
    trailer_key: str
    collection: tuple[int, str] | None = None
    # Plex side (None: not in the fake PMS library)
    rating_key: str | None = None
    part_id: int | None = None
    part_size: int = 24 * 1024 * 1024
    poster_path: str | None = None
    backdrop_path: str | None = None

    @property
    def year(self) -> int:
        return int(self.release_date[:4])

    @property
    def poster(self) -> str:
        return self.poster_path or tmdb_file(f"movie-{self.tmdb_id}-poster")

    @property
    def backdrop(self) -> str:
        return self.backdrop_path or tmdb_file(f"movie-{self.tmdb_id}-backdrop")

    @property
    def plex_guid_id(self) -> str:  # discover.provider.plex.tv ratingKey
        return hex_id(f"plex-movie-{self.tmdb_id}")

    @property
    def slug(self) -> str:
        keep = "".join(c if c.isalnum() else "-" for c in self.title.lower())
        return "-".join(filter(None, keep.split("-"))) + f"-{self.year}"


MB = 1024 * 1024
MATRIX_PART_SIZE = 500 * MB

MOVIES = (
    Movie(603, "tt0133093", "The Matrix", "1999-03-31", 136, (28, 878),
          "Set in the 22nd century, The Matrix tells the story of a computer hacker who joins a group of "
          "underground insurgents fighting the vast and powerful computers who now rule the earth.",
          "Welcome to the Real World.", 8.2, 26213, 84.6, 63000000, 463517383,
          "Village Roadshow Pictures", "R",
          ((6384, "Neo"), (2975, "Morpheus"), (530, "Trinity"), (1331, "Agent Smith")),
          ((9340, "Directing", "Director"), (9339, "Directing", "Director"),
           (9340, "Writing", "Writer"), (9339, "Writing", "Writer")),
          481, "vKQi3bBA1y8", (2344, "The Matrix Collection"),
          rating_key="1001", part_id=3001, part_size=MATRIX_PART_SIZE,
          poster_path="/f89U3ADr1oiB1s9GkdPOEpXUk5H.jpg", backdrop_path="/fNG7i7RqMErkcqhohV2a6cV1Ehy.jpg"),
    Movie(604, "tt0234215", "The Matrix Reloaded", "2003-05-15", 138, (12, 28, 53, 878),
          "Six months after the events depicted in The Matrix, Neo has proved to be a good omen for the free "
          "humans, as more and more humans are being freed from the matrix and brought to Zion.",
          "Free your mind.", 7.1, 11077, 41.2, 150000000, 741847937,
          "Village Roadshow Pictures", "R",
          ((6384, "Neo"), (2975, "Morpheus"), (530, "Trinity"), (1331, "Agent Smith")),
          ((9340, "Directing", "Director"), (9339, "Directing", "Director")),
          482, "kYzz0FSgpSU", (2344, "The Matrix Collection"),
          rating_key="1002", part_id=3002),
    Movie(27205, "tt1375666", "Inception", "2010-07-15", 148, (28, 878, 12),
          "Cobb, a skilled thief who commits corporate espionage by infiltrating the subconscious of his "
          "targets is offered a chance to regain his old life as payment for a task considered to be impossible.",
          "Your mind is the scene of the crime.", 8.4, 37102, 92.1, 160000000, 839030630,
          "Legendary Pictures", "PG-13",
          ((6193, "Dom Cobb"), (24045, "Arthur"), (27578, "Ariadne")),
          ((525, "Directing", "Director"), (525, "Writing", "Screenplay")),
          16662, "YoHD9XEInc0",
          rating_key="1003", part_id=3003),
    Movie(329865, "tt2543164", "Arrival", "2016-11-10", 116, (18, 878, 9648),
          "Taking place after alien crafts land around the world, an expert linguist is recruited by the "
          "military to determine whether they come in peace or are a threat.",
          "Why are they here?", 7.6, 18602, 35.4, 47000000, 203388186,
          "FilmNation Entertainment", "PG-13",
          ((9273, "Louise Banks"), (17604, "Ian Donnelly"), (2178, "Colonel Weber")),
          ((137427, "Directing", "Director"),),
          210803, "tFMo3UJ4B4g",
          rating_key="1004", part_id=3004),
    Movie(335984, "tt1856101", "Blade Runner 2049", "2017-10-04", 164, (878, 18),
          "Thirty years after the events of the first film, a new blade runner, LAPD Officer K, unearths a "
          "long-buried secret that has the potential to plunge what's left of society into chaos.",
          "The key to the future is finally unearthed.", 7.5, 14410, 44.8, 150000000, 259239658,
          "Alcon Entertainment", "R",
          ((30614, "K"), (3, "Rick Deckard"), (224513, "Joi")),
          ((137427, "Directing", "Director"),),
          214343, "gCcx85zbxz4",
          rating_key="1005", part_id=3005),
    # TMDB/Trakt only: trending and upcoming titles the user does not own.
    Movie(693134, "tt15239678", "Dune: Part Two", "2024-02-27", 167, (878, 12),
          "Follow the mythic journey of Paul Atreides as he unites with Chani and the Fremen while on a path "
          "of revenge against the conspirators who destroyed his family.",
          "Long live the fighters.", 8.1, 6821, 311.5, 190000000, 714644358,
          "Legendary Pictures", "PG-13",
          ((1190668, "Paul Atreides"), (505710, "Chani")),
          ((137427, "Directing", "Director"),),
          615584, "U2Qp5pL3ovA"),
    Movie(624860, "tt10838180", "The Matrix Resurrections", "2021-12-16", 148, (878, 28, 12),
          "Plagued by strange memories, Neo's life takes an unexpected turn when he finds himself back "
          "inside the Matrix.",
          "Return to the source.", 6.4, 6120, 38.9, 190000000, 159200000,
          "Village Roadshow Pictures", "R",
          ((6384, "Thomas Anderson / Neo"), (530, "Tiffany / Trinity")),
          ((9340, "Directing", "Director"),),
          471133, "9ix7TUGVYIo", (2344, "The Matrix Collection")),
    Movie(1170608, "tt31378509", "Dune: Part Three", "2026-12-16", 150, (878, 12),
          "The final chapter of the Dune saga.", "", 0.0, 0, 120.4, 0, 0,
          "Legendary Pictures", "",
          ((1190668, "Paul Atreides"), (505710, "Chani")),
          ((137427, "Directing", "Director"),),
          1031547, "n9xhJrPXop4"),
)


@dataclass(frozen=True)
class Episode:
    number: int
    tmdb_id: int
    tvdb_id: int
    title: str
    air_date: str
    runtime: int
    overview: str
    trakt_id: int
    rating_key: str | None = None
    part_id: int | None = None
    part_size: int = 8 * MB

    @property
    def still_path(self) -> str:
        return tmdb_file(f"episode-{self.tmdb_id}-still")


@dataclass(frozen=True)
class Season:
    number: int
    tmdb_id: int
    air_date: str
    episode_count: int
    overview: str
    episodes: tuple[Episode, ...] = ()
    rating_key: str | None = None

    @property
    def poster_path(self) -> str:
        return tmdb_file(f"season-{self.tmdb_id}-poster")


@dataclass(frozen=True)
class Show:
    tmdb_id: int
    tvdb_id: int
    imdb_id: str
    name: str
    first_air_date: str
    last_air_date: str
    status: str
    genre_ids: tuple[int, ...]
    overview: str
    tagline: str
    network: tuple[int, str]
    creators: tuple[int, ...]
    cast: tuple[tuple[int, str], ...]
    vote_average: float
    vote_count: int
    popularity: float
    content_rating: str
    studio: str
    number_of_episodes: int
    seasons: tuple[Season, ...]
    trakt_id: int
    trailer_key: str
    rating_key: str | None = None
    poster_path: str | None = None
    backdrop_path: str | None = None

    @property
    def year(self) -> int:
        return int(self.first_air_date[:4])

    @property
    def poster(self) -> str:
        return self.poster_path or tmdb_file(f"tv-{self.tmdb_id}-poster")

    @property
    def backdrop(self) -> str:
        return self.backdrop_path or tmdb_file(f"tv-{self.tmdb_id}-backdrop")

    @property
    def plex_guid_id(self) -> str:
        return hex_id(f"plex-show-{self.tmdb_id}")

    @property
    def slug(self) -> str:
        keep = "".join(c if c.isalnum() else "-" for c in self.name.lower())
        return "-".join(filter(None, keep.split("-")))


_BB_EPISODES = (
    (62085, 349232, "Pilot", "2008-01-20", 58,
     "When an unassuming high school chemistry teacher discovers he has a rare form of lung cancer, he "
     "decides to team up with a former student and create a top of the line crystal meth."),
    (62086, 349235, "Cat's in the Bag...", "2008-01-27", 48,
     "Walt and Jesse attempt to tie up loose ends. The desperate situation gets more complicated with the "
     "flip of a coin."),
    (62087, 349236, "...And the Bag's in the River", "2008-02-10", 48,
     "Walter fights with Jesse over his drug use, causing him to leave Walter alone with their captive, "
     "Krazy-8."),
    (62088, 349237, "Cancer Man", "2008-02-17", 48,
     "Walter finally tells his family that he has been stricken with cancer."),
    (62089, 349238, "Gray Matter", "2008-02-24", 48,
     "Walter and Skyler attend a former colleague's party. Jesse tries to free himself from the drugs."),
    (62090, 349239, "Crazy Handful of Nothin'", "2008-03-02", 47,
     "The side effects of chemo begin to plague Walt. Meanwhile, the DEA rounds up suspected dealers."),
    (62091, 349240, "A No-Rough-Stuff-Type Deal", "2008-03-09", 47,
     "Walter accepts his new identity as a drug dealer after a PTA meeting."),
)

SHOWS = (
    Show(1396, 81189, "tt0903747", "Breaking Bad", "2008-01-20", "2013-09-29", "Ended", (18, 80),
         "Walter White, a New Mexico chemistry teacher, is diagnosed with Stage III cancer and given a "
         "prognosis of only two years left to live. He becomes filled with a sense of fearlessness and an "
         "unrelenting desire to secure his family's financial future at any cost as he enters the "
         "dangerous world of drugs and crime.",
         "Change the equation.", (174, "AMC"), (66633,),
         ((17419, "Walter White"), (84497, "Jesse Pinkman"), (134531, "Skyler White")),
         8.9, 14780, 298.9, "TV-MA", "Sony Pictures Television Studios", 62,
         (Season(1, 3572, "2008-01-20", 7,
                 "High school chemistry teacher Walter White's life is suddenly transformed by a dire medical "
                 "diagnosis.",
                 tuple(Episode(i + 1, tmdb, tvdb, title, air, rt, ov, 73482 + i, rating_key=str(2003 + i),
                               part_id=3011 + i)
                       for i, (tmdb, tvdb, title, air, rt, ov) in enumerate(_BB_EPISODES)),
                 rating_key="2002"),
          Season(2, 3573, "2009-03-08", 13,
                 "Walt must deal with the chain reaction of his choice, as he and Jesse face new and severe "
                 "consequences.")),
         1388, "HhesaQXLuRY", rating_key="2001",
         poster_path="/ggFHVNu6YYI5L9pCfOacjizRGt.jpg", backdrop_path="/bsNm9z2TJfe0WO3RedPGWQ8mG1X.jpg"),
    Show(95396, 371980, "tt11280740", "Severance", "2022-02-18", "2025-03-21", "Returning Series",
         (18, 9648, 10765),
         "Mark leads a team of office workers whose memories have been surgically divided between their work "
         "and personal lives.",
         "Please enjoy each season equally.", (2552, "Apple TV+"), (2231,),
         ((1230, "Mark Scout"), (2227, "Helly R.")),
         8.4, 2301, 121.7, "TV-MA", "Fifth Season", 19,
         (Season(1, 122196, "2022-02-18", 9, "Mark leads a team of office workers."),),
         154997, "xEQP4VVuyrY"),
)

MOVIES_BY_TMDB = {m.tmdb_id: m for m in MOVIES}
SHOWS_BY_TMDB = {s.tmdb_id: s for s in SHOWS}

# --- Plex library layout ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Section:
    key: str
    title: str
    type: str  # "movie" | "show"
    agent: str
    scanner: str
    uuid: str
    location: str
    created_at: int


SECTIONS = (
    Section("1", "Films", "movie", "tv.plex.agents.movie", "Plex Movie",
            "542a1e7d-f426-4657-8315-d88030955179", "/data/movies", 1700000000),
    Section("2", "TV Shows", "show", "tv.plex.agents.series", "Plex TV Series",
            "ddf8b8a2-5097-4cc5-8d78-ce8200db89da", "/data/tv", 1700000100),
)

COLLECTION_RATING_KEY = "1100"
MATRIX_TRAILER_RATING_KEY = "1006"
MATRIX_TRAILER_PART_ID = 3006
MATRIX_TRAILER_PART_SIZE = 4 * MB


@dataclass
class ViewState:
    """Per-user Plex watch state of one item (what timeline/scrobble/rate change)."""

    view_count: int = 0
    view_offset: int = 0  # ms
    last_viewed_at: int | None = None
    user_rating: float | None = None


def initial_view_states() -> dict[tuple[int, str], ViewState]:
    """The owner is half-way through Inception and Breaking Bad 1x02; user 2 has watched nothing."""
    owner = ACCOUNTS[0].id
    return {
        (owner, "1003"): ViewState(view_offset=2_345_000, last_viewed_at=1731400000),
        (owner, "1001"): ViewState(view_count=2, last_viewed_at=1730000000, user_rating=10.0),
        (owner, "2003"): ViewState(view_count=1, last_viewed_at=1731300000),
        (owner, "2004"): ViewState(view_offset=1_200_000, last_viewed_at=1731310000),
    }


def initial_watchlists() -> dict[int, list[str]]:
    """plex.tv (discover) watchlists by account id, newest first, as discover ratingKeys."""
    return {
        ACCOUNTS[0].id: [MOVIES_BY_TMDB[693134].plex_guid_id, SHOWS_BY_TMDB[95396].plex_guid_id,
                         MOVIES_BY_TMDB[329865].plex_guid_id],
        ACCOUNTS[1].id: [],
    }


def initial_trakt_watchlist() -> list[tuple[str, int, str]]:
    """Trakt watchlist of the (single) Trakt user: (kind, tmdb id, listed_at)."""
    return [("movie", 693134, "2024-11-02T09:12:44.000Z"), ("show", 95396, "2024-10-28T21:03:10.000Z")]


def initial_trakt_history() -> list[tuple[str, int, int | None, int | None, str]]:
    """Trakt history: (kind, tmdb id, season, episode, watched_at), newest first."""
    return [
        ("episode", 1396, 1, 1, "2024-11-11T20:15:00.000Z"),
        ("movie", 603, None, None, "2024-10-27T21:40:00.000Z"),
        ("movie", 335984, None, None, "2024-09-14T19:02:00.000Z"),
    ]


# --- a second Plex server of the owner (tests of several servers; plex.tv lists it on request) ------
SECOND_PMS_MACHINE_ID = "5f1d8c3b9a7e4d2c86b0a4e1f3c7d9b2e6a8c0f4"
SECOND_PMS_FRIENDLY_NAME = "zion-archive"
SECOND_PMS_HASH = "9b8e7d6c5b4a49388271605f4e3d2c1b"  # its plex.direct certificate's hash
SECOND_PMS_TOKEN = "Zn2ArchvSrvTkn8qWe3R"  # the owner's access token for it (plex.tv resources)
# Its own library: nothing in common with the first server's.
SECOND_PMS_SECTIONS = (("7", "movie", "Documentaries"), ("8", "artist", "Soundtracks"))
SECOND_PMS_ITEMS = {"7": (("7101", "Koyaanisqatsi", 1982), ("7102", "Baraka", 1992)),
                    "8": (("8101", "Music of the Spheres", 1999),)}
