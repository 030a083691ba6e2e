"""The whole system as `projectionist run` starts it, driven by real clients against the fakes.

Clients are configured the way a user would configure them: plexapi and tmdbsimple only through
environment variables (HTTPS_PROXY, REQUESTS_CA_BUNDLE, PLEXAPI_*), requests with a proxy.
"""

from __future__ import annotations

import hashlib
import logging
import socket
import ssl
import threading
import time

import psutil
import pytest
import requests

from fake_upstreams.data import PLEX_ACCOUNT_TOKEN, PLEX_SERVER_TOKEN, TMDB_V3_KEY

from support import free_port, wait_for

pytestmark = pytest.mark.e2e


def test_control_plane_health_reports_db_and_versions(stack):
    body = requests.get(f"{stack.control_url}/health", timeout=5).json()
    assert body["status"] == "ok"
    assert body["db"]["ok"] and body["db"]["schema_version"] >= 1
    assert body["versions"]["mitmproxy"].startswith("12.")
    assert body["versions"]["datasette"].startswith("0.65")


def test_tmdbsimple_through_the_explicit_proxy(stack, clean_fakes):
    info = stack.run_client(
        "import json, tmdbsimple; print(json.dumps(tmdbsimple.Movies(603).info()))",
        TMDB_API_KEY=TMDB_V3_KEY,
    )
    assert info["title"] == "The Matrix" and info["id"] == 603
    received = [r for r in clean_fakes.requests["tmdb"] if r.path == "/3/movie/603"]
    assert len(received) == 1 and received[0].query["api_key"] in (TMDB_V3_KEY, [TMDB_V3_KEY])
    row = stack.wait_usage("route = 'tmdb.details' AND status = 200")[-1]
    assert (row["listener"], row["upstream"], row["method"]) == ("regular", "tmdb", "GET")
    assert row["bytes_out"] > 500 and row["latency_ms"] > 0


def test_tmdb_errors_arrive_intact(stack):
    # The client's key is replaced by the server's, so the upstream's own 404 comes back.
    search = stack.run_client(
        "import json, requests; r = requests.get('https://api.themoviedb.org/3/movie/999999999',"
        " params={'api_key': 'wrong'}); print(json.dumps([r.status_code, r.json()]))"
    )
    assert search == [404, {"success": False, "status_code": 34,
                            "status_message": "The resource you requested could not be found."}]


def test_plexapi_through_the_reverse_listener(stack, clean_fakes):
    titles = stack.run_client(
        "import json; from plexapi.server import PlexServer\n"
        "plex = PlexServer()\n"
        "films = plex.library.section('Films').all()\n"
        "matrix = plex.fetchItem(1001)\n"
        "print(json.dumps({'server': plex.friendlyName, 'films': [m.title for m in films],"
        " 'matrix': matrix.title, 'sections': [s.title for s in plex.library.sections()]}))",
        PLEXAPI_AUTH_SERVER_BASEURL=stack.plex_url, PLEXAPI_AUTH_SERVER_TOKEN=PLEX_SERVER_TOKEN,
    )
    assert titles["matrix"] == "The Matrix" and "The Matrix" in titles["films"]
    assert "Films" in titles["sections"]
    routes = {r["route"] for r in stack.wait_usage("upstream = 'plex' AND route = 'plex.metadata'")}
    assert routes == {"plex.metadata"}
    assert all(r.query.get("X-Plex-Token") or r.headers.get("X-Plex-Token")
               for r in clean_fakes.requests["plex"])


def test_plexapi_myplex_account_through_the_https_proxy(stack):
    account = stack.run_client(
        "import json; from plexapi.myplex import MyPlexAccount\n"
        f"a = MyPlexAccount(token={PLEX_ACCOUNT_TOKEN!r})\n"
        "print(json.dumps({'user': a.username, 'servers': [r.name for r in a.resources()]}))",
    )
    assert account["user"] and account["servers"]
    stack.wait_usage("upstream = 'plextv' AND route = 'plextv.resources'")


@pytest.mark.parametrize("accept, content_type", [("application/json", "application/json"), (None, "text/xml")])
def test_plex_json_and_xml_bodies_are_byte_identical(stack, accept, content_type):
    headers = {"Accept": accept} if accept else {}
    path = f"/library/sections/1/all?X-Plex-Container-Start=0&X-Plex-Container-Size=2&X-Plex-Token={PLEX_SERVER_TOKEN}"
    direct = requests.get(stack.fakes.urls["plex"] + path, headers=headers, timeout=10)
    proxied = requests.get(stack.plex_url + path, headers=headers, timeout=10)
    assert proxied.status_code == direct.status_code == 200
    assert proxied.headers["Content-Type"].startswith(content_type)
    assert proxied.content == direct.content
    assert proxied.headers["X-Plex-Container-Total-Size"] == direct.headers["X-Plex-Container-Total-Size"]


def test_plex_404_passes_through_and_is_recorded(stack):
    r = requests.get(f"{stack.plex_url}/library/metadata/424242?X-Plex-Token={PLEX_SERVER_TOKEN}", timeout=10)
    assert r.status_code == 404
    stack.wait_usage("route = 'plex.metadata' AND status = 404")


def _part_url(stack) -> tuple[str, int]:
    meta = requests.get(f"{stack.plex_url}/library/metadata/1001?X-Plex-Token={PLEX_SERVER_TOKEN}",
                        headers={"Accept": "application/json"}, timeout=10).json()
    part = meta["MediaContainer"]["Metadata"][0]["Media"][0]["Part"][0]
    return f"{stack.plex_url}{part['key']}?X-Plex-Token={PLEX_SERVER_TOKEN}", int(part["size"])


def test_range_requests_pass_through(stack):
    url, size = _part_url(stack)
    direct_url = url.replace(stack.plex_url, stack.fakes.urls["plex"])
    for byte_range in ("bytes=0-1023", f"bytes={size // 2}-{size // 2 + 65535}", f"bytes={size - 100}-"):
        proxied = requests.get(url, headers={"Range": byte_range}, timeout=30)
        direct = requests.get(direct_url, headers={"Range": byte_range}, timeout=30)
        assert proxied.status_code == 206
        assert proxied.headers["Content-Range"] == direct.headers["Content-Range"]
        assert proxied.content == direct.content
    assert requests.get(url, headers={"Range": f"bytes={size + 10}-"}, timeout=30).status_code == 416


def _proxy_process(stack) -> psutil.Process:
    for child in psutil.Process(stack.process.pid).children(recursive=True):
        if child.cmdline()[-1:] == ["proxy"]:
            return child
    raise AssertionError("no proxy process under `projectionist run`")


def test_500_mb_part_streams_with_bounded_memory(stack):
    url, size = _part_url(stack)
    assert size >= 500 * 1024 * 1024
    proxy = _proxy_process(stack)
    baseline = proxy.memory_info().rss
    peak = baseline
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, proxy.memory_info().rss)
            time.sleep(0.05)

    sampler = threading.Thread(target=sample)
    sampler.start()
    digest, received = hashlib.sha256(), 0
    try:
        with requests.get(url, stream=True, timeout=60) as r:
            assert r.status_code == 200
            for chunk in r.iter_content(1 << 20):
                digest.update(chunk)
                received += len(chunk)
    finally:
        done.set()
        sampler.join()
    assert received == size
    expected = hashlib.sha256()
    with requests.get(url.replace(stack.plex_url, stack.fakes.urls["plex"]), stream=True, timeout=60) as r:
        for chunk in r.iter_content(1 << 20):
            expected.update(chunk)
    assert digest.hexdigest() == expected.hexdigest()
    growth_mb = (peak - baseline) / 2**20
    logging.getLogger(__name__).info("streamed %d MB; proxy RSS grew by %.1f MB", size >> 20, growth_mb)
    assert growth_mb < 64, f"proxy RSS grew by {growth_mb:.0f} MB while streaming {size >> 20} MB"
    row = stack.wait_usage("route = 'plex.part' AND bytes_out >= ?", (size,))[-1]
    assert row["bytes_out"] == size and row["status"] == 200


def test_unknown_hosts_pass_through_untouched_and_unrecorded(stack, tmp_path):
    """TLS to a host no rule names is tunnelled, not intercepted: the client sees the origin's own
    certificate, and no usage row is written."""
    import trustme  # a throwaway CA for the "unrelated" HTTPS server

    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(server_ctx)
    port = free_port()
    listener = socket.create_server(("127.0.0.1", port))
    served = []

    def serve_one() -> None:
        conn, _ = listener.accept()
        with server_ctx.wrap_socket(conn, server_side=True) as tls:
            tls.recv(65536)
            tls.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
            served.append(True)

    thread = threading.Thread(target=serve_one, daemon=True)
    thread.start()
    before = len(stack.usage())
    ca_file = tmp_path / "unrelated-ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    # Resolve the name to our local server through the proxy's CONNECT target.
    session = requests.Session()
    session.trust_env = False
    try:
        r = session.get(f"https://127.0.0.1:{port}/", proxies={"https": stack.proxy_url},
                        verify=str(ca_file), timeout=10)
    finally:
        listener.close()
    assert r.status_code == 200 and r.text == "ok"  # verified against the origin's CA, not ours
    assert served
    time.sleep(0.3)
    assert len(stack.usage()) == before


def test_dashboard_shows_usage_without_sql(stack):
    stack.wait_usage("1")
    url = f"{stack.dashboard_url}/projectionist/usage_events.json?_shape=array"
    assert requests.get(url, timeout=10).status_code == 401  # admins only
    # As an admin: user "admin", the password from the file `projectionist run` points at.
    admin = ("admin", (stack.home / "dashboard-password").read_text().strip())
    rows = requests.get(url, auth=admin, timeout=10).json()
    assert rows and {"route", "upstream", "status", "latency_ms"} <= set(rows[0])
    assert requests.get(f"{stack.dashboard_url}/projectionist.json?sql=select+1", auth=admin,
                        timeout=10).status_code == 403


def test_usage_rows_hold_no_token(stack):
    wait_for(lambda: len(stack.usage()) >= 5, what="some usage rows")
    raw = stack.db_path.read_bytes() + (stack.db_path.with_name("projectionist.db-wal").read_bytes()
                                        if stack.db_path.with_name("projectionist.db-wal").exists() else b"")
    for secret in (PLEX_SERVER_TOKEN, PLEX_ACCOUNT_TOKEN, TMDB_V3_KEY):
        assert secret.encode() not in raw
