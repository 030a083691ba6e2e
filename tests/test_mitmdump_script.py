"""The same addons load into a stock mitmdump with -s (for operators who run mitmproxy themselves)."""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from support import REPO, free_port, wait_for, write_test_rules

pytestmark = pytest.mark.e2e


def test_mitmdump_loads_the_addons_and_records_usage(tmp_path, fakes):
    mitmdump = shutil.which("mitmdump", path=str(Path(sys.executable).parent))
    assert mitmdump, "mitmdump is installed with mitmproxy"
    plex_port, proxy_port = free_port(), free_port()
    rules = write_test_rules(tmp_path / "rules.yaml", plex_port)
    db = tmp_path / "p.db"
    proc = subprocess.Popen([
        mitmdump, "-q", "-s", str(REPO / "proxy_addons" / "script.py"),
        "--mode", f"regular@{proxy_port}", "--mode", f"reverse:{fakes.urls['plex']}@{plex_port}",
        "--set", "connection_strategy=lazy", "--set", f"confdir={tmp_path / 'mitmproxy'}",
        "--set", f"projectionist_rules={rules}", "--set", f"projectionist_db={db}",
        "--set", f"projectionist_home={tmp_path}",
        # rules.yaml is the authority on where an upstream lives: point both at the fakes.
        "--set", f"projectionist_upstreams=tmdb={fakes.urls['tmdb']}",
        "--set", f"projectionist_upstreams=plex={fakes.urls['plex']}",
    ], stderr=(tmp_path / "mitmdump.log").open("w"))
    try:
        session = requests.Session()
        session.trust_env = False

        def answered():
            try:
                return session.get(f"http://127.0.0.1:{plex_port}/identity", timeout=2).status_code == 200  # /identity needs no token
            except requests.ConnectionError:
                return False

        wait_for(answered, timeout=30, what="mitmdump to listen")
        r = session.get("http://api.themoviedb.org/3/configuration", params={"api_key": "x"},
                        proxies={"http": f"http://127.0.0.1:{proxy_port}"}, timeout=10)
        # The fake TMDB answered, with the server's key injected in place of the client's.
        assert r.status_code == 200 and "images" in r.json()
    finally:
        proc.terminate()
        proc.wait(20)
    routes = [row[0] for row in sqlite3.connect(db).execute("SELECT route FROM usage_events ORDER BY id")]
    assert "plex.identity" in routes and "tmdb.configuration" in routes, (
        routes, (tmp_path / "mitmdump.log").read_text()[-3000:])
