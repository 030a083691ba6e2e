"""rules.yaml: schema errors with line numbers, the check-rules command, route matching."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from projectionist.rules import RulesError, load_rules, parse_rules

from support import REPO

MINIMAL = """\
version: 1
upstreams:
  tmdb: {kind: tmdb, hosts: [api.themoviedb.org], credentials: tmdb}
  plex: {kind: plex-server, hosts: ["*.plex.direct"], base_url: "http://127.0.0.1:32400", listen: 32401}
routes:
  - {name: tmdb.season, upstream: tmdb, path: "/3/tv/{id}/season/{n}/**"}
  - {name: tmdb.details, upstream: tmdb, methods: [GET], path: "/3/{media}/{id}/**"}
  - {name: plex.timeline-stop, upstream: plex, path: "/:/timeline", query: {state: stopped}}
  - {name: plex.timeline, upstream: plex, path: "/:/timeline"}
"""


def problems(text: str) -> list[str]:
    with pytest.raises(RulesError) as info:
        parse_rules(textwrap.dedent(text), "r.yaml")
    return [str(p) for p in info.value.problems]


def test_shipped_rules_are_valid():
    rules = load_rules(REPO / "rules.yaml")
    assert rules.upstream_for_host("api.themoviedb.org") == "tmdb"
    assert rules.upstream_for_host("192-168-1-10.0123abcd.plex.direct") == "plex"
    assert rules.upstream_for_host("update.googleapis.com") is None


@pytest.mark.parametrize("upstream, method, path, query, route", [
    ("tmdb", "GET", "/3/movie/603", {}, "tmdb.details"),
    ("tmdb", "GET", "/3/movie/603/credits", {}, "tmdb.details"),
    ("tmdb", "GET", "/3/tv/1399/season/2", {}, "tmdb.season"),
    ("tmdb", "POST", "/3/movie/603", {}, "tmdb:other"),
    ("plex", "GET", "/:/timeline", {"state": "stopped"}, "plex.timeline-stop"),
    ("plex", "GET", "/:/timeline", {"state": "playing"}, "plex.timeline"),
])
def test_first_matching_route_wins(upstream, method, path, query, route):
    assert parse_rules(MINIMAL).match(upstream, method, path, query).route_name == route


@pytest.mark.parametrize("path, route", [
    ("/3/discover/movie", "tmdb.discover"),
    ("/3/discover/tv", "tmdb.discover"),
    ("/3/person/6384", "tmdb.person"),
    ("/3/person/6384/combined_credits", "tmdb.person"),
    ("/3/person/popular", "tmdb.lists"),
    ("/3/movie/603/credits", "tmdb.details"),
    ("/3/search/multi", "tmdb.search"),
])
def test_shipped_tmdb_routes_discover_and_people_apart_from_details(path, route):
    rules = load_rules(REPO / "rules.yaml")
    match = rules.match("tmdb", "GET", path, {})
    assert match.route_name == route and match.route.rule.cache is not None
    if route == "tmdb.discover":
        assert match.route.rule.cache.ttl <= 3600  # popularity-ordered: not the details' day


def test_errors_name_line_column_and_key():
    found = problems("""\
        version: 1
        upstreams:
          tmdb:
            kind: tmdb
            hosts: [api.themoviedb.org]
            hots: [x]
        routes:
          - name: a
            upstream: tmdb
            cache: {ttl: soon, scope: world}
            methods: [FETCH]
        """)
    assert found == [
        "r.yaml:6:5: upstreams.tmdb.hots: unknown key (check its spelling and indentation)",
        "r.yaml:10:13: routes[0].cache.ttl: Input should be a valid number, unable to parse string as a number (got 'soon')",
        "r.yaml:10:24: routes[0].cache.scope: Input should be 'shared' or 'user' (got 'world')",
        "r.yaml:11:5: routes[0].methods: unknown HTTP method(s): FETCH (got ['FETCH'])",
    ]


def test_cross_references_are_checked():
    found = problems("""\
        version: 1
        upstreams:
          a: {kind: tmdb, hosts: [x.example], limits: [nope]}
          b: {kind: plex-server, listen: 9000}
        routes:
          - {name: r1, upstream: a}
          - {name: r1, upstream: c, invalidates: [zzz]}
        """)
    assert found == [
        "r.yaml:3:48: upstreams.a.limits[0]: no limit named 'nope' in limits",
        "r.yaml:4:26: upstreams.b.listen: a reverse listener needs a base_url to forward to",
        "r.yaml:7:6: routes[1].name: route name 'r1' is already used by routes[0]",
        "r.yaml:7:16: routes[1].upstream: no upstream named 'c' in upstreams",
        "r.yaml:7:43: routes[1].invalidates[0]: no route named 'zzz' to invalidate",
    ]


def test_yaml_syntax_and_duplicate_keys():
    assert problems("version: 1\nupstreams: {a: [\n")[0].startswith("r.yaml:3:1: (top level): not valid YAML")
    assert problems("version: 1\nversion: 1\n") == ["r.yaml:2:1: version: duplicate key (each key may appear once)"]
    assert problems("- just\n- a list\n") == ["r.yaml:1:1: (top level): the file must be a mapping (version, upstreams, routes, ...)"]


def test_sizes_and_rates_are_parsed():
    rules = parse_rules(MINIMAL + "cache: {memory_max_bytes: 64MB, disk_max_bytes: 1GiB}\n"
                        "limits:\n  tmdb-default: {rate: 1/10s, burst: 5}\n")
    assert rules.model.cache.memory_max_bytes == 64_000_000
    assert rules.model.cache.disk_max_bytes == 2**30
    assert rules.model.limits["tmdb-default"].rate == pytest.approx(0.1)
    assert problems(MINIMAL + "limits:\n  x: {rate: fast}\n") == [
        "r.yaml:11:7: limits.x.rate: not a rate: 'fast' (use e.g. 2/s, 100/min, 1/10s) (got 'fast')"]


def test_rate_limits_throttles_and_redis_setting():
    rules = load_rules(REPO / "rules.yaml")
    default = rules.model.limits["tmdb-default"]
    assert (default.rate, default.per, default.when_credential) == (2, "credential", "default")
    assert rules.model.limits["tmdb-custom"].rate == 40 and "tmdb-default" in rules.upstreams["tmdb"].limits
    throttle = rules.match("plex", "GET", "/:/timeline", {"state": "playing"}).route.rule.throttle
    assert (throttle.interval, throttle.per, throttle.forward_on_change) == (10, "session", ["state"])
    assert rules.match("plex", "GET", "/:/timeline", {"state": "stopped"}).route.rule.throttle is None
    assert rules.model.proxy.redis_url is None
    assert parse_rules(MINIMAL + "proxy: {redis_url: 'redis://127.0.0.1:6379/0'}\n").model.proxy.redis_url
    assert problems(MINIMAL + "proxy: {redis_url: 'http://x'}\nlimits:\n  a: {rate: 2/s, per: browser}\n") == [
        "r.yaml:10:9: proxy.redis_url: String should match pattern '^(redis|rediss|unix)://' (got 'http://x')",
        "r.yaml:12:18: limits.a.per: Input should be 'credential', 'user', 'client', 'upstream', 'server' or "
        "'global' (got 'browser')"]
    # A URL with a password is never echoed back: errors reach logs and check-rules output.
    assert problems(MINIMAL + "proxy: {redis_url: 'http://:s3cret@redis:6379'}\n") == [
        "r.yaml:10:9: proxy.redis_url: String should match pattern '^(redis|rediss|unix)://'"]
    assert problems(MINIMAL.replace('path: "/:/timeline"}', 'path: "/:/timeline", throttle: {interval: soon}}')) == [
        "r.yaml:9:75: routes[3].throttle.interval: Input should be a valid number, unable to parse string as a "
        "number (got 'soon')"]

def test_image_rules_and_settings():
    rules = load_rules(REPO / "rules.yaml")
    tmdb = rules.match("tmdb-images", "GET", "/t/p/original/x.jpg", {}).route.rule.image
    assert tmdb.immutable and tmdb.scope == "shared" and tmdb.max_width == 1280
    transcode = rules.match("plex", "GET", "/photo/:/transcode", {}).route.rule.image
    assert transcode.scope == "user" and transcode.source_param == "url"
    assert rules.model.images.max_bytes == 2 * 10**9 and rules.model.images.directory == "cache/images"
    parsed = parse_rules(MINIMAL + "images: {max_bytes: 500MB, source_max_bytes: 10MiB, formats: [avif, webp]}\n")
    assert parsed.model.images.max_bytes == 500_000_000 and parsed.model.images.source_max_bytes == 10 * 2**20
    assert problems(MINIMAL + "images: {formats: [jpegxl], quality: 3}\n") == [
        "r.yaml:10:20: images.formats[0]: Input should be 'webp' or 'avif' (got 'jpegxl')",
        "r.yaml:10:29: images.quality: unknown key (check its spelling and indentation)"]


def test_image_rule_errors_name_their_line():
    found = problems("""\
        version: 1
        upstreams:
          img: {kind: tmdb-images, hosts: [image.tmdb.org]}
        routes:
          - name: a
            upstream: img
            image: {scope: everyone, max_width: 4, immutible: true}
        """)
    assert found == [
        "r.yaml:7:13: routes[0].image.scope: Input should be 'shared' or 'user' (got 'everyone')",
        "r.yaml:7:30: routes[0].image.max_width: Input should be greater than or equal to 16 (got 4)",
        "r.yaml:7:44: routes[0].image.immutible: unknown key (check its spelling and indentation)",
    ]
    assert problems("""\
        version: 1
        upstreams:
          img: {kind: tmdb-images, hosts: [image.tmdb.org]}
        routes:
          - name: b
            upstream: img
            cache: {ttl: 60}
            image: {ttl: 60}
        """) == ["r.yaml:8:5: routes[0].image: a route is cached either as an API answer (cache) or as an image (image)"]


def test_check_rules_command(tmp_path):
    bad = tmp_path / "rules.yaml"
    bad.write_text("version: 1\nupstreams:\n  t: {kind: tmdb, hosts: [a.b], colour: red}\n")
    result = subprocess.run([sys.executable, "-m", "launcher", "check-rules", str(bad)],
                            capture_output=True, text=True)
    assert result.returncode == 1
    assert f"{bad}:3:33: upstreams.t.colour: unknown key" in result.stderr
    good = subprocess.run([sys.executable, "-m", "launcher", "check-rules", str(REPO / "rules.yaml")],
                          capture_output=True, text=True)
    assert good.returncode == 0, good.stderr
    assert "OK" in good.stdout


def test_plex_servers_include_exclude_and_their_errors():
    from projectionist.rules import PlexServers

    assert PlexServers(exclude=["b"]).allows("a") and not PlexServers(exclude=["b"]).allows("b")
    assert PlexServers(include=["a"]).allows("a") and not PlexServers(include=["a"]).allows("c")
    assert PlexServers().allows("anything")
    found = problems("""\
        version: 1
        upstreams:
          tmdb:
            kind: tmdb
            servers: {exclude: [abc]}
          plex:
            kind: plex-server
            servers: {exclude: abc, only: [x]}
        routes: []
        """)
    assert found == [
        "r.yaml:5:5: upstreams.tmdb.servers: only a plex-server upstream reaches Plex servers (got {'exclude': ['abc']})",
        "r.yaml:8:15: upstreams.plex.servers.exclude: Input should be a valid list (got 'abc')",
        "r.yaml:8:29: upstreams.plex.servers.only: unknown key (check its spelling and indentation)",
    ]


def test_match_target_remembers_each_target_and_keeps_query_conditions():
    """The router's per-target memo answers as `match` does: a query condition still decides,
    and the query is parsed only for a target not seen before."""
    from urllib.parse import parse_qsl

    rules = load_rules(REPO / "rules.yaml")
    parsed = []

    def query(target: str):
        def parse():
            parsed.append(target)
            return dict(parse_qsl(target.partition("?")[2]))
        return parse

    for _ in range(3):
        for target, route in [("/:/timeline?state=stopped&time=10", "plex.timeline.stopped"),
                              ("/:/timeline?state=playing&time=10", "plex.timeline"),
                              ("/library/metadata/1", "plex.metadata")]:
            found = rules.match_target("plex", "GET", target, query(target))
            assert found.route_name == route
            assert found == rules.match("plex", "GET", target.split("?")[0], query(target)())
    assert len(parsed) == 3 * 3 + 3  # the memo: once per target; the direct `match` above: every time
    assert load_rules(REPO / "rules.yaml")._matched == {}  # a reload starts with an empty memo
