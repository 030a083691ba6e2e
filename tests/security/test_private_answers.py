"""Private answers are never shared (issue 13, item 2).

Every cacheable route of the shipped rules.yaml (cache and image rules, read from the file, so a
new route is covered the day it is added), through the real embedded proxy, against one echo
upstream whose every answer is unique and names the credential it was sent with. Two users and an
anonymous client ask for the same URL: an answer that belongs to one account (scope user, or a
shared rule over a request carrying a user's credential) never reaches anyone else. The control:
each route is cached at all (the same user's second request is a hit)."""

from __future__ import annotations

import hashlib
import io
import itertools
import re
import subprocess
import sys

import httpx
import pytest
import yaml
from aiohttp import web
from mitmproxy.http import Headers
from PIL import Image

from fake_upstreams.data import (
    PLEX_ACCOUNT_TOKEN,
    PLEX_ACCOUNT_TOKEN_2,
    PLEX_SERVER_TOKEN,
    PLEX_SERVER_TOKEN_2,
    PMS_MACHINE_ID,
    TRAKT_ACCESS_TOKEN,
)
from projectionist.rules import USER_PATH_PROBES, load_rules, parse_rules
from projectionist.vault import SecretBox, Vault, upsert_plex_user

from support import REPO, LocalUpstream, start_embedded_proxy

pytestmark = pytest.mark.e2e

TRAKT_ACCESS_TOKEN_2 = "9f3c" * 16  # the second user's Trakt token (only this test's echo sees it)
_IMAGE_PATH = re.compile(r"^/(t/p/|photo/|library/metadata/[^/]+/[^/]+/[^/]+$)")


class Echo(LocalUpstream):
    """Every upstream at once: answers each request uniquely, naming a digest of its credentials."""

    def __init__(self) -> None:
        super().__init__()
        self.counter = itertools.count(1)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        n = next(self.counter)
        credential = request.query.get("X-Plex-Token") or request.headers.get("X-Plex-Token") \
            or request.headers.get("Authorization") or ""
        who = hashlib.sha256(credential.encode()).hexdigest()[:12]
        if _IMAGE_PATH.match(request.path):  # a unique 2x1 PNG: its pixels carry n
            buffer = io.BytesIO()
            Image.new("RGB", (2, 1), (n % 256, n // 256 % 256, 7)).save(buffer, "PNG")
            return web.Response(body=buffer.getvalue(), content_type="image/png")
        return web.json_response({"n": n, "who": who, "path": request.path})


def concrete(route, rules) -> tuple[str, dict]:
    """A request path (and query) that this route, and no earlier one, matches."""
    pattern = route.path if isinstance(route.path, str) else route.path[0]
    fill = {"kind": "thumb", "media": "movie", "window": "day", "list": "trending", "size": "w500",
            "file": "poster.jpg"}
    path = re.sub(r"\{(\w+)\}", lambda m: fill.get(m.group(1), "1"), pattern)
    path = path.removesuffix("/**").replace("**", "x").replace("*", "x") or "/"
    query = {"url": "/library/metadata/1/thumb/1"} if route.image and route.image.source_param else {}
    upstream = route.upstream if isinstance(route.upstream, str) else route.upstream[0]
    assert rules.match(upstream, "GET", path, query).route_name == route.name, (route.name, path)
    return path, query


class Client:
    """One browser: its credentials per upstream kind (None: anonymous)."""

    def __init__(self, proxy, credentials: dict[str, str] | None) -> None:
        self.credentials = credentials or {}
        self.explicit = httpx.AsyncClient(proxy=f"http://127.0.0.1:{proxy.ports['regular']}", trust_env=False, timeout=20)
        self.direct = httpx.AsyncClient(trust_env=False, timeout=20)
        self.reverse = next(port for mode, port in proxy.ports.items() if mode.startswith("reverse:"))

    async def get(self, rules, route, path: str, query: dict) -> httpx.Response:
        upstream_name = route.upstream if isinstance(route.upstream, str) else route.upstream[0]
        upstream = rules.upstreams[upstream_name]
        kind = upstream.kind
        headers = {"Accept": "image/png" if route.image else "application/json"}
        params = dict(query)
        if kind == "plex-server" and "plex" in self.credentials:
            params["X-Plex-Token"] = self.credentials["plex"]
        elif kind == "plex-tv" and "plextv" in self.credentials:
            headers["X-Plex-Token"] = self.credentials["plextv"]
        elif kind == "trakt" and "trakt" in self.credentials:
            headers["Authorization"] = f"Bearer {self.credentials['trakt']}"
        elif kind == "tmdb":
            headers["Authorization"] = "Bearer pj_placeholder"
        if kind == "plex-server":
            return await self.direct.get(f"http://127.0.0.1:{self.reverse}{path}", params=params, headers=headers)
        host = next(h for h in upstream.hosts if "*" not in h)
        return await self.explicit.get(f"http://{host}{path}", params=params, headers=headers)

    async def close(self) -> None:
        await self.explicit.aclose()
        await self.direct.aclose()


def cacheable_routes(rules):
    return [r for r in rules.routes if (r.cache or r.image) and ("GET" in r.methods or "*" in r.methods)]


@pytest.fixture
async def echo():
    async with Echo() as e:
        yield e


async def start(tmp_path, echo, rules):
    """The proxy with every upstream sent to the echo; two users' surrogates in its vault."""
    proxy = await start_embedded_proxy(tmp_path, [f"{name}={echo.url}" for name in rules.upstreams])
    vault = Vault(tmp_path / "projectionist.db", SecretBox.load(tmp_path, create=False))
    users = {}
    for name, account_id, server, account, trakt in (
            ("alice", "18573262", PLEX_SERVER_TOKEN, PLEX_ACCOUNT_TOKEN, TRAKT_ACCESS_TOKEN),
            ("bob", "24689013", PLEX_SERVER_TOKEN_2, PLEX_ACCOUNT_TOKEN_2, TRAKT_ACCESS_TOKEN_2)):
        uid = upsert_plex_user(vault.conn, account_id, name)
        users[name] = {"plex": vault.surrogate_for("plex", server, uid, PMS_MACHINE_ID),
                       "plextv": vault.surrogate_for("plex", account, uid),
                       "trakt": vault.surrogate_for("trakt_access", trakt, uid)}
    vault.close()
    return proxy, Client(proxy, users["alice"]), Client(proxy, users["bob"]), Client(proxy, None)


async def test_no_user_answer_crosses_on_any_shipped_cacheable_route(tmp_path, echo):
    rules = load_rules(REPO / "rules.yaml")
    routes = cacheable_routes(rules)
    assert len(routes) >= 20  # the shipped file: Plex, plex.tv, TMDB, TMDB images, Trakt
    proxy, alice, bob, anonymous = await start(tmp_path, echo, rules)
    crossed, uncached = [], []
    try:
        for route in routes:
            path, query = concrete(route, rules)
            first = await alice.get(rules, route, path, query)
            assert first.status_code == 200, (route.name, first.status_code, first.text[:200])
            again = await alice.get(rules, route, path, query)
            if first.content != again.content:
                uncached.append(route.name)
            others = {"bob": await bob.get(rules, route, path, query),
                      "anonymous": await anonymous.get(rules, route, path, query)}
            upstream_kind = rules.upstreams[route.upstream if isinstance(route.upstream, str) else route.upstream[0]].kind
            declared = (route.cache or route.image).scope
            # TMDB and TMDB images are public whoever asks; everything else here carries a credential.
            private = declared == "user" or upstream_kind not in ("tmdb", "tmdb-images")
            for who, answer in others.items():
                if private and answer.status_code == 200 and answer.content == first.content:
                    crossed.append(f"{route.name} -> {who}")
    finally:
        for client in (alice, bob, anonymous):
            await client.close()
        await proxy.stop()
    assert crossed == [], f"answers of one user reached another: {crossed}"
    assert uncached == [], f"not cached at all (the test would prove nothing for them): {uncached}"


async def test_no_answer_on_a_private_path_crosses(tmp_path, echo):
    """The paths that belong to one account (Trakt /users/**, /sync/**, TMDB account endpoints,
    ...), whichever route they fall under: two users and an anonymous client never share one."""
    rules = load_rules(REPO / "rules.yaml")
    proxy, alice, bob, anonymous = await start(tmp_path, echo, rules)
    crossed = []
    try:
        for name, upstream in rules.upstreams.items():
            for path in USER_PATH_PROBES.get(upstream.kind, ()):
                route = rules.match(name, "GET", path, {})
                probe = type("Probe", (), {"upstream": name, "image": None, "name": route.route_name})
                answers = [await client.get(rules, probe, path, {}) for client in (alice, alice, bob, anonymous)]
                first = answers[0]
                for who, answer in zip(("alice again", "bob", "anonymous"), answers[1:]):
                    if who != "alice again" and answer.status_code == 200 and answer.content == first.content:
                        crossed.append(f"{path} ({route.route_name}) -> {who}")
    finally:
        for client in (alice, bob, anonymous):
            await client.close()
        await proxy.stop()
    assert crossed == [], f"answers of one user reached another: {crossed}"


def test_check_rules_warns_about_a_shared_rule_over_private_paths(tmp_path):
    """The seed's Trakt rule (`/{media}/{list}/**`, shared) also matched /users/<slug>/history."""
    shipped = yaml.safe_load((REPO / "rules.yaml").read_text())
    assert load_rules(REPO / "rules.yaml").warnings == []
    shipped["routes"] = [r for r in shipped["routes"] if not r["name"].startswith("trakt.")] + [
        {"name": "trakt.public-lists", "upstream": "trakt", "methods": ["GET"], "path": "/{media}/{list}/**",
         "cache": {"ttl": 3600, "scope": "shared"}}]
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump(shipped, sort_keys=False))
    (warning,) = parse_rules(path.read_text(), str(path)).warnings
    assert warning.loc[-1] == "path" and warning.line and "/users/someone/history" in warning.message
    out = subprocess.run([sys.executable, "-m", "launcher", "check-rules", str(path)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and "warning:" in out.stderr and "trakt" in out.stderr and "1 warning" in out.stdout


def test_a_user_credential_makes_a_shared_rule_private():
    rules = load_rules(REPO / "rules.yaml")
    assert rules.user_specific("trakt", "/movies/trending", Headers([(b"Authorization", b"Bearer x")]))
    assert not rules.user_specific("trakt", "/movies/trending", {})
    assert rules.user_specific("trakt", "/users/someone/history", {})
    assert rules.user_specific("tmdb", "/3/movie/603?session_id=abc", {})
    assert rules.user_specific("tmdb", "/3/movie/603/account_states", {})
    assert not rules.user_specific("tmdb", "/3/movie/603?language=en", {})
    assert rules.user_specific("plex-server", "/library/sections", {})
    assert not rules.user_specific("tmdb-images", "/t/p/w500/x.jpg", {})
