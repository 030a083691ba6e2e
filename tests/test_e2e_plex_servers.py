"""Every Plex server the account reaches, each routed to itself (issue 17), end to end.

The owner's plex.tv `resources` list two fake servers (fake_upstreams/plex_second.py: another
machine identifier, token and library). The configured server (`upstreams.plex.base_url`) is
pointed at the reverse listener; the other keeps its own `*.plex.direct` connections, which the
player reaches through the explicit proxy. What each fake recorded shows that no request or token
of one server reached the other, and each server's answers are cached apart.
"""

from __future__ import annotations

from urllib.parse import urlsplit

import pytest
import requests
from test_e2e_credentials import RecordingClient

from fake_upstreams.data import (
    PLEX_ACCOUNT_TOKEN,
    PLEX_SERVER_TOKEN,
    PMS_MACHINE_ID,
    SECOND_PMS_MACHINE_ID,
    SECOND_PMS_TOKEN,
)
from projectionist.vault import SURROGATE_PREFIX

pytestmark = pytest.mark.e2e


@pytest.fixture
def two_servers(fakes):
    fakes.plextv.list_second_server = True
    try:
        yield fakes
    finally:
        fakes.plextv.list_second_server = False


class Player(RecordingClient):
    """A player: plex.tv and `*.plex.direct` through the explicit proxy, the listener directly."""

    def through_proxy(self, uri: str) -> None:
        parts = urlsplit(uri)
        self.session.proxies[f"{parts.scheme}://{parts.hostname}"] = self.stack.proxy_url

    def get(self, url: str, token: str | None = None, accept: str = "application/json") -> requests.Response:
        return self.request("GET", url, headers={"Accept": accept, **({"X-Plex-Token": token} if token else {})})

    def servers(self, account: str) -> dict[str, dict]:
        resources = self.get("https://plex.tv/api/v2/resources?includeHttps=1&includeRelay=1", account).json()
        return {r["clientIdentifier"]: r for r in resources if "server" in r["provides"]}


def titles(response: requests.Response) -> list[str]:
    assert response.status_code == 200, response.text[:300]
    container = response.json()["MediaContainer"]
    return [d["title"] for d in container.get("Directory", []) + container.get("Metadata", []) + container.get("Video", [])]


def token_of(request) -> str | None:
    return request.param("X-Plex-Token") or request.headers.get("X-Plex-Token")


def tokens_seen(state) -> set[str | None]:
    return {token_of(r) for r in state.requests}


def test_a_client_switching_between_two_servers_gets_each_ones_library_token_and_cache(stack, two_servers, clean_fakes):
    fakes = clean_fakes
    player = Player(stack)
    account = player.login(PLEX_ACCOUNT_TOKEN)
    servers = player.servers(account)
    first, second = servers[PMS_MACHINE_ID], servers[SECOND_PMS_MACHINE_ID]
    token_a, token_b = first["accessToken"], second["accessToken"]
    assert token_a.startswith(SURROGATE_PREFIX) and token_b.startswith(SURROGATE_PREFIX) and token_a != token_b

    # The configured server is at the reverse listener; the other keeps its own connections.
    assert {c["uri"] for c in first["connections"]} == {stack.plex_url}
    uris_b = [c["uri"] for c in second["connections"]]
    assert stack.plex_url not in uris_b and all(".plex.direct:" in uri for uri in uris_b)
    local_b = next(c["uri"] for c in second["connections"] if c["local"])
    assert urlsplit(local_b).port == urlsplit(fakes.second_plex_url).port
    player.through_proxy(local_b)

    # Switching back and forth: each server answers with its own library, twice (a miss, then a hit).
    for _ in range(2):
        assert "Films" in titles(player.get(f"{stack.plex_url}/library/sections", token_a))
        assert titles(player.get(f"{local_b}/library/sections", token_b)) == ["Documentaries", "Soundtracks"]
        assert "The Matrix" in titles(player.get(f"{stack.plex_url}/library/sections/1/all", token_a))
        assert titles(player.get(f"{local_b}/library/sections/7/all", token_b)) == ["Koyaanisqatsi", "Baraka"]
    hit_a = player.get(f"{stack.plex_url}/library/sections", token_a)
    hit_b = player.get(f"{local_b}/library/sections", token_b)
    assert "hit" in hit_a.headers["Cache-Status"] and "hit" in hit_b.headers["Cache-Status"]
    # Each URL was fetched from its own server once: the same path's entry of one server never
    # answered the other (A's /library/sections was stored before B's was asked).
    paths_a = [r.path for r in fakes.plex.requests]
    paths_b = [r.path for r in fakes.second_plex.requests]
    assert paths_a.count("/library/sections") == 1 and paths_b.count("/library/sections") == 1
    assert paths_b == ["/library/sections", "/library/sections/7/all"]
    # Flushing the second server's URL (as the player sends it) drops its entry, not the first's.
    assert stack.flush_cache("url", f"{local_b}/library/sections") >= 1
    assert "miss" in player.get(f"{local_b}/library/sections", token_b).headers["Cache-Status"]
    assert "hit" in player.get(f"{stack.plex_url}/library/sections", token_a).headers["Cache-Status"]
    assert [r.path for r in fakes.second_plex.requests].count("/library/sections") == 2

    # A server's surrogate sent to the other server is refused before reaching either.
    before_a, before_b = len(fakes.plex.requests), len(fakes.second_plex.requests)
    wrong_b = player.get(f"{local_b}/library/sections/8/all", token_a)
    wrong_a = player.get(f"{stack.plex_url}/library/sections/2/all", token_b)
    assert wrong_b.status_code == 421 and wrong_a.status_code == 421
    assert (len(fakes.plex.requests), len(fakes.second_plex.requests)) == (before_a, before_b)

    # What each fake received: only its own token, never the other's.
    assert tokens_seen(fakes.plex) == {PLEX_SERVER_TOKEN}
    assert tokens_seen(fakes.second_plex) == {SECOND_PMS_TOKEN}


def test_xml_resources_keep_the_second_servers_connections_and_bind_its_token(stack, two_servers, clean_fakes):
    """plexapi reads resources as XML: the second server's URIs are its own, its surrogate works there."""
    import xml.etree.ElementTree as ElementTree

    fakes = clean_fakes
    player = Player(stack)
    account = player.login(PLEX_ACCOUNT_TOKEN)
    xml = player.get("https://plex.tv/api/v2/resources?includeHttps=1", account, accept="application/xml")
    assert xml.status_code == 200 and PLEX_SERVER_TOKEN.encode() not in xml.content
    assert SECOND_PMS_TOKEN.encode() not in xml.content
    nodes = {n.get("clientIdentifier"): n for n in ElementTree.fromstring(xml.content).iter()
             if "server" in (n.get("provides") or "")}
    first, second = nodes[PMS_MACHINE_ID], nodes[SECOND_PMS_MACHINE_ID]
    assert {c.get("uri") for c in first.iter("connection")} == {stack.plex_url}
    uris_b = [c.get("uri") for c in second.iter("connection")]
    assert stack.plex_url not in uris_b and all(".plex.direct:" in uri for uri in uris_b)
    local_b = uris_b[0]
    player.through_proxy(local_b)
    assert titles(player.get(f"{local_b}/library/sections", second.get("accessToken"))) == ["Documentaries", "Soundtracks"]
    assert "Films" in titles(player.get(f"{stack.plex_url}/library/sections", first.get("accessToken")))
    assert tokens_seen(fakes.plex) == {PLEX_SERVER_TOKEN}
    assert tokens_seen(fakes.second_plex) == {SECOND_PMS_TOKEN}


async def test_a_server_excluded_in_rules_is_refused_and_never_gets_its_token(tmp_path, fakes):
    """`upstreams.plex.servers.exclude`: the excluded server's plex.direct names get 421, its
    surrogate is never swapped for its token, and the configured server is still served."""
    import httpx

    from projectionist.vault import SecretBox, Vault, upsert_plex_user
    from support import start_embedded_proxy

    def exclude_second(rules: dict) -> None:
        rules["upstreams"]["plex"]["base_url"] = fakes.urls["plex"]  # as deployed: no override for Plex
        rules["upstreams"]["plex"]["servers"] = {"exclude": [SECOND_PMS_MACHINE_ID]}

    fakes.plextv.list_second_server = True
    proxy = await start_embedded_proxy(tmp_path, [f"plextv={fakes.urls['plextv']}"], exclude_second)
    try:
        vault = Vault(tmp_path / "projectionist.db", SecretBox.load(tmp_path, create=False))
        account = vault.surrogate_for("plex", PLEX_ACCOUNT_TOKEN, upsert_plex_user(vault.conn, "18573262", "mrandersson"))
        vault.close()
        accept = {"Accept": "application/json"}
        fakes.clear()
        async with httpx.AsyncClient(proxy=f"http://127.0.0.1:{proxy.ports['regular']}", trust_env=False,
                                     timeout=20) as c:
            resources = (await c.get("http://plex.tv/api/v2/resources", headers={"X-Plex-Token": account, **accept})).json()
            servers = {r["clientIdentifier"]: r for r in resources if "server" in r["provides"]}
            second = servers[SECOND_PMS_MACHINE_ID]
            local_b = next(conn["uri"] for conn in second["connections"] if conn["local"])
            refused = await c.get(f"{local_b}/library/sections", params={"X-Plex-Token": second["accessToken"]},
                                  headers=accept)
            listener = next(port for mode, port in proxy.ports.items() if mode.startswith("reverse:"))
            first = servers[PMS_MACHINE_ID]
            assert {conn["uri"] for conn in first["connections"]} == {f"http://127.0.0.1:{listener}"}
        async with httpx.AsyncClient(trust_env=False, timeout=20) as c:
            served = await c.get(f"http://127.0.0.1:{listener}/library/sections",
                                 params={"X-Plex-Token": first["accessToken"]}, headers=accept)
    finally:
        fakes.plextv.list_second_server = False
        await proxy.stop()
    assert refused.status_code == 421 and b"Misdirected" in refused.content
    assert fakes.second_plex.requests == []
    assert served.status_code == 200 and tokens_seen(fakes.plex) == {PLEX_SERVER_TOKEN}


async def test_the_configured_server_is_identified_by_its_identity_when_no_connection_names_base_url(tmp_path, fakes):
    """base_url names the first server by another name than plex.tv lists (`localhost`): its
    `/identity` (asked without a token) says which server the listener serves."""
    import httpx

    from projectionist.vault import SecretBox, Vault, upsert_plex_user
    from support import start_embedded_proxy

    def by_another_name(rules: dict) -> None:
        rules["upstreams"]["plex"]["base_url"] = fakes.urls["plex"].replace("127.0.0.1", "localhost")

    fakes.plextv.list_second_server = True
    proxy = await start_embedded_proxy(tmp_path, [f"plextv={fakes.urls['plextv']}"], by_another_name)
    try:
        vault = Vault(tmp_path / "projectionist.db", SecretBox.load(tmp_path, create=False))
        account = vault.surrogate_for("plex", PLEX_ACCOUNT_TOKEN, upsert_plex_user(vault.conn, "18573262", "mrandersson"))
        vault.close()
        fakes.clear()
        async with httpx.AsyncClient(proxy=f"http://127.0.0.1:{proxy.ports['regular']}", trust_env=False,
                                     timeout=20) as c:
            resources = (await c.get("http://plex.tv/api/v2/resources",
                                     headers={"X-Plex-Token": account, "Accept": "application/json"})).json()
        listener = next(port for mode, port in proxy.ports.items() if mode.startswith("reverse:"))
    finally:
        fakes.plextv.list_second_server = False
        await proxy.stop()
    servers = {r["clientIdentifier"]: r for r in resources if "server" in r["provides"]}
    assert {c["uri"] for c in servers[PMS_MACHINE_ID]["connections"]} == {f"http://127.0.0.1:{listener}"}
    assert all(".plex.direct:" in c["uri"] for c in servers[SECOND_PMS_MACHINE_ID]["connections"])
    assert [(r.path, token_of(r)) for r in fakes.plex.requests] == [("/identity", None)]
    assert fakes.second_plex.requests == []


SWITCH_PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>switch</title></head><body><script>
const cfg = %(config)s;
async function titles(base, token, path) {
  const r = await fetch(`${base}${path}?X-Plex-Token=${encodeURIComponent(token)}`, {headers: {Accept: "application/json"}});
  if (!r.ok) return {status: r.status};
  const c = (await r.json()).MediaContainer;
  return {status: r.status, titles: [...(c.Directory || []), ...(c.Metadata || [])].map(d => d.title),
          cache: r.headers.get("Cache-Status")};
}
(async () => {
  const report = {visits: []};
  try {
    const r = await fetch("https://plex.tv/api/v2/resources?includeHttps=1&includeRelay=1",
                          {headers: {"X-Plex-Token": cfg.account, Accept: "application/json"}});
    const servers = (await r.json()).filter(s => (s.provides || "").includes("server"));
    report.servers = servers.map(s => s.name);
    // The player's server switch: each server's first connection and token, back and forth.
    for (const round of [1, 2]) {
      for (const s of servers) {
        const base = s.connections[0].uri;
        report.visits.push({round, server: s.clientIdentifier, base,
                            sections: await titles(base, s.accessToken, "/library/sections")});
      }
    }
  } catch (e) { report.error = String(e); }
  await fetch("/report", {method: "POST", body: JSON.stringify(report)});
})();
</script></body></html>
"""


@pytest.mark.browser
def test_the_players_server_switch_in_chromium_reaches_each_server_with_its_own_token(stack, two_servers, clean_fakes,
                                                                                    tmp_path):
    """Chromium as the user's browser (explicit proxy, the proxy's CA): the page reads the account's
    servers from plex.tv and switches between them twice; each answers its own library (the second
    through its own *.plex.direct name), and each fake saw only its own token."""
    import json

    from test_e2e_browser import run_page

    account = Player(stack).login(PLEX_ACCOUNT_TOKEN)
    report = run_page(stack, tmp_path, SWITCH_PAGE % {"config": json.dumps({"account": account})})
    assert "error" not in report, report
    visits = {(v["round"], v["server"]): v for v in report["visits"]}
    assert {server for _, server in visits} == {PMS_MACHINE_ID, SECOND_PMS_MACHINE_ID}, report
    for round_ in (1, 2):
        first, second = visits[(round_, PMS_MACHINE_ID)], visits[(round_, SECOND_PMS_MACHINE_ID)]
        assert first["base"] == stack.plex_url and ".plex.direct:" in second["base"]
        assert first["sections"]["status"] == 200 and "Films" in first["sections"]["titles"], first
        assert second["sections"] == {**second["sections"], "status": 200, "titles": ["Documentaries", "Soundtracks"]}
    assert "hit" in visits[(2, SECOND_PMS_MACHINE_ID)]["sections"]["cache"]  # the second visit: from the cache
    assert tokens_seen(clean_fakes.plex) == {PLEX_SERVER_TOKEN}
    assert tokens_seen(clean_fakes.second_plex) == {SECOND_PMS_TOKEN}


async def test_after_a_restart_another_servers_token_is_refused_before_any_resources_answer(tmp_path, fakes):
    """The player keeps its surrogates across a proxy restart and may ask the listener before it
    asks plex.tv again: the configured server is identified by its /identity first, so server B's
    surrogate sent to server A's listener is still a 421, and A never sees B's token."""
    import httpx

    from projectionist.vault import SecretBox, Vault, upsert_plex_user
    from support import start_embedded_proxy

    def as_deployed(rules: dict) -> None:
        rules["upstreams"]["plex"]["base_url"] = fakes.urls["plex"]

    accept = {"Accept": "application/json"}
    fakes.plextv.list_second_server = True
    try:
        proxy = await start_embedded_proxy(tmp_path, [f"plextv={fakes.urls['plextv']}"], as_deployed)
        try:
            vault = Vault(tmp_path / "projectionist.db", SecretBox.load(tmp_path, create=False))
            account = vault.surrogate_for("plex", PLEX_ACCOUNT_TOKEN, upsert_plex_user(vault.conn, "18573262", "mrandersson"))
            vault.close()
            async with httpx.AsyncClient(proxy=f"http://127.0.0.1:{proxy.ports['regular']}", trust_env=False,
                                         timeout=20) as c:
                resources = (await c.get("http://plex.tv/api/v2/resources",
                                         headers={"X-Plex-Token": account, **accept})).json()
            servers = {r["clientIdentifier"]: r for r in resources if "server" in r["provides"]}
            token_a, token_b = servers[PMS_MACHINE_ID]["accessToken"], servers[SECOND_PMS_MACHINE_ID]["accessToken"]
        finally:
            await proxy.stop()

        fakes.clear()
        proxy = await start_embedded_proxy(tmp_path, [f"plextv={fakes.urls['plextv']}"], as_deployed)  # the restart
        try:
            listener = next(port for mode, port in proxy.ports.items() if mode.startswith("reverse:"))
            async with httpx.AsyncClient(trust_env=False, timeout=20) as c:
                wrong = await c.get(f"http://127.0.0.1:{listener}/library/sections", params={"X-Plex-Token": token_b},
                                    headers=accept)
                right = await c.get(f"http://127.0.0.1:{listener}/library/sections", params={"X-Plex-Token": token_a},
                                    headers=accept)
        finally:
            await proxy.stop()
    finally:
        fakes.plextv.list_second_server = False
    assert wrong.status_code == 421 and b"Misdirected" in wrong.content
    assert right.status_code == 200 and "Films" in titles(right)
    assert [r.path for r in fakes.plex.requests] == ["/identity", "/library/sections"]
    assert tokens_seen(fakes.plex) == {None, PLEX_SERVER_TOKEN} and fakes.requests["plextv"] == []
