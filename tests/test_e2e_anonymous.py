"""`proxy.anonymous`, end to end through the real explicit proxy: a client without a user's surrogate
gets none of the server's credentials (asserted on what the fake TMDB and Trakt received), a
signed-in user's surrogate does, and `refuse` answers in TMDB's and Trakt's own format without
reaching them. The shipped default is `forward`.
"""

from __future__ import annotations

import json
import sqlite3
from types import SimpleNamespace

import aiohttp
import pytest
import requests
import yaml

from control.settings import tmdb_bearer
from fake_upstreams.data import TMDB_V3_KEY, TRAKT_CLIENT_ID, TRAKT_CLIENT_SECRET
from projectionist.vault import SecretBox, Vault, upsert_plex_user

from support import REPO, start_embedded_proxy

pytestmark = pytest.mark.e2e

FRONTEND_TRAKT_ID = "frontend-bundled-trakt-id"
TRAKT_HEADERS = {"trakt-api-version": "2", "trakt-api-key": FRONTEND_TRAKT_ID}


def test_the_shipped_default_is_forward():
    assert yaml.safe_load((REPO / "rules.yaml").read_text())["proxy"]["anonymous"] == "forward"


@pytest.fixture
def server_credentials(monkeypatch):
    monkeypatch.setenv("PROJECTIONIST_TRAKT_CLIENT_ID", TRAKT_CLIENT_ID)
    monkeypatch.setenv("PROJECTIONIST_TRAKT_CLIENT_SECRET", TRAKT_CLIENT_SECRET)


async def proxy_with(tmp_path, fakes, mode: str):
    def edit(rules: dict) -> None:
        rules["proxy"]["anonymous"] = mode
    return await start_embedded_proxy(tmp_path, [f"tmdb={fakes.urls['tmdb']}", f"trakt={fakes.urls['trakt']}",
                                                 f"plex={fakes.urls['plex']}", f"plextv={fakes.urls['plextv']}"], edit)


def user_surrogate(tmp_path, username: str, disabled: bool = False) -> str:
    vault = Vault(tmp_path / "projectionist.db", SecretBox.load(tmp_path))
    try:
        user = upsert_plex_user(vault.conn, f"acct-{username}", username)
        if disabled:
            vault.conn.execute("UPDATE users SET disabled_at = '2026-01-01T00:00:00+00:00' WHERE id = ?", (user,))
        return tmdb_bearer(vault, user)
    finally:
        vault.close()


async def get(proxy, url: str, headers: dict) -> tuple[int, dict, bytes]:
    async with aiohttp.ClientSession() as session:
        async with session.get(url, proxy=f"http://127.0.0.1:{proxy.ports['regular']}", headers=headers) as r:
            return r.status, dict(r.headers), await r.read()


def usage(tmp_path, upstream: str) -> list[tuple]:
    conn = sqlite3.connect(tmp_path / "projectionist.db")
    try:
        return conn.execute("SELECT credential, route, status FROM usage_events WHERE upstream = ? ORDER BY id",
                            (upstream,)).fetchall()
    finally:
        conn.close()


async def wait_usage(tmp_path, upstream: str, count: int) -> list[tuple]:
    import asyncio
    for _ in range(200):
        rows = usage(tmp_path, upstream)
        if len(rows) >= count:
            return rows
        await asyncio.sleep(0.05)
    return usage(tmp_path, upstream)


async def test_forward_lends_nothing_and_a_users_surrogate_gets_the_servers_key(tmp_path, fakes, server_credentials):
    proxy = await proxy_with(tmp_path, fakes, "forward")
    try:
        fakes.clear()
        # No key at all: TMDB itself says 401, and it saw no key of the server's.
        status, _, body = await get(proxy, "http://api.themoviedb.org/3/movie/603", {"Accept": "application/json"})
        assert status == 401 and b'"status_code":7' in body.replace(b" ", b"")
        # A placeholder bearer goes on as it was sent (it is the client's own "key").
        status, _, _ = await get(proxy, "http://api.themoviedb.org/3/movie/603", {"Authorization": "Bearer placeholder"})
        assert status == 401
        # The client's own valid key works, untouched.
        status, _, _ = await get(proxy, f"http://api.themoviedb.org/3/movie/603?api_key={TMDB_V3_KEY}", {})
        assert status == 200
        anonymous = list(fakes.requests["tmdb"])
        assert len(anonymous) == 3
        assert [r.param("api_key") for r in anonymous] == [None, None, TMDB_V3_KEY]
        assert [r.headers.get("Authorization") for r in anonymous] == [None, "Bearer placeholder", None]

        # Trakt: the frontend's own client id passes; the server's app credentials are not added.
        status, _, _ = await get(proxy, "http://api.trakt.tv/movies/trending", TRAKT_HEADERS)
        assert status == 403  # the fake Trakt knows only the server's app
        assert [r.headers.get("trakt-api-key") for r in fakes.requests["trakt"]] == [FRONTEND_TRAKT_ID]

        # A signed-in user's surrogate: the server's key goes in, the surrogate never leaves.
        fakes.clear()
        surrogate = user_surrogate(tmp_path, "neo")
        status, _, _ = await get(proxy, "http://api.themoviedb.org/3/movie/603", {"Authorization": f"Bearer {surrogate}"})
        assert status == 200
        (seen,) = fakes.requests["tmdb"]
        assert seen.param("api_key") == TMDB_V3_KEY and seen.headers.get("Authorization") is None

        # A disabled user's surrogate, or an unknown one: TMDB's 401, and TMDB never sees it.
        fakes.clear()
        for dead in (user_surrogate(tmp_path, "cypher", disabled=True), "pj_" + "x" * 32):
            status, _, body = await get(proxy, "http://api.themoviedb.org/3/movie/603", {"Authorization": f"Bearer {dead}"})
            assert status == 401 and b'"status_code": 7' in body
        assert fakes.requests["tmdb"] == []

        rows = await wait_usage(tmp_path, "tmdb", 6)
        assert [r[0] for r in rows[:3]] == ["anonymous"] * 3
        assert rows[3][0] == "default"
    finally:
        await proxy.stop()


async def test_refuse_answers_in_the_upstreams_format_without_reaching_it(tmp_path, fakes, server_credentials):
    proxy = await proxy_with(tmp_path, fakes, "refuse")
    try:
        fakes.clear()
        status, headers, body = await get(proxy, "http://api.themoviedb.org/3/trending/movie/week",
                                          {"Authorization": "Bearer placeholder", "Origin": "http://player.test"})
        assert status == 401 and headers["Access-Control-Allow-Origin"] == "*"
        assert json.loads(body) == {
            "status_code": 7, "status_message": "Invalid API key: You must be granted a valid key.", "success": False}
        status, _, body = await get(proxy, "http://api.trakt.tv/movies/trending", TRAKT_HEADERS)
        assert status == 401 and b"invalid_grant" in body
        assert fakes.requests["tmdb"] == [] and fakes.requests["trakt"] == []

        surrogate = user_surrogate(tmp_path, "trinity")
        status, _, _ = await get(proxy, "http://api.themoviedb.org/3/trending/movie/week",
                                 {"Authorization": f"Bearer {surrogate}"})
        assert status == 200 and len(fakes.requests["tmdb"]) == 1

        rows = await wait_usage(tmp_path, "tmdb", 2)
        assert rows[0][:2] == ("anonymous", "tmdb:anonymous") and rows[1][0] == "default"
        from projectionist.metrics import ANONYMOUS_REQUESTS
        assert ANONYMOUS_REQUESTS.labels("tmdb", "refused")._value.get() >= 1
    finally:
        await proxy.stop()


async def test_lend_is_the_old_behaviour(tmp_path, fakes):
    proxy = await proxy_with(tmp_path, fakes, "lend")
    try:
        fakes.clear()
        status, _, _ = await get(proxy, "http://api.themoviedb.org/3/movie/603", {"Authorization": "Bearer placeholder"})
        assert status == 200 and fakes.requests["tmdb"][0].param("api_key") == TMDB_V3_KEY
    finally:
        await proxy.stop()


def test_lending_on_a_listener_others_reach_is_warned_about():
    from projectionist.rules import parse_rules
    from proxy_addons.router import lending_warning

    shipped = (REPO / "rules.yaml").read_text()
    lending = parse_rules(shipped.replace("anonymous: forward", "anonymous: lend"))
    assert lending_warning(parse_rules(shipped), "0.0.0.0") is None
    assert lending_warning(lending, "127.0.0.1") is None
    assert "anyone who can reach it" in lending_warning(lending, "0.0.0.0")


TMDB_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>tmdb rows</title></head><body><script>
// The player's Home rows from TMDB: first with a placeholder as its TMDB key, then with the value
// the signed-in user got from /setup (their surrogate).
const cfg = %(config)s;
async function rows(bearer) {
  const r = await fetch("https://api.themoviedb.org/3/trending/movie/week", {headers: {Authorization: "Bearer " + bearer}});
  const body = await r.json();
  return {status: r.status, count: (body.results || []).length, code: body.status_code || null};
}
(async () => {
  const report = {};
  try { report.placeholder = await rows("placeholder"); report.signedIn = await rows(cfg.tmdbBearer); }
  catch (e) { report.error = String(e); }
  await fetch("/report", {method: "POST", body: JSON.stringify(report)});
})();
</script></body></html>
"""


def _set_anonymous(stack, mode: str) -> None:
    rules = yaml.safe_load(stack.rules_path.read_text())
    rules["proxy"]["anonymous"] = mode
    stack.rules_path.write_text(yaml.safe_dump(rules, sort_keys=False))


def _anonymous_status(stack) -> int:
    session = requests.Session()
    session.trust_env = False
    return session.get("https://api.themoviedb.org/3/configuration", proxies={"https": stack.proxy_url},
                       verify=str(stack.ca_path), timeout=30).status_code


@pytest.mark.browser
def test_the_first_hour_in_chromium_tmdb_rows_load_with_the_key_setup_hands_out(stack, tmp_path, clean_fakes):
    """The shipped default (`forward`) on the whole system: a signed-in user types what /setup shows
    as the player's TMDB key, and the rows load; the placeholder gets TMDB's own 401."""
    from test_e2e_browser import run_page
    from test_jobs import Admin

    from support import wait_for

    user = Admin(SimpleNamespace(url=stack.control_url), clean_fakes)
    bearer = user.get("/api/setup").json()["tmdb_bearer"]
    _set_anonymous(stack, "forward")
    try:
        wait_for(lambda: _anonymous_status(stack) == 401, 30, what="the proxy to reload proxy.anonymous: forward")
        clean_fakes.clear()
        report = run_page(stack, tmp_path, TMDB_PAGE % {"config": json.dumps({"tmdbBearer": bearer})})
    finally:
        _set_anonymous(stack, "lend")
        wait_for(lambda: _anonymous_status(stack) == 200, 30, what="the proxy to reload proxy.anonymous: lend")
    assert "error" not in report, report
    assert report["placeholder"] == {"status": 401, "count": 0, "code": 7}
    assert report["signedIn"]["status"] == 200 and report["signedIn"]["count"] > 0
    sent = [r for r in clean_fakes.requests["tmdb"] if r.method == "GET" and r.path == "/3/trending/movie/week"]
    assert [r.headers.get("Authorization") for r in sent] == ["Bearer placeholder", None]
    assert sent[1].param("api_key") == TMDB_V3_KEY  # the server's key, for the signed-in user only


def test_a_bad_anonymous_mode_is_a_line_numbered_error_that_check_rules_prints(tmp_path):
    import subprocess
    import sys

    path = tmp_path / "rules.yaml"
    path.write_text((REPO / "rules.yaml").read_text().replace("anonymous: forward", "anonymous: lend-to-all"))
    line = next(n for n, text in enumerate(path.read_text().splitlines(), 1) if "anonymous: lend-to-all" in text)
    out = subprocess.run([sys.executable, "-m", "launcher", "check-rules", str(path)], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode != 0
    assert f"rules.yaml:{line}:" in out.stderr + out.stdout and "proxy.anonymous" in out.stderr + out.stdout
    assert "'forward', 'refuse' or 'lend'" in out.stderr + out.stdout
