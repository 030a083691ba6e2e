"""Installable: a wheel built from the repo, installed into a fresh virtualenv (dependencies from the
package index through pip's cache), gives a `projectionist` that runs from any directory: the first
start copies the shipped rules.yaml and datasette_metadata.yml to PROJECTIONIST_HOME and says where,
`check-rules` passes on that copy, and `run --demo` starts (health answers) and stops cleanly.

Skipped only when pip cannot reach the package index (an offline machine); any other failure fails."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import requests

from support import REPO, free_port

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

OFFLINE = re.compile(r"NewConnectionError|Failed to establish a new connection|Temporary failure in name "
                     r"resolution|Network is unreachable|No matching distribution found")


def _pip(venv: Path, *args: str, cwd: Path) -> None:
    result = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "--disable-pip-version-check", *args],
                            cwd=cwd, capture_output=True, text=True, timeout=800)
    if result.returncode != 0:
        if OFFLINE.search(result.stdout + result.stderr):
            pytest.skip(f"the package index is unreachable (offline): {result.stderr.strip()[-300:]}")
        raise AssertionError(f"pip {' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """bin/ of a fresh virtualenv holding the wheel built from this checkout."""
    root = tmp_path_factory.mktemp("install")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    dist = root / "dist"
    _pip(venv, "wheel", "--no-deps", "-w", str(dist), str(REPO), cwd=root)
    wheels = list(dist.glob("projectionist-*.whl"))
    assert len(wheels) == 1, wheels
    _pip(venv, "install", str(wheels[0]), cwd=root)
    return venv / "bin"


def _env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("PROJECTIONIST_") and not k.upper().endswith("_PROXY") and k != "PYTHONPATH"}
    env.update(PROJECTIONIST_HOME=str(home), **extra)
    return env


def test_installed_check_rules_copies_the_defaults_from_any_directory(installed, tmp_path):
    home = tmp_path / "home"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = subprocess.run([str(installed / "projectionist"), "check-rules"], cwd=elsewhere, env=_env(home),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    rules, metadata = home / "rules.yaml", home / "datasette_metadata.yml"
    assert f"{rules}: OK" in result.stdout
    assert str(rules) in result.stderr and str(metadata) in result.stderr  # the path is printed
    assert rules.read_text() == (REPO / "rules.yaml").read_text()
    assert metadata.read_text() == (REPO / "datasette_metadata.yml").read_text()
    # Installed, the package runs from site-packages, never from this checkout.
    where = subprocess.run([str(installed / "python"), "-c", "import projectionist; print(projectionist.__file__)"],
                           cwd=elsewhere, env=_env(home), capture_output=True, text=True, check=True)
    assert str(REPO) not in where.stdout
    # The user's edit is kept on the next start.
    rules.write_text(rules.read_text().replace("listen: 32401", "listen: 32402"))
    subprocess.run([str(installed / "projectionist"), "check-rules"], cwd=elsewhere, env=_env(home),
                   capture_output=True, check=True, timeout=120)
    assert "listen: 32402" in rules.read_text()


def test_installed_run_demo_starts_answers_health_and_stops(installed, tmp_path):
    home = tmp_path / "home"
    cwd = Path("/tmp")
    ports = {name: free_port() for name in ("PROXY", "CONTROL", "DASHBOARD")}
    env = _env(home, PROJECTIONIST_DEMO_PORT="0", **{f"PROJECTIONIST_{k}_PORT": str(v) for k, v in ports.items()})
    # The user's copy of the rules: first start writes it; the reverse listener moves to a free port.
    subprocess.run([str(installed / "projectionist"), "check-rules"], cwd=cwd, env=env, check=True,
                   capture_output=True, timeout=120)
    plex_port = free_port()
    rules = home / "rules.yaml"
    rules.write_text(rules.read_text().replace("listen: 32401", f"listen: {plex_port}"))
    log = (tmp_path / "run.log").open("w")
    process = subprocess.Popen([str(installed / "projectionist"), "run", "--demo"], cwd=cwd, env=env,
                               stdout=subprocess.PIPE, stderr=log, text=True, start_new_session=True)
    banner: list[str] = []

    def read_banner() -> None:
        for line in process.stdout:
            banner.append(line)
            if line.startswith("Ctrl-C"):
                return

    reader = threading.Thread(target=read_banner, daemon=True)
    reader.start()
    try:
        reader.join(180)
        assert any(line.startswith("Projectionist is running") for line in banner), \
            f"{''.join(banner)}\n{(tmp_path / 'run.log').read_text()[-4000:]}"
        health = requests.get(f"http://127.0.0.1:{ports['CONTROL']}/health", timeout=10)
        assert health.status_code == 200
        # The demo's fake Plex answers through the reverse listener (the fakes came from the wheel).
        identity = requests.get(f"http://127.0.0.1:{plex_port}/identity", timeout=10,
                                headers={"Accept": "application/json"})
        assert identity.status_code == 200 and "MediaContainer" in identity.json()
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
        try:
            code = process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(5)
            raise
    assert code == 0, (tmp_path / "run.log").read_text()[-4000:]
