"""A credential goes only to its own upstream (issue 13, item 1).

Through a real embedded proxy routed like a deployment (see adversary.py), clients that name one
host in `Host` and another as the target (absolute-form URL, CONNECT target, TLS SNI), a
`*.plex.direct` name with a foreign embedded IP, upstream redirects to another host, and an
absolute-form URL on the reverse listener. Each asserts the catcher received nothing of ours and
the client got the documented refusal (421 in the upstream's format)."""

from __future__ import annotations

import json

import httpx
import pytest
from aiohttp import web

from fake_upstreams.data import (
    PLEX_ACCOUNT_TOKEN,
    PLEX_ACCOUNT_TOKEN_2,
    PLEX_SERVER_TOKEN,
    PMS_MACHINE_ID,
    TMDB_V3_KEY,
    TRAKT_ACCESS_TOKEN,
    TRAKT_CLIENT_ID,
    TRAKT_CLIENT_SECRET,
)
from projectionist.vault import SecretBox, Vault, upsert_plex_user

from .adversary import Catcher, ca_context, raw_exchange, start_proxy, status_of, usage_rows
from support import REPO, LocalUpstream

pytestmark = pytest.mark.e2e


@pytest.fixture(autouse=True)
def trakt_app_credentials(monkeypatch):
    monkeypatch.setenv("PROJECTIONIST_TRAKT_CLIENT_ID", TRAKT_CLIENT_ID)
    monkeypatch.setenv("PROJECTIONIST_TRAKT_CLIENT_SECRET", TRAKT_CLIENT_SECRET)


@pytest.fixture
async def catcher():
    async with Catcher() as c:
        yield c


@pytest.fixture
async def proxy(tmp_path, fakes):
    p = await start_proxy(tmp_path, fakes)
    p.port = p.ports["regular"]
    p.reverse_port = next(port for mode, port in p.ports.items() if mode.startswith("reverse:"))
    yield p
    await p.stop()


@pytest.fixture
def surrogates(proxy, tmp_path):
    """The owner's surrogates, vaulted as a sign-in would: the server token and a Trakt token."""
    vault = Vault(tmp_path / "projectionist.db", SecretBox.load(tmp_path, create=False))
    try:
        user = upsert_plex_user(vault.conn, "18573262", "mrandersson")
        return {"plex": vault.surrogate_for("plex", PLEX_SERVER_TOKEN, user, PMS_MACHINE_ID),
                "trakt": vault.surrogate_for("trakt_access", TRAKT_ACCESS_TOKEN, user)}
    finally:
        vault.close()


def client(proxy, tmp_path, **kw) -> httpx.AsyncClient:
    return httpx.AsyncClient(proxy=f"http://127.0.0.1:{proxy.port}", verify=ca_context(tmp_path), trust_env=False,
                             timeout=20, **kw)


def attack_request(upstream: str, surrogates: dict) -> tuple[str, str, dict]:
    """(Host, path, headers) a client would send to that upstream, with its surrogates."""
    if upstream == "tmdb":
        return "api.themoviedb.org", "/3/movie/603", {"Authorization": "Bearer pj_placeholder"}
    if upstream == "trakt":
        return "api.trakt.tv", "/users/me/history", {"Authorization": f"Bearer {surrogates['trakt']}",
                                                     "trakt-api-version": "2"}
    if upstream == "plextv":
        return "plex.tv", "/api/v2/user", {"X-Plex-Token": surrogates["plex"], "Accept": "application/json"}
    return "evil.plex.direct", f"/library/sections?X-Plex-Token={surrogates['plex']}", {"Accept": "application/json"}


UPSTREAMS = ["tmdb", "trakt", "plextv", "plex"]


@pytest.mark.parametrize("upstream", UPSTREAMS)
async def test_absolute_form_url_to_another_host_is_refused(proxy, tmp_path, catcher, surrogates, upstream):
    host, path, headers = attack_request(upstream, surrogates)
    async with client(proxy, tmp_path) as c:
        r = await c.get(f"http://127.0.0.1:{catcher.port}{path}", headers={"Host": host, **headers})
    assert r.status_code == 421
    assert catcher.connections == []
    catcher.assert_no_credential()
    if upstream in ("tmdb", "trakt") or upstream == "plextv":
        assert isinstance(r.json(), dict)  # the upstream's JSON error shape
    assert await usage_rows(tmp_path, f"route = '{upstream}:misdirected' AND status = 421")


@pytest.mark.parametrize("upstream", UPSTREAMS)
async def test_connect_tunnel_to_another_host_is_refused(proxy, catcher, surrogates, upstream):
    """CONNECT names the catcher; the plain HTTP request inside names one of our hosts."""
    host, path, headers = attack_request(upstream, surrogates)
    lines = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    answer = await raw_exchange(proxy.port, f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{lines}\r\n".encode(),
                                connect=f"127.0.0.1:{catcher.port}")
    assert status_of(answer) == 421, answer[:300]
    assert catcher.connections == []


async def test_tls_to_another_host_with_our_sni_is_refused(proxy, tmp_path, catcher):
    """CONNECT to the catcher, TLS with SNI api.themoviedb.org, Host api.themoviedb.org."""
    answer = await raw_exchange(
        proxy.port, b"GET /3/movie/603 HTTP/1.1\r\nHost: api.themoviedb.org\r\nAccept: application/json\r\n\r\n",
        connect=f"127.0.0.1:{catcher.port}", sni="api.themoviedb.org", ca=ca_context(tmp_path))
    assert status_of(answer) == 421, answer[:300]
    body = json.loads(answer.partition(b"\r\n\r\n")[2])
    assert body["status_code"] == 421 and body["success"] is False  # TMDB's error format
    assert catcher.connections == []


async def test_tls_with_a_foreign_sni_is_refused(proxy, tmp_path, fakes, catcher):
    """CONNECT and Host name a configured TMDB host; the SNI names another: refused, not passed."""
    target = f"localhost:{fakes.urls['tmdb'].rsplit(':', 1)[1]}"
    ca = ca_context(tmp_path)
    ca.check_hostname = False  # the proxy's certificate is for the SNI; what matters is its answer
    answer = await raw_exchange(proxy.port, f"GET /3/movie/603 HTTP/1.1\r\nHost: {target}\r\n\r\n".encode(),
                                connect=target, sni="catcher.example", ca=ca)
    assert status_of(answer) == 421, answer[:300]
    assert catcher.connections == []


async def test_agreeing_host_and_target_reach_the_configured_host_with_the_key(proxy, tmp_path, fakes):
    """The control: a configured host (resolved by the system) gets the server's key."""
    fakes.clear()
    port = fakes.urls["tmdb"].rsplit(":", 1)[1]
    async with client(proxy, tmp_path) as c:
        r = await c.get(f"http://localhost:{port}/3/movie/603", headers={"Authorization": "Bearer pj_placeholder"})
    assert r.status_code == 200 and r.json()["id"] == 603
    assert [req.param("api_key") for req in fakes.tmdb.requests] == [TMDB_V3_KEY]


async def test_plain_http_to_an_https_only_api_never_carries_the_key_in_clear(proxy, tmp_path):
    """`http://<configured TMDB host>/` (port 80) goes out as https on 443, never as cleartext on 80:
    a catcher on 127.0.0.1:80 stands where a network observer would see it."""
    catcher = Catcher()
    catcher.port = 80
    try:
        await catcher.__aenter__()
    except OSError as exc:
        pytest.skip(f"port 80 cannot be bound here: {exc}")
    try:
        async with client(proxy, tmp_path) as c:
            r = await c.get("http://localhost/3/movie/603", headers={"Authorization": "Bearer pj_placeholder"})
        assert r.status_code in (502, 504), r.text[:300]  # nothing answers https on localhost:443
        assert catcher.connections == []
    finally:
        await catcher.__aexit__(None, None, None)


async def test_plex_direct_name_with_a_foreign_embedded_ip_is_refused(proxy, tmp_path, fakes, catcher, surrogates):
    """`127-0-0-1.<hash>.plex.direct:<catcher port>` is no connection of the server; the same name
    on the configured server's port is, and gets the real token (by the embedded IP, no DNS)."""
    fakes.clear()
    token = surrogates["plex"]
    async with client(proxy, tmp_path) as c:
        refused = await c.get(f"http://127-0-0-1.0123abcd.plex.direct:{catcher.port}/library/sections",
                              params={"X-Plex-Token": token}, headers={"Accept": "application/json"})
        plex_port = fakes.urls["plex"].rsplit(":", 1)[1]
        served = await c.get(f"http://127-0-0-1.0123abcd.plex.direct:{plex_port}/library/sections",
                             params={"X-Plex-Token": token}, headers={"Accept": "application/json"})
    assert refused.status_code == 421 and b"Misdirected" in refused.content
    assert catcher.connections == []
    assert served.status_code == 200 and "MediaContainer" in served.json()
    assert [req.param("X-Plex-Token") for req in asked_by_the_player(fakes.plex.requests)] == [PLEX_SERVER_TOKEN]
    assert await usage_rows(tmp_path, "route = 'plex:misdirected' AND status = 421")


def asked_by_the_player(requests) -> list:
    """What a fake Plex received, less the proxy's own tokenless `/identity` (asked once, before a
    server token first goes to the configured address, to know which server is there)."""
    return [r for r in requests if r.path != "/identity"]


class Redirector(LocalUpstream):
    """An upstream that redirects: to `to` (another host) with every credential it received, or
    to itself with them (`/same`)."""

    def __init__(self) -> None:
        super().__init__()
        self.to = ""
        self.received: list[str] = []

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.received.append(request.path_qs)
        credentials = {k: v for k, v in request.query.items() if k in ("api_key", "X-Plex-Token")}
        query = "&".join(f"{k}={v}" for k, v in {**credentials, "page": "1"}.items())
        if request.path.endswith("/same"):
            raise web.HTTPFound(f"/library/sections?{query}")
        raise web.HTTPFound(f"{self.to}/steal?{query}")


@pytest.fixture
async def redirector():
    async with Redirector() as r:
        yield r


async def test_upstream_redirect_to_another_host_loses_the_injected_key(proxy, tmp_path, catcher, redirector):
    redirector.to = f"http://127.0.0.1:{catcher.port}"
    async with client(proxy, tmp_path, follow_redirects=True) as c:
        r = await c.get(f"http://localhost:{redirector.port}/3/movie/603",
                        headers={"Authorization": "Bearer pj_placeholder"})
    assert [h.status_code for h in r.history] == [302] and r.text == "caught"  # followed by the client itself
    assert "api_key" not in r.history[0].headers["location"] and "page=1" in r.history[0].headers["location"]
    assert TMDB_V3_KEY in redirector.received[0]  # the configured upstream did get it
    assert catcher.connections and b"GET /steal?page=1 " in catcher.received
    catcher.assert_no_credential()


async def test_plex_redirects_carry_the_surrogate_or_nothing(tmp_path, fakes, catcher, redirector):
    """Reverse listener, Plex upstream that redirects: to another host the token is removed, on the
    same host the client's own surrogate is put back; the real token never reaches the client."""
    redirector.to = f"http://127.0.0.1:{catcher.port}"

    def to_redirector(rules: dict) -> None:
        rules["upstreams"]["plex"]["base_url"] = redirector.url

    proxy = await start_proxy(tmp_path, fakes, lambda rules: None)
    await proxy.stop()
    (tmp_path / "rules.yaml").unlink()  # written again with the redirector as the Plex server
    proxy = await start_proxy(tmp_path, fakes, to_redirector)
    try:
        vault = Vault(tmp_path / "projectionist.db", SecretBox.load(tmp_path, create=False))
        token = vault.surrogate_for("plex", PLEX_SERVER_TOKEN, upsert_plex_user(vault.conn, "18573262", "neo"),
                                    PMS_MACHINE_ID)
        vault.close()
        reverse = next(port for mode, port in proxy.ports.items() if mode.startswith("reverse:"))
        async with httpx.AsyncClient(trust_env=False) as c:
            away = await c.get(f"http://127.0.0.1:{reverse}/library/away", params={"X-Plex-Token": token})
            same = await c.get(f"http://127.0.0.1:{reverse}/library/same", params={"X-Plex-Token": token})
    finally:
        await proxy.stop()
    assert away.status_code == 302 and same.status_code == 302
    assert away.headers["location"] == f"http://127.0.0.1:{catcher.port}/steal?page=1"
    assert same.headers["location"] == f"/library/sections?X-Plex-Token={token}&page=1"
    assert all(PLEX_SERVER_TOKEN in seen for seen in redirector.received if not seen.startswith("/identity"))
    assert catcher.connections == []


async def test_absolute_form_url_on_the_reverse_listener_stays_on_base_url(proxy, fakes, catcher, surrogates):
    fakes.clear()
    answer = await raw_exchange(
        proxy.port, (f"GET http://127.0.0.1:{catcher.port}/library/sections?X-Plex-Token={surrogates['plex']} HTTP/1.1\r\n"
                     f"Host: 127.0.0.1:{catcher.port}\r\nAccept: application/json\r\n\r\n").encode(),
        port=proxy.reverse_port)
    assert status_of(answer) == 200, answer[:300]
    assert b"MediaContainer" in answer
    assert [req.path for req in asked_by_the_player(fakes.plex.requests)] == ["/library/sections"]
    assert catcher.connections == []


async def test_an_account_surrogate_is_not_accepted_as_a_server_token(proxy, tmp_path, fakes):
    """The PMS gets only tokens plex.tv listed as a server's: a user's account token would let a
    shared server's owner act as that user at plex.tv. An owner whose server lists the account
    token itself (plex.tv does that for owned servers) keeps one surrogate, bound to the server."""
    vault = Vault(tmp_path / "projectionist.db", SecretBox.load(tmp_path, create=False))
    try:
        user = upsert_plex_user(vault.conn, "24689013", "trinity_k")
        account = vault.surrogate_for("plex", PLEX_ACCOUNT_TOKEN_2, user)  # PIN sign-in: no server
        owner = upsert_plex_user(vault.conn, "18573262", "mrandersson")
        owned = vault.surrogate_for("plex", PLEX_ACCOUNT_TOKEN, owner)
        assert vault.surrogate_for("plex", PLEX_ACCOUNT_TOKEN, owner, PMS_MACHINE_ID) == owned
    finally:
        vault.close()
    fakes.clear()
    async with httpx.AsyncClient(trust_env=False, timeout=20) as c:
        refused = await c.get(f"http://127.0.0.1:{proxy.reverse_port}/library/sections",
                              params={"X-Plex-Token": account}, headers={"Accept": "application/json"})
        served = await c.get(f"http://127.0.0.1:{proxy.reverse_port}/library/sections",
                             params={"X-Plex-Token": owned}, headers={"Accept": "application/json"})
    assert refused.status_code == 401 and served.status_code == 200
    assert [r.param("X-Plex-Token") for r in asked_by_the_player(fakes.plex.requests)] == [PLEX_ACCOUNT_TOKEN]


def test_a_public_listener_that_passes_unknown_hosts_is_called_an_open_proxy():
    from projectionist.rules import parse_rules
    from proxy_addons.router import open_proxy_warning

    rules = parse_rules((REPO / "rules.yaml").read_text())
    assert rules.model.proxy.unknown_hosts == "pass"
    for host in ("127.0.0.1", "::1", "localhost"):
        assert open_proxy_warning(rules, host) is None
    for host in ("0.0.0.0", "", "192.168.1.5", "::"):
        assert "open proxy" in open_proxy_warning(rules, host)
    refusing = parse_rules((REPO / "rules.yaml").read_text().replace("unknown_hosts: pass", "unknown_hosts: refuse"))
    assert open_proxy_warning(refusing, "0.0.0.0") is None


async def test_a_server_token_goes_only_to_that_servers_connections(tmp_path, fakes, catcher):
    """With the fake PMS known only from plex.tv resources (base_url elsewhere): its plex.direct
    name is refused until resources were seen, then served with its own token; a token of another
    server (another machine identifier) is refused there, and the PMS never sees it."""

    def plex_elsewhere(rules: dict) -> None:
        rules["upstreams"]["plex"]["base_url"] = f"http://127.0.0.1:{catcher.port}"

    proxy = await start_proxy(tmp_path, fakes, plex_elsewhere)
    try:
        vault = Vault(tmp_path / "projectionist.db", SecretBox.load(tmp_path, create=False))
        owner = upsert_plex_user(vault.conn, "18573262", "mrandersson")
        account = vault.surrogate_for("plex", PLEX_ACCOUNT_TOKEN, owner)
        foreign = vault.surrogate_for("plex", "tokenOfAnotherServer0", owner, "another-machine-identifier")
        vault.close()
        plex_port = fakes.urls["plex"].rsplit(":", 1)[1]
        sections = f"http://127-0-0-1.0123abcd.plex.direct:{plex_port}/library/sections"
        accept = {"Accept": "application/json"}
        fakes.clear()
        async with httpx.AsyncClient(proxy=f"http://127.0.0.1:{proxy.ports['regular']}", trust_env=False,
                                     timeout=20) as c:
            before = await c.get(sections, params={"X-Plex-Token": foreign}, headers=accept)  # nothing known yet
            server = (await c.get("http://plex.tv/api/v2/resources", headers={"X-Plex-Token": account, **accept}))
            server_token = next(r for r in server.json() if "server" in r["provides"])["accessToken"]
            served = await c.get(sections, params={"X-Plex-Token": server_token}, headers=accept)
            refused = await c.get(sections, params={"X-Plex-Token": foreign}, headers=accept)
    finally:
        await proxy.stop()
    assert server_token.startswith("pj_")
    assert before.status_code == 421 and refused.status_code == 421 and b"Misdirected" in refused.content
    assert served.status_code == 200
    assert [r.param("X-Plex-Token") for r in fakes.plex.requests] == [PLEX_SERVER_TOKEN]
    assert catcher.connections == []
