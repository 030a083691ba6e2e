"""`rules.yaml`: its schema, its loader (errors carry line numbers), and the compiled matcher.

This module is the only owner of the file's format. The proxy hot-reloads it; `projectionist
check-rules` prints its errors. Shape:

    version: 1
    proxy:      {unknown_hosts: pass|refuse, stream_threshold: 1MB, ...}
    cache:      {memory_max_bytes, disk_max_bytes}            # response cache sizing
    images:     {max_bytes, directory, formats, ...}          # image cache and re-encoding
    limits:     {NAME: {rate: 2/s, burst, per, when_credential, max_wait}}   # named rate limiters
    upstreams:  {NAME: {kind, hosts, base_url, listen, credentials, limits, intercept}}
    routes:     [{name, upstream, methods, path, query, cache | image, limits, throttle, credentials, stream}]
    jobs:       {NAME: {every: 1h | cron: "30 3 * * *", timeout, enabled}}   # control/jobs.py schedules
    retention:  {usage_events: 30d, rate_limit_events: 30d, sessions: 30d, ...}  # the retention job

A request is first attributed to an upstream (by listener for reverse listeners, by host for the
explicit proxy), then to the first route of that upstream whose method, path pattern and query
conditions match. Requests to hosts no upstream names are not ours: passed through untouched and
unrecorded (or refused, by `proxy.unknown_hosts`).
"""

from __future__ import annotations

import fnmatch
import functools
import re
import stat
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
)

# --- value types -------------------------------------------------------------------------------

_SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9,
               "kib": 2**10, "mib": 2**20, "gib": 2**30}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*$", re.I)


def _parse_size(value: Any) -> Any:
    """Byte sizes may be written as integers or as "64MB", "1 GiB"."""
    if isinstance(value, str):
        m = _SIZE_RE.match(value)
        if not m or m.group(2).lower() not in _SIZE_UNITS:
            raise ValueError(f"not a size: {value!r} (use e.g. 512KB, 64MB, 1GiB or a byte count)")
        return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])
    return value


ByteSize = Annotated[int, BeforeValidator(_parse_size), Field(ge=0)]

_RATE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*(\d*(?:\.\d+)?)\s*(s|sec|second|m|min|minute|h|hour)\s*$")
_PER_SECONDS = {"s": 1, "sec": 1, "second": 1, "m": 60, "min": 60, "minute": 60, "h": 3600, "hour": 3600}


def _parse_rate(value: Any) -> Any:
    """Rates are written "2/s", "40/s", "100/min", "1/10s"; stored as requests per second."""
    if isinstance(value, str):
        m = _RATE_RE.match(value)
        if not m:
            raise ValueError(f"not a rate: {value!r} (use e.g. 2/s, 100/min, 1/10s)")
        count, span, unit = float(m.group(1)), float(m.group(2) or 1), _PER_SECONDS[m.group(3)]
        return count / (span * unit)
    return value


Rate = Annotated[float, BeforeValidator(_parse_rate), Field(gt=0)]

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d|w)?\s*$")
_DURATION_SECONDS = {None: 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def _parse_duration(value: Any) -> Any:
    """Durations are seconds, or written "90s", "15m", "1h", "30d", "2w"."""
    if isinstance(value, str):
        m = _DURATION_RE.match(value)
        if not m:
            raise ValueError(f"not a duration: {value!r} (use e.g. 90s, 15m, 1h, 30d or a number of seconds)")
        return float(m.group(1)) * _DURATION_SECONDS[m.group(2)]
    return value


Duration = Annotated[float, BeforeValidator(_parse_duration), Field(gt=0)]
Seconds = Annotated[float, Field(ge=0)]
Name = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")]
# Per-target memos on the hit path (routes, cache keys): bounded in count, and targets longer
# than this are worked out each time (a memo of huge query strings would cost more than it saves).
MEMO_ENTRIES = 2048
MEMO_MAX_TARGET = 2048

HTTP_METHODS = {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "*"}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --- schema ------------------------------------------------------------------------------------

class Timeouts(_Strict):
    """Seconds allowed for each phase of an upstream exchange (nginx's proxy_connect_timeout,
    proxy_read_timeout): opening the connection, the first byte of the answer after the request
    went out, and any gap between two reads of the body. Unset fields inherit: route, then
    upstream, then `proxy.timeouts`."""

    connect: Seconds | None = Field(default=None, gt=0)
    first_byte: Seconds | None = Field(default=None, gt=0)
    idle: Seconds | None = Field(default=None, gt=0)


@dataclass(frozen=True)
class ResolvedTimeouts:
    connect: float
    first_byte: float
    idle: float

    @property
    def until_headers(self) -> float:
        return self.connect + self.first_byte


class ProxySettings(_Strict):
    unknown_hosts: Literal["pass", "refuse"] = "pass"
    # A request to TMDB or Trakt without a live surrogate of an enabled user (anonymous): forward it
    # untouched (the client's own key works; the server's TMDB key and Trakt app credentials are
    # never added), refuse it (401 in the upstream's format), or lend it the server's credentials
    # (the behaviour before issue 17: only for a proxy that nobody but trusted clients can reach).
    anonymous: Literal["forward", "refuse", "lend"] = "forward"
    # Responses bigger than this (or of unknown length with a media type) stream through.
    stream_threshold: ByteSize = 1_000_000
    # Seconds the cache waits for an upstream before answering stale or a clean 504.
    upstream_timeout: Seconds = Field(default=15, gt=0)
    # Every upstream exchange's timeouts; unset: connect 5 s, first_byte and idle upstream_timeout.
    timeouts: Timeouts = Timeouts()
    # With a stale entry usable (stale_if_error), the client gets it after this many seconds of
    # waiting while the fetch goes on in the background for the cache (Varnish's grace).
    stale_timeout: Seconds = Field(default=2, gt=0)
    # Request bodies bigger than this are refused with 413 (routes may set their own max_body);
    # nginx's client_max_body_size.
    max_request_body: ByteSize = 10_000_000
    # Rate-limit state shared by several proxy processes (redis://host:port/db); unset: in-process.
    # The environment's PROJECTIONIST_REDIS_URL wins over this.
    redis_url: str | None = Field(default=None, pattern=r"^(redis|rediss|unix)://")
    # Proxy processes sharing the listeners (launcher/workers.py); unset: with redis_url the
    # machine's cores (at most 4), else 1. More than one needs redis_url. `--workers` wins.
    workers: int | None = Field(default=None, ge=1, le=64)


class CacheSettings(_Strict):
    memory_max_bytes: ByteSize = 64_000_000
    disk_max_bytes: ByteSize = 1_000_000_000
    # With proxy.redis_url: answers up to this size are shared by every proxy process through
    # Redis (projectionist/shared_tier.py); bigger ones stay in each process's own layers.
    shared_max_body_bytes: ByteSize = 1_000_000


class ImageSettings(_Strict):
    """The image cache (proxy_addons/image_cache.py): disk cap, source caps, re-encoding."""

    max_bytes: ByteSize = 2_000_000_000
    # Where it lives; a relative path is under the Projectionist home.
    directory: str = "cache/images"
    memory_max_bytes: ByteSize = 64_000_000  # hot images also kept in memory
    # Sources over either cap are refused (422): decompression bombs, runaway downloads.
    source_max_bytes: ByteSize = 25_000_000
    source_max_pixels: int = Field(default=50_000_000, gt=0)
    # Re-encode to these (first one the client's Accept names wins) when that makes the image smaller.
    formats: list[Literal["webp", "avif"]] = ["webp"]
    webp_quality: int = Field(default=80, ge=1, le=100)
    avif_quality: int = Field(default=60, ge=1, le=100)
    jpeg_quality: int = Field(default=85, ge=1, le=100)  # resized JPEGs that stay JPEG
    # Pillow worker processes (and concurrent jobs); default: one per CPU but one, so that
    # transcodes never take the last core from the proxy (at least 1).
    workers: int | None = Field(default=None, ge=1, le=64)
    worker_timeout: Seconds = Field(default=30, gt=0)
    cleanup_interval: Seconds = Field(default=600, gt=0)  # how often expired entries are removed


class Limit(_Strict):
    """A GCRA limiter: `rate` sustained, `burst` extra at once, requests over it queue up to `max_wait`."""

    rate: Rate
    burst: int = Field(default=1, ge=1)
    per: Literal["credential", "user", "client", "upstream", "server", "global"] = "credential"
    # Restricts the limiter to one kind of injected credential (e.g. the shared default TMDB key).
    when_credential: Literal["default", "custom", "any"] = "any"
    max_wait: Seconds = 5
    # A per-client/per-user limit: what a client that spent its own burst here gets from the
    # request's other (shared) limits. queue: it waits for its slot like anyone; yield: it only
    # takes a slot that is free right now, out of no one's burst (as background work does), else
    # 429 + Retry-After. A flood then spends only what people leave, and never holds their queue.
    over: Literal["queue", "yield"] = "queue"


class CacheRule(_Strict):
    ttl: Seconds
    stale_while_revalidate: Seconds = 0
    stale_if_error: Seconds = 0
    vary: list[str] = []
    scope: Literal["shared", "user"] = "user"
    # Cache 404s this long (0: never cache errors).
    negative_ttl: Seconds = 0
    # Store even when the upstream says Cache-Control: no-store/private.
    override_no_store: bool = False
    # Keep entries in memory only: for answers holding per-user surrogates (plex.tv user, resources).
    memory_only: bool = False


class ImageRule(_Strict):
    """An image route: answered from the image cache, re-encoded and capped per `images:` settings."""

    ttl: Seconds = 86400
    stale_while_revalidate: Seconds = 0
    # The URL names immutable content (TMDB): cached a year, `Cache-Control: immutable`.
    immutable: bool = False
    scope: Literal["shared", "user"] = "user"
    max_width: int | None = Field(default=None, ge=16)  # wider sources are scaled down to this
    optimize: bool = True  # re-encode to images.formats when the client accepts them
    # Query parameter naming another image the upstream will fetch (Plex /photo/:/transcode
    # `url`): only server-local paths, hosts named here and declared Plex servers are let through.
    source_param: str | None = None


class Throttle(_Strict):
    """Forward at most one request per `interval` per key; answer the rest locally."""

    interval: Seconds
    per: Literal["session", "user", "client"] = "session"
    # Query parameters that identify the thing being throttled (e.g. ratingKey).
    key_params: list[str] = []
    # A change in any of these forwards at once (e.g. timeline `state`).
    forward_on_change: list[str] = []


CredentialKind = Literal["none", "tmdb", "plex", "trakt"]


class PlexServers(_Strict):
    """Which of the account's Plex servers (plex.tv `resources`, by machine identifier) a
    `plex-server` upstream reaches besides the one at its base_url, which it always serves."""

    include: list[str] = []  # only these (empty: every server the account reaches)
    exclude: list[str] = []  # never these: their connections are refused (421), their tokens never sent

    def allows(self, machine_id: str) -> bool:
        return machine_id not in self.exclude and (not self.include or machine_id in self.include)


class Upstream(_Strict):
    kind: Literal["plex-server", "plex-tv", "tmdb", "tmdb-images", "trakt", "other"]
    # Host names (fnmatch wildcards allowed) this upstream answers to through the explicit proxy.
    hosts: list[str] = []
    # Where a reverse listener forwards to (and the scheme/port used for `hosts`).
    base_url: str | None = None
    # Port of a reverse listener for this upstream: the address a user types as "Plex URL".
    listen: int | None = Field(default=None, ge=1, le=65535)
    # How players reach that listener (written into plex.tv resources); default http://<host>:<listen>.
    public_url: str | None = None
    credentials: CredentialKind = "none"
    limits: list[str] = []
    # `when_overridden`: its hosts pass through untouched (TLS not intercepted) unless an upstream override
    # (PROJECTIONIST_UPSTREAMS) sends them elsewhere: the offline demo serves app.plex.tv's sign-in page.
    intercept: Literal["always", "when_overridden"] = "always"
    timeouts: Timeouts = Timeouts()
    # plex-server: the other servers of the account it reaches (README: every server the account reaches).
    servers: PlexServers = PlexServers()

    @field_validator("servers")
    @classmethod
    def _check_servers(cls, v: PlexServers, info) -> PlexServers:
        if (v.include or v.exclude) and info.data.get("kind") != "plex-server":
            raise ValueError("only a plex-server upstream reaches Plex servers")
        return v

    @field_validator("base_url", "public_url")
    @classmethod
    def _check_base_url(cls, v: str | None) -> str | None:
        if v is not None:
            parts = urlsplit(v)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(f"must be an http(s) URL with a host, got {v!r}")
        return v


class Route(_Strict):
    name: Name
    upstream: str | list[str]
    methods: list[str] = ["*"]
    # Path pattern(s): `{name}` matches one segment, `*` any characters within a segment, `**`
    # anything (a trailing `/**` also matches the bare prefix).
    path: str | list[str] = "/**"
    # Query conditions: parameter -> regular expression the value must fully match.
    query: dict[str, str] = {}
    cache: CacheRule | None = None
    image: ImageRule | None = None
    # Route names whose cached entries a matching request invalidates (for writes).
    invalidates: list[str] = []
    limits: list[str] = []
    throttle: Throttle | None = None
    credentials: CredentialKind | None = None  # None: the upstream's
    stream: bool = False
    record: bool = True
    timeouts: Timeouts = Timeouts()
    max_body: ByteSize | None = None  # request body limit; None: proxy.max_request_body

    @field_validator("methods")
    @classmethod
    def _check_methods(cls, v: list[str]) -> list[str]:
        upper = [m.upper() for m in v]
        bad = [m for m in upper if m not in HTTP_METHODS]
        if bad:
            raise ValueError(f"unknown HTTP method(s): {', '.join(bad)}")
        return upper

    @field_validator("path")
    @classmethod
    def _check_path(cls, v: str | list[str]) -> str | list[str]:
        for pattern in [v] if isinstance(v, str) else v:
            if not pattern.startswith("/"):
                raise ValueError(f"path pattern must start with '/', got {pattern!r}")
        return v

    @field_validator("query")
    @classmethod
    def _check_query(cls, v: dict[str, str]) -> dict[str, str]:
        for param, pattern in v.items():
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"query.{param}: invalid regular expression {pattern!r}: {exc}")
        return v


class JobSettings(_Strict):
    """Overrides of one scheduled job's defaults (control/jobs.py): `every` or `cron`, not both."""

    every: Duration | None = None
    cron: str | None = None  # five fields, in the server's time zone (TZ): "30 3 * * *"
    timeout: Duration | None = None
    enabled: bool = True

    @field_validator("cron")
    @classmethod
    def _check_cron(cls, v: str | None) -> str | None:
        if v is not None:
            from apscheduler.triggers.cron import CronTrigger
            try:
                CronTrigger.from_crontab(v, timezone="UTC")
            except ValueError as exc:
                raise ValueError(f"not a crontab expression (minute hour day month weekday): {exc}") from None
        return v

    def model_post_init(self, _context: Any) -> None:
        if self.every is not None and self.cron is not None:
            raise ValueError("give either every or cron, not both")


class RetentionSettings(_Strict):
    """How long the retention job keeps raw rows; the hourly rollups are kept for good."""

    usage_events: Duration = 30 * 86400
    rate_limit_events: Duration = 30 * 86400
    sessions: Duration = 30 * 86400  # expired or revoked sessions, kept a while for the record
    auth_flows: Duration = 86400  # sign-in flows past their expiry
    job_runs: Duration = 30 * 86400
    cache_flush_requests: Duration = 7 * 86400  # applied ones
    backups: int = Field(default=7, ge=1)  # archives of the scheduled backup job kept (the newest)


class WarmingSettings(_Strict):
    """What the cache warmer fetches ahead of the player (proxy_addons/cache_warmer.py), how often
    (the `cache-warm` job) and how deep. Its requests are background work: they take an upstream
    slot only when one is free and wait (Retry-After) when none is."""

    enabled: bool = True
    every: Duration = 1800
    # TMDB lists Home and New & Popular show (paths under https://api.themoviedb.org).
    tmdb_lists: list[str] = ["/3/trending/movie/week", "/3/trending/tv/week", "/3/movie/popular", "/3/tv/popular",
                             "/3/trending/all/day", "/3/movie/upcoming?region=US"]
    # How many titles of each list also get their details page's requests (0: lists only).
    details: int = Field(default=5, ge=0, le=100)
    detail_parts: list[str] = ["", "/credits", "/recommendations", "/similar", "/videos",
                               "/images?include_image_language=en%2Cnull"]
    poster_size: str | None = "w342"  # the posters of every title listed, at the size the player asks
    # After a sign-in: the account's Plex Home and library ({section}: each section's key), and
    # the thumbnails they list.
    plex_paths: list[str] = ["/library/onDeck", "/library/recentlyAdded?X-Plex-Container-Size=50",
                             "/library/sections/{section}/all?sort=titleSort&X-Plex-Container-Start=0"
                             "&X-Plex-Container-Size=100",
                             "/library/sections/{section}/all?type=1&sort=random:desc&X-Plex-Container-Start=0"
                             "&X-Plex-Container-Size=1",
                             "/library/sections/{section}/genre", "/library/sections/{section}/collections"]
    # The details page of the first `details` items each of those lists ({rk}: the item's key).
    plex_item_paths: list[str] = ["/library/metadata/{rk}?includeExtras=1&includeExternalMedia=1&includeChildren=1",
                                  "/library/metadata/{rk}/children"]
    max_requests: int = Field(default=400, ge=1)  # per run


class RulesFile(_Strict):
    version: Literal[1]
    proxy: ProxySettings = ProxySettings()
    cache: CacheSettings = CacheSettings()
    images: ImageSettings = ImageSettings()
    limits: dict[Name, Limit] = {}
    upstreams: dict[Name, Upstream]
    routes: list[Route] = []
    jobs: dict[Name, JobSettings] = {}
    retention: RetentionSettings = RetentionSettings()
    warming: WarmingSettings = WarmingSettings()


# --- errors with line numbers --------------------------------------------------------------------

Loc = tuple[str | int, ...]


@dataclass(frozen=True)
class RuleProblem:
    source: str
    line: int | None
    column: int | None
    loc: Loc
    message: str

    def __str__(self) -> str:
        where = self.source
        if self.line is not None:
            where += f":{self.line}:{self.column}"
        return f"{where}: {format_loc(self.loc) or '(top level)'}: {self.message}"


class RulesError(ValueError):
    def __init__(self, problems: list[RuleProblem]):
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


def format_loc(loc: Loc) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


class _MarkedLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (YAML silently keeps the last one)."""


def _compose_with_marks(text: str, source: str) -> tuple[Any, dict[Loc, yaml.Mark]]:
    """Parse YAML into plain data plus a map from each key path to where it was written."""
    try:
        node = yaml.compose(text, Loader=_MarkedLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise RulesError([RuleProblem(
            source, mark.line + 1 if mark else None, mark.column + 1 if mark else None, (),
            f"not valid YAML: {getattr(exc, 'problem', None) or exc}",
        )]) from None
    marks: dict[Loc, yaml.Mark] = {}
    problems: list[RuleProblem] = []
    constructor = _MarkedLoader("")

    def walk(n: yaml.Node | None, loc: Loc) -> Any:
        if n is None:
            return None
        marks.setdefault(loc, n.start_mark)
        if isinstance(n, yaml.MappingNode):
            out: dict[Any, Any] = {}
            for key_node, value_node in n.value:
                key = constructor.construct_object(key_node, deep=True)
                if key in out:
                    m = key_node.start_mark
                    problems.append(RuleProblem(source, m.line + 1, m.column + 1, loc + (key,),
                                                "duplicate key (each key may appear once)"))
                marks[loc + (key,)] = key_node.start_mark
                out[key] = walk(value_node, loc + (key,))
            return out
        if isinstance(n, yaml.SequenceNode):
            return [walk(item, loc + (i,)) for i, item in enumerate(n.value)]
        return constructor.construct_object(n, deep=True)

    data = walk(node, ())
    if problems:
        raise RulesError(problems)
    return data, marks


def _problem_at(source: str, marks: Mapping[Loc, yaml.Mark], loc: Loc, message: str) -> RuleProblem:
    for end in range(len(loc), -1, -1):  # the deepest written key that contains the problem
        mark = marks.get(loc[:end])
        if mark is not None:
            return RuleProblem(source, mark.line + 1, mark.column + 1, loc, message)
    return RuleProblem(source, None, None, loc, message)


def _pydantic_message(err: Mapping[str, Any]) -> str:
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        return "unknown key (check its spelling and indentation)"
    if err["type"] == "missing":
        return "required key is missing"
    if "input" in err and err["type"] not in ("model_type", "dict_type") and not _may_hold_secret(err.get("loc", ()), err["input"]):
        value = err["input"]
        shown = repr(value)
        return f"{msg} (got {shown if len(shown) <= 60 else type(value).__name__})"
    return msg


def _may_hold_secret(loc: Loc, value: Any) -> bool:
    """Not to be echoed in an error (errors reach logs and `check-rules` output): a URL with
    user information, such as a `proxy.redis_url` carrying a password."""
    return isinstance(value, str) and "@" in value and any(str(part).endswith("_url") for part in loc)


def _cross_references(model: RulesFile) -> Iterator[tuple[Loc, str]]:
    """Checks pydantic cannot make on one field: names that must exist, ports used once."""
    ports: dict[int, str] = {}
    for name, up in model.upstreams.items():
        for i, limit in enumerate(up.limits):
            if limit not in model.limits:
                yield ("upstreams", name, "limits", i), f"no limit named {limit!r} in limits"
        if up.listen is not None:
            if up.listen in ports:
                yield ("upstreams", name, "listen"), f"port {up.listen} is already used by upstream {ports[up.listen]!r}"
            ports[up.listen] = name
            if up.base_url is None:
                yield ("upstreams", name, "listen"), "a reverse listener needs a base_url to forward to"
        if not up.hosts and up.listen is None:
            yield ("upstreams", name), "needs hosts (explicit proxy) or listen (reverse listener), or both"
    seen: dict[str, int] = {}
    for i, route in enumerate(model.routes):
        if route.name in seen:
            yield ("routes", i, "name"), f"route name {route.name!r} is already used by routes[{seen[route.name]}]"
        seen.setdefault(route.name, i)
        if route.cache is not None and route.image is not None:
            yield ("routes", i, "image"), "a route is cached either as an API answer (cache) or as an image (image)"
        for up in [route.upstream] if isinstance(route.upstream, str) else route.upstream:
            if up not in model.upstreams:
                yield ("routes", i, "upstream"), f"no upstream named {up!r} in upstreams"
        for j, limit in enumerate(route.limits):
            if limit not in model.limits:
                yield ("routes", i, "limits", j), f"no limit named {limit!r} in limits"
    for i, route in enumerate(model.routes):
        for j, target in enumerate(route.invalidates):
            if target not in seen:
                yield ("routes", i, "invalidates", j), f"no route named {target!r} to invalidate"


def _private_warnings(model: RulesFile) -> Iterator[tuple[Loc, str]]:
    """`scope: shared` rules that are the first match for a path belonging to one account (USER_PATHS)."""
    compiled = [(i, route, _compile_paths(route.path)) for i, route in enumerate(model.routes)]
    warned: set[int] = set()
    for name, upstream in model.upstreams.items():
        for probe in USER_PATH_PROBES.get(upstream.kind, ()):
            for i, route, path_re in compiled:
                ups = [route.upstream] if isinstance(route.upstream, str) else route.upstream
                if (name not in ups or route.query or not {"GET", "*"} & set(route.methods)
                        or not path_re.match(probe)):
                    continue
                rule = route.cache or route.image
                if rule is not None and rule.scope == "shared" and i not in warned:
                    warned.add(i)
                    yield (("routes", i, "path"),
                           f"scope shared also matches {upstream.kind} paths that belong to one account (e.g. {probe}): "
                           "those are cached per user; narrow the path or use scope: user")
                break  # first match wins


def parse_rules(text: str, source: str = "rules.yaml") -> Rules:
    data, marks = _compose_with_marks(text, source)
    if not isinstance(data, dict):
        raise RulesError([RuleProblem(source, 1, 1, (), "the file must be a mapping (version, upstreams, routes, ...)")])
    try:
        model = RulesFile.model_validate(data)
    except ValidationError as exc:
        problems = [_problem_at(source, marks, tuple(err["loc"]), _pydantic_message(err))
                    for err in exc.errors()]
        raise RulesError(sorted(problems, key=lambda p: (p.line or 0, p.column or 0))) from None
    problems = [_problem_at(source, marks, loc, msg) for loc, msg in _cross_references(model)]
    if problems:
        raise RulesError(problems)
    warnings = [_problem_at(source, marks, loc, msg) for loc, msg in _private_warnings(model)]
    return Rules(model, source, warnings=warnings)


def read_rules_bytes(path: Path | str) -> bytes:
    """The file's bytes; a file that cannot be read (missing, a directory, no permission) is a
    RulesError naming why."""
    path = Path(path)
    try:
        if not stat.S_ISREG(path.stat().st_mode):  # a directory; a FIFO would block the read forever
            raise RulesError([RuleProblem(str(path), None, None, (), "cannot read: not a regular file")])
        return path.read_bytes()
    except OSError as exc:
        raise RulesError([RuleProblem(str(path), None, None, (), f"cannot read: {exc.strerror or exc}")]) from None


def decode_rules(data: bytes, source: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise RulesError([RuleProblem(source, line, column, (),
                                      f"not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start})")]) from None


def load_rules(path: Path | str) -> Rules:
    return parse_rules(decode_rules(read_rules_bytes(path), str(path)), str(path))


# --- what is never shared --------------------------------------------------------------------------
# Answers that belong to one account whatever a route's `scope` says: these paths of each upstream
# kind, and requests carrying a user's credential (Trakt's bearer token, a TMDB session, any Plex
# token). A `shared` rule matching such a request is applied as `user` (Rules.user_specific), and
# `check-rules` warns about shared rules that match one of the probes below.
USER_PATHS: dict[str, tuple[str, ...]] = {
    "trakt": ("/users/**", "/sync/**", "/recommendations/**", "/oauth/**", "/checkin/**", "/scrobble/**",
              "/calendars/my/**", "/shows/{id}/progress/**"),
    "tmdb": ("/3/account/**", "/3/authentication/**", "/3/guest_session/**", "/3/list/**", "/3/**/account_states",
             "/3/**/rating", "/4/**"),
    "plex-server": ("/**",),  # every Plex answer is shaped by the account that asks
    "plex-tv": ("/**",),
}
USER_CREDENTIAL_HEADERS: dict[str, tuple[str, ...]] = {
    "trakt": ("authorization",), "plex-server": ("x-plex-token",), "plex-tv": ("x-plex-token",)}
USER_CREDENTIAL_PARAMS: dict[str, tuple[str, ...]] = {  # lower case, as `name=` in the query
    "tmdb": ("session_id=", "guest_session_id="), "plex-server": ("x-plex-token=",), "plex-tv": ("x-plex-token=",)}
USER_PATH_PROBES: dict[str, tuple[str, ...]] = {
    "trakt": ("/users/someone/history", "/users/someone/watchlist/movies", "/users/me/ratings", "/sync/history",
              "/sync/watchlist", "/recommendations/movies", "/calendars/my/shows/2024-01-01/7",
              "/shows/1390/progress/watched"),
    "tmdb": ("/3/account/1/favorite/movies", "/3/movie/603/account_states", "/3/tv/1399/season/1/episode/1/account_states",
             "/3/list/1", "/3/guest_session/abc/rated/movies", "/3/authentication/session/new",
             "/4/account/abc/lists", "/4/list/1"),
    "plex-server": ("/library/sections", "/library/metadata/1", "/hubs/search"),
    "plex-tv": ("/api/v2/user", "/api/v2/resources", "/library/sections/watchlist/all"),
}


# --- compiled matcher ----------------------------------------------------------------------------

def _compile_path(pattern: str) -> str:
    out = ""
    for token in re.split(r"(/\*\*$|\*\*|\*|\{[A-Za-z_][A-Za-z0-9_]*\})", pattern):
        if token == "/**":
            out += "(?:/.*)?"
        elif token == "**":
            out += ".*"
        elif token == "*":
            out += "[^/]*"
        elif token.startswith("{") and token.endswith("}"):
            out += "[^/]+"
        else:
            out += re.escape(token)
    return out


def _compile_paths(patterns: str | list[str]) -> re.Pattern[str]:
    patterns = [patterns] if isinstance(patterns, str) else patterns
    return re.compile("|".join(f"(?:{_compile_path(p)})" for p in patterns) + r"\Z")


_USER_PATH_RES = {kind: _compile_paths(list(paths)) for kind, paths in USER_PATHS.items()}


@functools.lru_cache(maxsize=MEMO_ENTRIES)  # a pure function of the target; a player repeats its targets
def _user_specific_target(kind: str, path: str) -> bool:
    """The target part of `Rules.user_specific`: a user's credential in the query, or a user's path."""
    if "?" in path and any(param in path.lower() for param in USER_CREDENTIAL_PARAMS.get(kind, ())):
        return True
    private = _USER_PATH_RES.get(kind)
    return private is not None and private.match(path.split("?", 1)[0]) is not None


@dataclass(frozen=True)
class CompiledRoute:
    rule: Route
    path_re: re.Pattern[str]
    query_res: tuple[tuple[str, re.Pattern[str]], ...]
    methods: frozenset[str]

    @property
    def name(self) -> str:
        return self.rule.name

    def matches(self, method: str, path: str, query: Mapping[str, str]) -> bool:
        if "*" not in self.methods and method not in self.methods:
            return False
        if not self.path_re.match(path):
            return False
        return all(
            (value := query.get(param)) is not None and regex.fullmatch(value)
            for param, regex in self.query_res
        )


@dataclass(frozen=True)
class Match:
    upstream_name: str
    upstream: Upstream
    route: CompiledRoute | None  # None: the upstream's own, otherwise unclassified traffic

    @property
    def route_name(self) -> str:
        return self.route.name if self.route else f"{self.upstream_name}:other"

    @property
    def credentials(self) -> CredentialKind:
        if self.route and self.route.rule.credentials is not None:
            return self.route.rule.credentials
        return self.upstream.credentials

    def timeouts(self, proxy: ProxySettings) -> ResolvedTimeouts:
        """The route's timeouts, else the upstream's, else proxy.timeouts, else the defaults."""
        layers = [t for t in (self.route.rule.timeouts if self.route else None, self.upstream.timeouts, proxy.timeouts) if t]

        def pick(name: str, default: float) -> float:
            return next((v for t in layers if (v := getattr(t, name)) is not None), default)

        return ResolvedTimeouts(pick("connect", 5.0), pick("first_byte", proxy.upstream_timeout),
                                pick("idle", proxy.upstream_timeout))

    def max_body(self, proxy: ProxySettings) -> int:
        if self.route and self.route.rule.max_body is not None:
            return self.route.rule.max_body
        return proxy.max_request_body


@dataclass
class Rules:
    """The validated file plus lookup structures built once per load (matching never rescans)."""

    model: RulesFile
    source: str = "rules.yaml"
    _exact_hosts: dict[str, str] = field(default_factory=dict)
    _wildcard_hosts: list[tuple[str, str]] = field(default_factory=list)
    _routes_by_upstream: dict[str, list[CompiledRoute]] = field(default_factory=dict)
    _reverse_listeners: dict[int, str] = field(default_factory=dict)
    # (upstream, method, request target) -> Match: a player asks for the same targets over and over.
    _matched: dict[tuple[str, str, str], Match] = field(default_factory=dict, compare=False, repr=False)
    # Things that are valid but probably wrong (check-rules prints them): shared rules over private paths.
    warnings: list[RuleProblem] = field(default_factory=list)

    def __post_init__(self) -> None:
        for name, up in self.model.upstreams.items():
            if up.listen is not None:
                self._reverse_listeners[up.listen] = name
            for host in up.hosts:
                host = host.lower()
                if any(c in host for c in "*?["):
                    self._wildcard_hosts.append((host, name))
                else:
                    self._exact_hosts.setdefault(host, name)
            self._routes_by_upstream[name] = []
        for route in self.model.routes:
            compiled = CompiledRoute(
                rule=route,
                path_re=_compile_paths(route.path),
                query_res=tuple((k, re.compile(v)) for k, v in route.query.items()),
                methods=frozenset(route.methods),
            )
            for up in [route.upstream] if isinstance(route.upstream, str) else route.upstream:
                self._routes_by_upstream[up].append(compiled)

    @property
    def upstreams(self) -> dict[str, Upstream]:
        return self.model.upstreams

    @property
    def routes(self) -> list[Route]:
        return self.model.routes

    def upstream_for_host(self, host: str) -> str | None:
        host = host.lower().rstrip(".")
        if (name := self._exact_hosts.get(host)) is not None:
            return name
        for pattern, name in self._wildcard_hosts:
            if fnmatch.fnmatchcase(host, pattern):
                return name
        return None

    def user_specific(self, kind: str, path: str, headers: Mapping[str, str]) -> bool:
        """Whether the answer to this request belongs to one account, whatever its rule's scope:
        a user-specific path of its upstream kind or a user's credential on the request. `path`
        is the request target with its query (credentials in the query count too)."""
        if any(name in headers for name in USER_CREDENTIAL_HEADERS.get(kind, ())):
            return True
        return _user_specific_target(kind, path) if len(path) <= MEMO_MAX_TARGET else (
            _user_specific_target.__wrapped__(kind, path))

    def reverse_listener(self, port: int) -> str | None:
        """The upstream whose reverse listener is on `port` (per request: no copy)."""
        return self._reverse_listeners.get(port)

    def match(self, upstream_name: str, method: str, path: str, query: Mapping[str, str]) -> Match:
        upstream = self.model.upstreams[upstream_name]
        for route in self._routes_by_upstream.get(upstream_name, ()):
            if route.matches(method, path, query):
                return Match(upstream_name, upstream, route)
        return Match(upstream_name, upstream, None)

    def match_target(self, upstream_name: str, method: str, target: str, query: Callable[[], Mapping[str, str]]) -> Match:
        """`match` for a request target (path and query), remembered per target; `query()` parses
        the query, called only when the target is new."""
        key = (upstream_name, method, target)
        found = self._matched.get(key)
        if found is None:
            found = self.match(upstream_name, method, target.split("?", 1)[0], query())
            if len(target) <= MEMO_MAX_TARGET:
                if len(self._matched) >= MEMO_ENTRIES:
                    self._matched.clear()  # cheaper than LRU bookkeeping on every hit; refills in a moment
                self._matched[key] = found
        return found

    def reverse_listeners(self) -> dict[int, str]:
        """listen port -> upstream name."""
        return dict(self._reverse_listeners)
