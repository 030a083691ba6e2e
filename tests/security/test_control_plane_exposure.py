"""What the control plane hands a browser, and what it leaves on disk: no URL built from a Host a
client chose, no state file readable by another account, Secure cookies once served over HTTPS.
Each through `projectionist run` with the fakes."""

from __future__ import annotations

import os
import stat
from urllib.parse import parse_qs, unquote, urlsplit

import pytest
import requests

from fake_upstreams.data import TMDB_V4_TOKEN
from support import make_stack

pytestmark = pytest.mark.e2e


def start_login(control_url: str, host: str | None = None) -> requests.Response:
    headers = {"Accept": "application/json"}
    if host:
        headers["Host"] = host
    return requests.post(control_url + "/api/auth/plex", headers=headers, timeout=30)


def forward_url(response: requests.Response) -> str:
    assert response.status_code == 200, response.text
    fragment = urlsplit(response.json()["auth_url"]).fragment  # "!?clientID=...&forwardUrl=..."
    return unquote(parse_qs(fragment.split("?", 1)[1])["forwardUrl"][0])


def test_a_host_header_never_reaches_the_sign_in_forward_url(stack):
    port = stack.control_port
    honest = forward_url(start_login(stack.control_url))
    assert honest.startswith(f"http://127.0.0.1:{port}/api/auth/plex/")
    for evil in ("evil.example", f"evil.example:{port}", f"127.0.0.1.evil.example:{port}", f"127.0.0.1:{port}@evil"):
        url = forward_url(start_login(stack.control_url, host=evil))
        assert urlsplit(url).netloc == f"127.0.0.1:{port}", (evil, url)
    # Another name of this machine keeps its own origin (its cookies live there).
    assert urlsplit(forward_url(start_login(stack.control_url, host=f"localhost:{port}"))).netloc == f"localhost:{port}"
    # ... but only at the listener's port.
    assert urlsplit(forward_url(start_login(stack.control_url, host="localhost:1"))).netloc == f"127.0.0.1:{port}"


@pytest.fixture
def https_stack(fakes, tmp_path, monkeypatch):
    """A stack whose home an older version left readable, started with a permissive umask and
    told that browsers reach its control plane over HTTPS."""
    home = tmp_path / "home"
    (home / "cache" / "old").mkdir(parents=True)
    (home / "cache" / "old" / "entry").write_bytes(b"private answer")
    for path in (home, home / "cache", home / "cache" / "old"):
        path.chmod(0o755)
    (home / "cache" / "old" / "entry").chmod(0o644)
    monkeypatch.setenv("PROJECTIONIST_CONTROL_URL", "https://projectionist.example")
    old = os.umask(0o022)
    try:
        stack = make_stack(home, fakes).start()
    finally:
        os.umask(old)
    try:
        yield stack
    finally:
        assert stack.stop() == 0, stack.logs()


def test_state_is_private_and_cookies_are_secure_over_https(https_stack):
    stack = https_stack
    # Traffic that writes the database, the caches and the CA.
    env = stack.client_env()
    proxies = {"https": env["HTTPS_PROXY"], "http": env["HTTP_PROXY"]}
    for path in ("/3/movie/603", "/3/trending/movie/week"):
        r = requests.get("https://api.themoviedb.org" + path, headers={"Authorization": f"Bearer {TMDB_V4_TOKEN}"},
                         proxies=proxies, verify=str(stack.ca_path), timeout=30)
        assert r.status_code == 200
    stack.wait_usage("upstream = 'tmdb'", count=2)

    started = start_login(stack.control_url)
    assert forward_url(started).startswith("https://projectionist.example/api/auth/plex/")
    cookie = started.headers["Set-Cookie"]
    assert "Secure" in cookie and "HttpOnly" in cookie, cookie

    assert stack.stop() == 0, stack.logs()  # everything flushed and closed: the files are final
    readable = []
    for root, dirs, files in os.walk(stack.home):
        for name in (*dirs, *files):
            path = os.path.join(root, name)
            mode = os.lstat(path).st_mode
            if not stat.S_ISLNK(mode) and mode & 0o077:
                readable.append(f"{os.path.relpath(path, stack.home)} {stat.filemode(mode)}")
    assert not readable, readable
    assert stat.S_IMODE(os.stat(stack.home).st_mode) == 0o700
    for name in ("projectionist.db", "secret.key", "mitmproxy/mitmproxy-ca.pem"):
        assert (stack.home / name).exists(), name  # the walk above saw the files that matter
