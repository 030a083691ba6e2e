"""Issue 16 case 5 and issue 14's failing-well items: child processes die with their parent, always,
and a start that cannot happen says why in one line (exit 2, no traceback, nothing left behind).

`projectionist proxy` runs as the user runs it (a subprocess with its image worker pool)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest

from support import REPO, free_port, wait_for, write_test_rules


def proxy_env(home, **extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROJECTIONIST_")}
    env.update(PROJECTIONIST_HOME=str(home), PROJECTIONIST_RULES=str(home / "rules.yaml"), **extra)
    return env


def start_proxy(home, port: int) -> subprocess.Popen:
    write_test_rules(home / "rules.yaml", free_port(), lambda rules: rules["images"].update(workers=2))
    return subprocess.Popen([sys.executable, "-m", "launcher", "proxy"], cwd=REPO,
                            env=proxy_env(home, PROJECTIONIST_PROXY_PORT=str(port)),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def image_workers(proc: psutil.Process) -> list[psutil.Process]:
    return [c for c in proc.children(recursive=True)]


def all_gone(processes: list[psutil.Process]) -> bool:
    return not [p for p in processes if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM])
def test_image_workers_die_with_the_proxy(tmp_path, how):
    port = free_port()
    proc = start_proxy(tmp_path, port)
    try:
        parent = psutil.Process(proc.pid)
        # The forkserver and the two workers it forked start with the pool.
        children = wait_for(lambda: (c := image_workers(parent)) and len(c) >= 3 and c, timeout=60,
                            what="the image worker pool")
        wait_for(lambda: socket.create_connection(("127.0.0.1", port), timeout=1).close() or True
                 if proc.poll() is None else pytest.fail(proc.stderr.read()), timeout=30, what="the proxy port")
        os.kill(proc.pid, how)
        proc.wait(15)
        started = time.monotonic()
        wait_for(lambda: all_gone(children), timeout=10, what="the image workers to end")
        took = time.monotonic() - started
        print(f"{len(children)} child processes ended {took:.2f} s after the proxy got {how.name}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_port_in_use_is_one_line_exit_2_and_no_process_left(tmp_path):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        proc = start_proxy(tmp_path, port)
        _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    assert str(port) in lines[0] and "proxy" in lines[0] and "PROJECTIONIST_PROXY_PORT" in lines[0]
    assert not [p for p in psutil.process_iter(["cmdline"])
                if str(tmp_path) in " ".join(p.info["cmdline"] or [])], "a process of the failed start is left"


def test_reverse_listener_port_in_use_names_the_rules_setting(tmp_path):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        write_test_rules(tmp_path / "rules.yaml", taken)
        proc = subprocess.run([sys.executable, "-m", "launcher", "proxy"], cwd=REPO, timeout=60,
                              env=proxy_env(tmp_path, PROJECTIONIST_PROXY_PORT=str(free_port())),
                              capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert str(taken) in proc.stderr and "upstreams.plex.listen" in proc.stderr


@pytest.mark.parametrize("variable,value", [("PROJECTIONIST_PROXY_PORT", "80a"),
                                            ("PROJECTIONIST_CONTROL_PORT", "70000"),
                                            ("PROJECTIONIST_DASHBOARD_PORT", "-1")])
def test_invalid_environment_value_names_variable_value_and_what_is_allowed(tmp_path, variable, value):
    proc = subprocess.run([sys.executable, "-m", "launcher", "run"], cwd=REPO, timeout=60,
                          env=proxy_env(tmp_path, **{variable: value}), capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert variable in proc.stderr and repr(value) in proc.stderr and "1 to 65535" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("variable,value,allowed", [
    ("PROJECTIONIST_SESSION_TTL", "two weeks", "whole number of at least 60"),
    ("PROJECTIONIST_AUTH_RATE_LIMIT", "lots", "COUNT/SECONDS"),
    ("PROJECTIONIST_CONTROL_URL", "ftp://projectionist.lan", "https://host[:port]"),
    ("PROJECTIONIST_UPSTREAMS", "tmdb", "name=http(s)://host[:port]"),
    ("PROJECTIONIST_LOG_FORMAT", "xml", "auto, json, text"),
    ("PROJECTIONIST_DASHBOARD_LOGIN_LIMIT", "ten/900", "COUNT/SECONDS"),
])
def test_every_invalid_setting_is_one_line_before_anything_starts(tmp_path, variable, value, allowed):
    """Not only ports: each service setting is parsed before a process starts, so a bad value is
    one line and exit 2, with no service left running beside a crashed one."""
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "launcher", "run"], cwd=REPO, timeout=60,
                          env=proxy_env(tmp_path, **{variable: value}), capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert variable in proc.stderr and repr(value) in proc.stderr and allowed in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert time.monotonic() - started < 30  # refused up front, not after the services came up
    assert not (tmp_path / "projectionist.db").exists()  # nothing was started


def test_a_redis_url_that_is_not_one_is_refused_without_repeating_it(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "launcher", "run"], cwd=REPO, timeout=60,
                          env=proxy_env(tmp_path, PROJECTIONIST_REDIS_URL="http://user:hunter2@cache"),
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "PROJECTIONIST_REDIS_URL" in proc.stderr and "redis://" in proc.stderr
    assert "hunter2" not in proc.stderr
