"""Units of the control plane, in process: rate limiter, options, Trakt adaptation of authlib,
request models, the OpenAPI document, upstream failures (plex.tv, TMDB) played by a scripted
local upstream (aioresponses 0.7.9 cannot build responses for aiohttp 3.14), and the Trakt
refresh sweep against the fake Trakt."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx2
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from pydantic import ValidationError

from control import trakt
from control.app import create_app
from control.keys import VAULT
from control.models import SettingsUpdate
from control.openapi import openapi_document
from control.options import ControlOptions, parse_rate
from control.security import RateLimiter
from fake_upstreams.data import TMDB_V4_TOKEN, TRAKT_CLIENT_ID, TRAKT_CLIENT_SECRET
from projectionist.config import Config, ServerCredentials

ACCOUNT = {"id": 18573262, "username": "mrandersson", "email": "t@example.com", "thumb": "https://plex.tv/a.png"}
ACCOUNT_TOKEN = "aaaaBBBBccccDDDDeeee"


def make_app(home: Path, overrides=(), **options):
    config = Config(home=home, rules_path=home / "rules.yaml", datasette_metadata=home / "m.yml",
                    upstream_overrides=tuple(overrides))
    return create_app(config, ControlOptions(**options))


class ScriptedUpstream:
    """plex.tv and TMDB answering whatever the test scripts: `answers[(method, path)] = (status, json)`;
    an exception instead makes the call fail at the socket level."""

    def __init__(self) -> None:
        self.answers: dict[tuple[str, str], tuple[int, object] | type[Exception]] = {
            ("POST", "/api/v2/pins"): (201, {"id": 4242, "code": "c0de", "expiresIn": 1800}),
            ("GET", "/api/v2/pins/4242"): (200, {"id": 4242, "authToken": ACCOUNT_TOKEN}),
            ("GET", "/api/v2/user"): (200, ACCOUNT),
            # Admission: the account owns the server it signs in for.
            ("GET", "/api/v2/resources"): (200, [{"name": "home", "provides": "server", "owned": True,
                                                  "clientIdentifier": "0123456789abcdef"}]),
        }
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.answer)
        self.server = TestServer(app)

    async def answer(self, request: web.Request) -> web.StreamResponse:
        scripted = self.answers.get((request.method, request.path), (404, {}))
        if isinstance(scripted, type):
            request.transport.abort()  # the connection drops: the client sees a socket error
            return web.Response()
        status, body = scripted
        return web.json_response(body, status=status)

    async def __aenter__(self) -> ScriptedUpstream:
        await self.server.start_server()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.server.close()

    @property
    def overrides(self) -> tuple[str, ...]:
        base = str(self.server.make_url("")).rstrip("/")
        return (f"plextv={base}", f"tmdb={base}")


# --- pure units ---------------------------------------------------------------------------------

def test_rate_limiter_buckets_per_key_and_refills():
    limiter = RateLimiter(3, 30.0)  # 3 at once, one more every 10 s
    assert [limiter.take("a", now=0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.take("a", now=0.0) == pytest.approx(10.0)
    assert limiter.take("b", now=0.0) == 0.0
    assert limiter.take("a", now=10.0) == 0.0 and limiter.take("a", now=10.0) > 0
    small = RateLimiter(1, 1.0, max_keys=2)
    for key in "abc":
        small.take(key, now=0.0)
    assert len(small._buckets) == 2


def test_options_from_the_environment(monkeypatch):
    monkeypatch.setenv("PROJECTIONIST_ADMINS", " 18573262, 24689013 ,")
    monkeypatch.setenv("PROJECTIONIST_AUTH_RATE_LIMIT", "5/10")
    monkeypatch.setenv("PROJECTIONIST_CONTROL_URL", "https://projectionist.example")
    options = ControlOptions.from_env()
    assert options.admins == {"18573262", "24689013"} and options.auth_rate == (5, 10.0)
    assert options.public_origin == "https://projectionist.example"
    assert parse_rate("20") == (20, 60.0)
    for bad in ("x/y", "0/60", "5/0"):
        with pytest.raises(ValueError):
            parse_rate(bad)
    monkeypatch.setenv("PROJECTIONIST_CONTROL_URL", "https://host/path")
    with pytest.raises(ValueError):
        ControlOptions.from_env()


def test_trakt_refresh_is_due_in_the_last_quarter_of_a_tokens_life():
    now = datetime(2026, 1, 1, tzinfo=UTC)
    link = {"issued_at": (now - timedelta(days=60)).isoformat(), "expires_at": (now + timedelta(days=30)).isoformat()}
    assert not trakt.refresh_due(link, now)  # 30 of 90 days left; margin is min(7 days, 22.5 days)
    assert trakt.refresh_due(link, now + timedelta(days=24))
    day = {"issued_at": now.isoformat(), "expires_at": (now + timedelta(hours=24)).isoformat()}
    assert not trakt.refresh_due(day, now + timedelta(hours=17)) and trakt.refresh_due(day, now + timedelta(hours=19))


def test_authlib_is_adapted_to_trakts_oauth_endpoints():
    class Auth:
        client_id, client_secret = "id", "secret"

    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    _, headers, body = trakt.encode_client_secret_json(Auth(), "POST", "https://api.trakt.tv/oauth/token", headers,
                                                       b"grant_type=refresh_token&refresh_token=r1")
    assert headers["Content-Type"] == "application/json"
    assert json.loads(body) == {"grant_type": "refresh_token", "refresh_token": "r1", "client_id": "id",
                                "client_secret": "secret"}
    request = httpx2.Request("POST", "https://api.trakt.tv/oauth/device/token")
    for status, error in ((400, "authorization_pending"), (418, "access_denied"), (410, "expired_token"),
                          (429, "slow_down"), (404, "invalid_grant")):
        adapted = trakt.trakt_status_errors(httpx2.Response(status, json={}, request=request))
        assert adapted.json() == {"error": error}
    ok = httpx2.Response(200, json={"access_token": "a"}, request=request)
    assert trakt.trakt_status_errors(ok) is ok


def test_settings_model_names_bad_fields_and_refuses_credentials_in_preferences():
    with pytest.raises(ValidationError) as err:
        SettingsUpdate.model_validate({"preferences": {"ui": {"tmdbBearer": "x"}}})
    assert "preferences.ui.tmdbBearer looks like a credential" in str(err.value)
    with pytest.raises(ValidationError, match="looks like a credential"):
        SettingsUpdate.model_validate({"preferences": {"note": "pj_" + "a" * 32}})
    with pytest.raises(ValidationError, match="16384 bytes"):
        SettingsUpdate.model_validate({"preferences": {"blob": "x" * 20000}})
    assert SettingsUpdate.model_validate({"preferences": {"theme": "dark", "rows": [1, 2]}}).preferences["rows"] == [1, 2]


def test_openapi_document_is_complete_and_every_reference_resolves(tmp_path):
    doc = openapi_document(make_app(tmp_path))
    schemas = doc["components"]["schemas"]
    refs = re.findall(r'"\$ref": "#/components/schemas/([^"]+)"', json.dumps(doc))
    assert refs and all(name in schemas for name in refs)
    for path, methods in doc["paths"].items():
        for method, operation in methods.items():
            assert operation["responses"], (method, path)
            if path.startswith("/api/") and path != "/api/openapi.json" and "security" in operation:
                assert "401" in operation["responses"], (method, path)
    assert doc["paths"]["/api/auth/plex"]["post"]["responses"].keys() >= {"200", "403", "429"}
    assert doc["paths"]["/api/admin/users"]["get"]["responses"].keys() >= {"200", "401", "403"}
    assert doc["paths"]["/api/usage"]["get"]["parameters"][0]["schema"] == {"type": "integer", "default": 30,
                                                                          "minimum": 1, "maximum": 366}


# --- upstream failures -------------------------------------------------------------------------

async def sign_in(client: TestClient) -> str:
    nonce = (await client.post("/api/auth/plex")).cookies["pj_login"].value
    done = await client.get("/api/auth/plex/4242", headers={"Cookie": f"pj_login={nonce}"})
    assert done.status == 200 and (await done.json())["status"] == "complete"
    return (await (await client.get("/api/auth/session")).json())["csrf_token"]


async def test_plex_tv_failures_are_502_json_and_start_nothing(tmp_path):
    async with ScriptedUpstream() as upstream:
        async with TestClient(TestServer(make_app(tmp_path, upstream.overrides))) as client:
            upstream.answers[("POST", "/api/v2/pins")] = (503, {})
            r = await client.post("/api/auth/plex")
            assert r.status == 502 and (await r.json())["error"] == "upstream_unavailable"
            assert "pj_login" not in r.cookies
            upstream.answers[("POST", "/api/v2/pins")] = ConnectionResetError
            assert (await client.post("/api/auth/plex")).status == 502


async def test_https_sessions_get_secure_cookies_and_a_strict_origin(tmp_path):
    origin = "https://projectionist.example"
    async with ScriptedUpstream() as upstream:
        async with TestClient(TestServer(make_app(tmp_path, upstream.overrides, public_origin=origin))) as client:
            assert (await client.post("/api/auth/plex", headers={"Origin": "http://127.0.0.1"})).status == 403
            started = await client.post("/api/auth/plex", headers={"Origin": origin})
            body = await started.json()
            assert "Secure" in started.headers["Set-Cookie"]
            assert "forwardUrl=https%3A%2F%2Fprojectionist.example%2Fapi%2Fauth%2Fplex%2F4242" in body["auth_url"]
            nonce = started.cookies["pj_login"].value
            done = await client.get("/api/auth/plex/4242", headers={"Cookie": f"pj_login={nonce}"})
            assert done.status == 200 and (await done.json())["status"] == "complete"
            cookie = done.headers["Set-Cookie"]
            assert "Secure" in cookie and "HttpOnly" in cookie and "SameSite=Lax" in cookie
            assert done.headers["Strict-Transport-Security"].startswith("max-age=")


async def test_tmdb_key_is_not_stored_when_tmdb_rejects_it_or_cannot_tell(tmp_path):
    async with ScriptedUpstream() as upstream:
        async with TestClient(TestServer(make_app(tmp_path, upstream.overrides))) as client:
            csrf = await sign_in(client)
            put = {"headers": {"X-CSRF-Token": csrf}, "json": {"key": TMDB_V4_TOKEN}}
            configuration = ("GET", "/3/configuration")
            upstream.answers[configuration] = (401, {"status_code": 7, "success": False})
            r = await client.put("/api/settings/tmdb-key", **put)
            assert r.status == 400 and (await r.json())["error"] == "invalid_tmdb_key"
            upstream.answers[configuration] = (503, {})
            assert (await client.put("/api/settings/tmdb-key", **put)).status == 502
            upstream.answers[configuration] = ConnectionResetError
            assert (await client.put("/api/settings/tmdb-key", **put)).status == 502
            assert (await (await client.get("/api/settings")).json())["tmdb"]["custom_key"] is False
            upstream.answers[configuration] = (200, {"images": {}})
            r = await client.put("/api/settings/tmdb-key", **put)
            assert r.status == 200 and (await r.json())["tmdb"]["custom_key"] is True
            assert TMDB_V4_TOKEN not in await r.text()


async def test_admins_are_the_configured_plex_accounts(tmp_path):
    async with ScriptedUpstream() as upstream:
        async with TestClient(TestServer(make_app(tmp_path, upstream.overrides, admins=frozenset({"999"})))) as client:
            await sign_in(client)  # the first user, but not a configured admin
            assert (await client.get("/api/admin/users")).status == 403
        async with TestClient(TestServer(make_app(tmp_path, upstream.overrides,
                                                  admins=frozenset({str(ACCOUNT["id"])})))) as client:
            await sign_in(client)
            users = await (await client.get("/api/admin/users")).json()
            assert users["users"][0]["is_admin"] is True


# --- the Trakt refresh sweep, against the fake Trakt --------------------------------------------

async def test_refresh_sweep_refreshes_due_tokens_and_keeps_the_surrogates(tmp_path, fakes):
    app = make_app(tmp_path, overrides=(f"trakt={fakes.urls['trakt']}",),
                   server=ServerCredentials(trakt_client_id=TRAKT_CLIENT_ID, trakt_client_secret=TRAKT_CLIENT_SECRET))
    async with TestClient(TestServer(app)):
        vault = app[VAULT]

        def make_user(v) -> int:
            from projectionist.vault import upsert_plex_user

            return upsert_plex_user(v.conn, "1", "someone")

        user_id = await vault.run(make_user)
        real_refresh = "r" * 64
        fakes.trakt.refresh_tokens[real_refresh] = "a" * 64  # a refresh token the fake will accept
        issued = int((datetime.now(UTC) - timedelta(days=89)).timestamp())
        handed = await vault.run(trakt.save_tokens, user_id, {"access_token": "a" * 64, "refresh_token": real_refresh,
                                                             "expires_in": 90 * 86400, "created_at": issued})
        assert await trakt.sweep(app) == 1
        link = await vault.run(trakt.load_link, user_id)
        assert link["refresh_token"] != real_refresh and link["access_token"] in fakes.trakt.access_tokens
        entry = await vault.run(lambda v, s: v.resolve(s), handed.access_token)
        assert entry.real == link["access_token"] and entry.user_id == user_id
        assert await trakt.sweep(app) == 0  # fresh tokens are not due


def test_usage_reports_rate_limited_answers_per_route_and_in_total(tmp_path):
    import time

    from control.usage import all_usage, user_usage
    from projectionist.store import UsageEvent, UsageWriter, connect, migrate
    from projectionist.vault import upsert_plex_user

    path = tmp_path / "projectionist.db"
    conn = connect(path)
    migrate(conn)
    alice = upsert_plex_user(conn, "1001", "alice")
    conn.commit()
    writer = UsageWriter(path, interval=0.02).start()
    now = time.time()
    for route, status in [("tmdb.details", 200), ("tmdb.details", 429), ("tmdb.details", 429),
                          ("tmdb.search", 200), ("tmdb.search", 429), ("tmdb.search", 502)]:
        writer.record(UsageEvent(ts=now, listener="regular", upstream="tmdb", route=route, method="GET",
                                 status=status, latency_ms=1.0, user_id=alice, credential="default"))
    writer.record(UsageEvent(ts=now, listener="regular", upstream="tmdb", route="tmdb.details", method="GET",
                             status=429, latency_ms=1.0))  # somebody else's
    writer.close()

    mine = user_usage(conn, alice, 1)
    assert (mine.requests, mine.errors, mine.rate_limited) == (6, 1, 3)
    assert {r.route: r.rate_limited for r in mine.routes} == {"tmdb.details": 2, "tmdb.search": 1}
    everyone = all_usage(conn, 1)
    assert (everyone.requests, everyone.rate_limited) == (7, 4)
