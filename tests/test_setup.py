"""First run: the PAC file follows rules.yaml (after a reload too), the CA downloads hold the
certificate only (on the control plane and on the reserved setup host through the proxy), and
`/health` says `degraded` with the Plex server that does not answer, which the banner names too."""

from __future__ import annotations

import asyncio
import os
import plistlib
import re
import signal
import subprocess
import sys

import pytest
import requests
import yaml
from aiohttp import web
from cryptography import x509
from support import REPO, free_port, wait_for, write_test_rules

from fake_upstreams.data import PMS_VERSION
from projectionist.onboarding import PAC_CONTENT_TYPE, SETUP_HOST, ca_download, pac_file

DOWNLOADS = {"projectionist-ca.pem": "application/x-pem-file",
             "projectionist-ca.crt": "application/x-x509-ca-cert",
             "projectionist-ca.mobileconfig": "application/x-apple-aspen-config"}


def direct() -> requests.Session:
    session = requests.Session()
    session.trust_env = False
    return session


def assert_certificate_only(name: str, body: bytes, ca_pem: bytes) -> None:
    assert b"PRIVATE KEY" not in body and b"PRIVATE" not in body.upper()
    expected = x509.load_pem_x509_certificate(ca_pem)
    if name.endswith(".pem"):
        assert x509.load_pem_x509_certificate(body) == expected
    elif name.endswith(".crt"):
        assert x509.load_der_x509_certificate(body) == expected
    else:
        profile = plistlib.loads(body)
        (payload,) = profile["PayloadContent"]
        assert payload["PayloadType"] == "com.apple.security.root"
        assert x509.load_der_x509_certificate(payload["PayloadContent"]) == expected
        assert set(_all_keys(profile)) <= {"PayloadType", "PayloadVersion", "PayloadIdentifier", "PayloadUUID",
                                           "PayloadDisplayName", "PayloadContent", "PayloadCertificateFileName",
                                           "PayloadDescription", "PayloadOrganization"}


def _all_keys(value):
    if isinstance(value, dict):
        for key, item in value.items():
            yield key
            yield from _all_keys(item)
    elif isinstance(value, list):
        for item in value:
            yield from _all_keys(item)


def test_downloads_from_a_file_with_the_key_still_give_the_certificate_only(stack):
    # mitmproxy-ca.pem holds the CA's key *and* certificate: even given that, only the certificate comes out.
    bundle = (stack.home / "mitmproxy" / "mitmproxy-ca.pem").read_bytes()
    assert b"PRIVATE KEY" in bundle
    for name in DOWNLOADS:
        assert_certificate_only(name, ca_download(bundle, name), stack.ca_path.read_bytes())


def test_pac_file_sends_only_the_given_hosts_to_the_proxy():
    pac = pac_file(["plex.tv", "*.plex.direct", "API.TheMovieDB.org."], "10.0.0.2:8080")
    assert pac.startswith("// Projectionist") and "function FindProxyForURL(url, host)" in pac
    exact = re.search(r"var exact = (\[.*?\]);", pac).group(1)
    patterns = re.search(r"var patterns = (\[.*?\]);", pac).group(1)
    assert yaml.safe_load(exact) == [SETUP_HOST, "plex.tv", "api.themoviedb.org"]
    assert yaml.safe_load(patterns) == ["*.plex.direct"]
    assert 'var proxy = "PROXY 10.0.0.2:8080";' in pac and 'return "DIRECT";' in pac


@pytest.mark.e2e
def test_ca_downloads_on_the_control_plane_and_through_the_proxy(stack):
    ca_pem = stack.ca_path.read_bytes()
    proxies = {"http": stack.proxy_url, "https": stack.proxy_url}
    for name, content_type in DOWNLOADS.items():
        r = direct().get(f"{stack.control_url}/ca/{name}", timeout=10)
        assert r.status_code == 200 and r.headers["Content-Type"].startswith(content_type)
        assert f'filename="{name}"' in r.headers["Content-Disposition"]
        assert_certificate_only(name, r.content, ca_pem)
        # The same file on the reserved host, which only the proxy answers (over HTTPS: its own CA).
        for scheme in ("http", "https"):
            via = direct().get(f"{scheme}://{SETUP_HOST}/ca/{name}", proxies=proxies, verify=str(stack.ca_path),
                               timeout=10)
            assert via.status_code == 200 and via.content == r.content, (scheme, name)
    assert direct().get(f"{stack.control_url}/ca/mitmproxy-ca.pem", timeout=10).status_code == 404
    missing = direct().get(f"http://{SETUP_HOST}/ca/mitmproxy-ca.pem", proxies=proxies, timeout=10)
    assert missing.status_code == 404 and b"PRIVATE" not in missing.content


@pytest.mark.e2e
def test_probe_answers_only_through_the_proxy_with_cors(stack):
    proxies = {"http": stack.proxy_url, "https": stack.proxy_url}
    for scheme in ("http", "https"):
        r = direct().get(f"{scheme}://{SETUP_HOST}/probe", proxies=proxies, verify=str(stack.ca_path),
                         headers={"Origin": stack.control_url}, timeout=10)
        assert r.status_code == 200 and r.headers["Access-Control-Allow-Origin"] == "*"
        setup = direct().get(f"{stack.control_url}/api/setup", timeout=10).json()
        assert r.json() == {"proxy": "projectionist", "scheme": scheme, "ca_sha256": setup["ca"]["sha256"]}
    with pytest.raises(requests.exceptions.SSLError):  # a browser without the CA fails here: step 2 is red
        direct().get(f"https://{SETUP_HOST}/probe", proxies=proxies, timeout=10)
    with pytest.raises(requests.exceptions.ConnectionError):  # not through the proxy: no such host
        direct().get(f"http://{SETUP_HOST}/probe", timeout=10)


@pytest.mark.e2e
def test_pac_follows_rules_yaml_after_a_reload(stack):
    original = stack.rules_path.read_text()
    r = direct().get(f"{stack.control_url}/proxy.pac", timeout=10)
    assert r.status_code == 200 and r.headers["Content-Type"].startswith(PAC_CONTENT_TYPE)
    assert f'"PROXY 127.0.0.1:{stack.proxy_port}"' in r.text
    for host in ("plex.tv", "api.themoviedb.org", "image.tmdb.org", "api.trakt.tv", "*.plex.direct", SETUP_HOST):
        assert f'"{host}"' in r.text
    assert '"app.plex.tv"' in r.text  # intercept: when_overridden, and overridden here (as in the demo)
    assert "tmdb.example.net" not in r.text and "127.0.0.1:" + str(stack.control_port) not in r.text

    def add_hosts(rules: dict) -> None:
        rules["upstreams"]["tmdb"]["hosts"].append("api.tmdb.example.net")
        rules["upstreams"]["tmdb-images"]["hosts"].append("*.images.example.net")

    try:
        write_test_rules(stack.rules_path, stack.plex_port, add_hosts)
        pac = wait_for(lambda: (t := direct().get(f"{stack.control_url}/proxy.pac", timeout=10).text)
                       and "api.tmdb.example.net" in t and t, what="the PAC file to follow the edit")
        assert re.search(r'var patterns = \[[^\]]*"\*\.images\.example\.net"', pac)
        # An invalid edit keeps the previous rules, as the proxy does.
        stack.rules_path.write_text(original + "\nupstreams: [not, a, mapping\n")
        for _ in range(3):
            assert "api.tmdb.example.net" in direct().get(f"{stack.control_url}/proxy.pac", timeout=10).text
    finally:
        stack.rules_path.write_text(original)
    wait_for(lambda: "api.tmdb.example.net" not in direct().get(f"{stack.control_url}/proxy.pac", timeout=10).text,
             what="the PAC file to drop the host again")


@pytest.mark.e2e
def test_health_is_ok_and_names_the_plex_server_when_it_answers(stack):
    health = wait_for(lambda: (h := direct().get(f"{stack.control_url}/health", timeout=10).json())
                      ["upstreams_checked"] and h, what="the first upstream check")
    assert health["status"] == "ok" and health["failing"] == {}
    assert health["upstreams"]["plex"]["ok"] is True and health["upstreams"]["plex"]["version"] == PMS_VERSION
    setup = direct().get(f"{stack.control_url}/api/setup", timeout=10).json()
    assert setup["plex"]["plex"]["version"] == PMS_VERSION
    assert setup["player_urls"] == [{"upstream": "plex", "url": stack.plex_url}]
    assert setup["tmdb"]["ok"] is True and setup["trakt"]["ok"] is True
    page = direct().get(f"{stack.control_url}/setup", timeout=10)
    assert page.status_code == 200 and "connect-src 'self' http://projectionist.invalid https://projectionist.invalid" \
        in page.headers["Content-Security-Policy"]


class SilentPort:
    """A port that accepts connections and never answers: a Plex server behind a black hole."""

    async def __aenter__(self):
        self.held = []  # the connections stay open, unanswered
        self.server = await asyncio.start_server(lambda r, w: self.held.append(w), "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc):
        for writer in self.held:
            writer.close()
        self.server.close()


@pytest.mark.parametrize("failure", ["refused", "not-plex", "timeout"])
async def test_health_is_degraded_naming_the_failing_plex_server_and_since_when(tmp_path, failure):
    from control.app import create_app
    from control.options import ControlOptions
    from projectionist.config import Config

    async def not_plex(_request):
        return web.Response(text="<html>a router's login page</html>", content_type="text/html")

    other = web.Application()
    other.router.add_get("/identity", not_plex)
    runner = web.AppRunner(other)
    await runner.setup()
    port = free_port()
    silent = await SilentPort().__aenter__()
    if failure == "not-plex":
        await web.TCPSite(runner, "127.0.0.1", port).start()
    elif failure == "timeout":
        port = silent.port
    write_test_rules(tmp_path / "rules.yaml", free_port(),
                     lambda rules: rules["upstreams"]["plex"].update(base_url=f"http://127.0.0.1:{port}"))
    config = Config(home=tmp_path, rules_path=tmp_path / "rules.yaml", datasette_metadata=tmp_path / "x.yml",
                    control_port=free_port())
    app = create_app(config, ControlOptions())
    control = web.AppRunner(app)
    await control.setup()
    await web.TCPSite(control, "127.0.0.1", config.control_port).start()
    try:
        import aiohttp

        async with aiohttp.ClientSession() as client:
            for _ in range(200):
                async with client.get(f"http://127.0.0.1:{config.control_port}/health") as response:
                    health = await response.json()
                if health["upstreams_checked"]:
                    break
                await asyncio.sleep(0.1)
            assert response.status == 200  # the control plane itself works: it explains the problem
            assert health["status"] == "degraded"
            failing = health["failing"]["plex"]
            assert failing["error"] == failure and failing["url"] == f"http://127.0.0.1:{port}"
            assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", failing["since"])
            async with client.get(f"http://127.0.0.1:{config.control_port}/proxy.pac") as response:
                pac = await response.text()
            # Not overridden here: app.plex.tv passes through the proxy untouched, so it goes direct.
            assert '"plex.tv"' in pac and '"app.plex.tv"' not in pac
            assert {"refused": "connection refused", "not-plex": "did not answer like a Plex",
                    "timeout": "no answer from"}[failure] in failing["detail"]
    finally:
        await control.cleanup()
        await runner.cleanup()
        await silent.__aexit__()


@pytest.mark.e2e
def test_run_banner_says_plex_is_unreachable_and_ends_with_the_setup_page(tmp_path, fakes):
    dead = free_port()
    rules = write_test_rules(tmp_path / "rules.yaml", free_port(),
                             lambda r: r["upstreams"]["plex"].update(base_url=f"http://127.0.0.1:{dead}"))
    ports = {name: free_port() for name in ("proxy", "control", "dashboard")}
    env = {k: v for k, v in os.environ.items() if not k.upper().endswith("_PROXY")}
    env.update(PROJECTIONIST_HOME=str(tmp_path), PROJECTIONIST_RULES=str(rules),
               PROJECTIONIST_PROXY_PORT=str(ports["proxy"]), PROJECTIONIST_CONTROL_PORT=str(ports["control"]),
               PROJECTIONIST_DASHBOARD_PORT=str(ports["dashboard"]),
               # everything but Plex goes to the fakes
               PROJECTIONIST_UPSTREAMS=f"tmdb={fakes.urls['tmdb']},trakt={fakes.urls['trakt']}")
    proc = subprocess.Popen([sys.executable, "-m", "launcher", "run"], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=(tmp_path / "run.log").open("w"), text=True)
    try:
        banner = []
        while (line := proc.stdout.readline()):
            banner.append(line.rstrip("\n"))
            if line.startswith("Next:"):
                break
        text = "\n".join(banner) + "\n" + (tmp_path / "run.log").read_text()[-3000:]
        assert banner[-1] == f"Next: open http://127.0.0.1:{ports['control']}/setup", text
        (plex_line,) = [line for line in banner if line.startswith("  Plex (plex)")]
        assert "UNREACHABLE since " in plex_line and f"connection refused at http://127.0.0.1:{dead}" in plex_line
        health = direct().get(f"http://127.0.0.1:{ports['control']}/health", timeout=10).json()
        assert health["status"] == "degraded" and health["failing"]["plex"]["error"] == "refused"
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(30)
    assert code == 0, (tmp_path / "run.log").read_text()[-3000:]


def test_every_subcommand_help_lists_its_options_and_environment():
    commands = ["run", "proxy", "control", "dashboard", "check-rules", "migrate", "rotate-key", "backup",
                "restore", "test"]
    for command in commands:
        proc = subprocess.run([sys.executable, "-m", "launcher", command, "--help"], cwd=REPO,
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, (command, proc.stderr)
        out = proc.stdout
        assert "options:" in out and "-h, --help" in out, (command, out)
        if command != "test":
            assert "environment:" in out and ("PROJECTIONIST_HOME" in out or command == "check-rules"), (command, out)
    run_help = subprocess.run([sys.executable, "-m", "launcher", "run", "--help"], cwd=REPO,
                              capture_output=True, text=True, timeout=60).stdout
    for name in ("--demo", "PROJECTIONIST_PROXY_PORT", "PROJECTIONIST_CONTROL_PORT", "PROJECTIONIST_UPSTREAMS",
                 "PROJECTIONIST_TMDB_API_KEY", "PROJECTIONIST_TRAKT_CLIENT_ID", "PROJECTIONIST_DEMO_PORT"):
        assert name in run_help, name
    check_help = subprocess.run([sys.executable, "-m", "launcher", "check-rules", "--help"], cwd=REPO,
                                capture_output=True, text=True, timeout=60).stdout
    assert "PROJECTIONIST_RULES" in check_help and "PROJECTIONIST_TMDB_API_KEY" not in check_help



def test_upstream_health_keeps_since_while_the_state_holds_and_resets_it_on_a_change(monkeypatch):
    from control import upstream_health
    from control.upstream_health import Check, UpstreamHealth

    moments = iter(["2026-01-01T10:00:00+00:00", "2026-01-01T10:05:00+00:00", "2026-01-01T10:09:00+00:00"])

    class Clock:
        @staticmethod
        def now(_tz):
            class Stamp:
                def isoformat(self, timespec):
                    return next(moments)
            return Stamp()

    monkeypatch.setattr(upstream_health, "datetime", Clock)
    health = UpstreamHealth()
    down = health.record("plex", Check(False, "http://pms:32400", "refused", "connection refused"))
    assert down.since == "2026-01-01T10:00:00+00:00" and set(health.failing()) == {"plex"}
    again = health.record("plex", Check(False, "http://pms:32400", "refused", "connection refused"))
    assert again.since == "2026-01-01T10:00:00+00:00"  # still down since the first failure
    other = health.record("plex", Check(False, "http://pms:32400", "timeout", "no answer"))
    assert other.since == "2026-01-01T10:05:00+00:00"  # a different failure starts its own period
    up = health.record("plex", Check(True, "http://pms:32400", version="1.43.2"))
    assert up.since == "2026-01-01T10:09:00+00:00" and health.failing() == {}


async def test_without_a_rules_file_the_pages_say_so_instead_of_failing(tmp_path):
    import aiohttp

    from control.app import create_app
    from control.options import ControlOptions
    from projectionist.config import Config

    config = Config(home=tmp_path, rules_path=tmp_path / "missing.yaml", datasette_metadata=tmp_path / "x.yml",
                    control_port=free_port())
    control = web.AppRunner(create_app(config, ControlOptions()))
    await control.setup()
    await web.TCPSite(control, "127.0.0.1", config.control_port).start()
    try:
        async with aiohttp.ClientSession() as client:
            base = f"http://127.0.0.1:{config.control_port}"
            async with client.get(base + "/proxy.pac") as response:  # only the setup host, so /setup works
                pac = await response.text()
                assert response.status == 200 and f'"{SETUP_HOST}"' in pac and '"plex.tv"' not in pac
            async with client.get(base + "/ca/projectionist-ca.pem") as response:  # no proxy has run here
                assert response.status == 404 and "not created" in await response.text()
            async with client.get(base + "/api/setup") as response:
                status = await response.json()
            assert response.status == 200 and "missing.yaml" in status["rules_problem"]
            assert status["plex"] == {} and status["player_urls"] == []
            (tmp_path / "missing.yaml").write_text((REPO / "rules.yaml").read_text())
            async with client.get(base + "/proxy.pac") as response:  # the file appears: used at once
                assert response.status == 200 and '"plex.tv"' in await response.text()
    finally:
        await control.cleanup()
