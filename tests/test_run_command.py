"""`projectionist run --demo`: the offline demo, and a clean stop that loses no usage row."""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys

import pytest
import requests

from support import REPO, free_port, wait_for

pytestmark = pytest.mark.e2e


def test_demo_mode_serves_offline_and_flushes_usage_on_stop(tmp_path):
    ports = {name: free_port() for name in ("proxy", "control", "dashboard")}
    env = {k: v for k, v in os.environ.items() if not k.upper().endswith("_PROXY")}
    env.update(PROJECTIONIST_HOME=str(tmp_path), PROJECTIONIST_PROXY_PORT=str(ports["proxy"]),
               PROJECTIONIST_CONTROL_PORT=str(ports["control"]),
               PROJECTIONIST_DASHBOARD_PORT=str(ports["dashboard"]),
               PROJECTIONIST_DEMO_PORT=str(free_port()))
    # The shipped rules.yaml, except for a reverse listener port that is free on this machine.
    rules = (REPO / "rules.yaml").read_text().replace("listen: 32401", f"listen: {free_port()}")
    (tmp_path / "rules.yaml").write_text(rules)
    env["PROJECTIONIST_RULES"] = str(tmp_path / "rules.yaml")
    proc = subprocess.Popen([sys.executable, "-m", "launcher", "run", "--demo"], env=env,
                            stdout=subprocess.PIPE, stderr=(tmp_path / "run.log").open("w"), text=True)
    try:
        banner = []  # stdout carries only the banner, which ends with the Ctrl-C line
        while (line := proc.stdout.readline()) and not line.startswith("Ctrl-C"):
            banner.append(line)
        assert banner[0].startswith("Projectionist is running in offline demo mode"), \
            "".join(banner) + (tmp_path / "run.log").read_text()[-5000:]
        session = requests.Session()
        session.trust_env = False
        proxies = {"https": f"http://127.0.0.1:{ports['proxy']}"}
        ca = tmp_path / "mitmproxy" / "mitmproxy-ca-cert.pem"
        for i in range(20):
            r = session.get("https://api.themoviedb.org/3/configuration", proxies=proxies, verify=str(ca),
                            headers={"Authorization": "Bearer demo"}, timeout=10)
            assert r.status_code in (200, 401)  # the demo's fake TMDB answered, offline
        assert "status_code" in r.json() or "images" in r.json()
    finally:
        proc.send_signal(signal.SIGINT)  # what Ctrl-C does
        code = proc.wait(30)
    assert code == 0, (tmp_path / "run.log").read_text()[-5000:]
    db = sqlite3.connect(tmp_path / "projectionist.db")
    # Every request is recorded, including those still queued when the stop came.
    assert db.execute("SELECT count(*) FROM usage_events WHERE route = 'tmdb.configuration'").fetchone()[0] == 20
    for port in ports.values():  # everything stopped
        wait_for(lambda: port_closed(port), what=f"port {port} closed")


def port_closed(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), 0.2).close()
    except OSError:
        return True
    return False
