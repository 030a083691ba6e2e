"""Processes a benchmark needs: the local upstream and the Projectionist proxy, each in its own process.

On a 2-core box the load generator, the proxy and the upstream must not share an event loop, or
the numbers measure the scheduler instead of the proxy. Both helpers are context managers that
always stop what they started:

    with UpstreamProcess() as up, ProxyProcess(rules, overrides={"plex": up.url}) as px:
        px.reverse_port("plex"), px.proxy_port, px.db_path, px.cpu_seconds()
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
LOCALHOST = "127.0.0.1"


def free_port() -> int:
    """A port that was free a moment ago (the proxy binds it itself; the race is harmless here)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOCALHOST, 0))
        return s.getsockname()[1]


def forwarding_only(*routes: str):
    """A rules edit for pass-through baselines: these routes neither cache nor rate-limit, so the
    proxy forwards every request (the shipped rules would answer them from the cache, or queue them
    behind the default TMDB key's 2 req/s)."""
    def edit(rules: dict) -> None:
        for route in rules["routes"]:
            if route["name"] in routes:
                route.pop("cache", None)
                route.pop("limits", None)
                route.pop("throttle", None)
        for upstream in rules["upstreams"].values():
            upstream.pop("limits", None)
    return edit


def tmdb_default_limit(rate: str, burst: int, max_wait: float):
    """A rules edit: the default TMDB key is limited by `tmdb-default` (per credential) and no other
    upstream is limited at all."""
    def edit(rules: dict) -> None:
        rules["limits"] = {"tmdb-default": {"rate": rate, "burst": burst, "per": "credential",
                                            "when_credential": "default", "max_wait": max_wait}}
        for name, upstream in rules["upstreams"].items():
            upstream["limits"] = ["tmdb-default"] if name == "tmdb" else []
    return edit


def process_cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process (Linux /proc; None elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks  # utime, stime (fields 14 and 15 of stat)


def _wait_port(port: int, proc: subprocess.Popen, deadline: float) -> None:
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before port {port} opened")
        try:
            socket.create_connection((LOCALHOST, port), timeout=0.5).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"port {port} did not open in time") from None
            time.sleep(0.05)


def _stop(proc: subprocess.Popen | None, timeout: float = 15.0) -> int | None:
    if proc is None:
        return None
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    return proc.returncode


class RedisServer:
    """A throw-away `redis-server` on a free loopback port: no persistence, stopped on exit."""

    def __init__(self) -> None:
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://{LOCALHOST}:{self.port}/0"

    def __enter__(self) -> RedisServer:
        server = shutil.which("redis-server")
        if server is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
        self.proc = subprocess.Popen([server, "--port", str(self.port), "--bind", LOCALHOST, "--save", "",
                                      "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            _wait_port(self.port, self.proc, time.monotonic() + 10)
        except RuntimeError:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        _stop(self.proc)


class UpstreamProcess:
    """An upstream in a child process on a free loopback port: `bench/_upstream.py`, or `command`,
    which must print `READY <port> ...` once it listens."""

    def __init__(self, command: list[str] | None = None, start_timeout: float = 20.0) -> None:
        self.command = command or [sys.executable, str(BENCH_DIR / "_upstream.py"), "--port", "0"]
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None
        self.returncode: int | None = None

    @property
    def url(self) -> str:
        return f"http://{LOCALHOST}:{self.port}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def cpu_seconds(self) -> float | None:
        return process_cpu_seconds(self.proc.pid)

    def requests_seen(self) -> dict[str, int]:
        """How many /3/ requests arrived so far, per path and query (`/_bench/requests`). Called
        between load windows only: it blocks."""
        with urllib.request.urlopen(f"{self.url}/_bench/requests", timeout=10) as r:
            return json.load(r)

    def start(self) -> UpstreamProcess:
        self.proc = subprocess.Popen(self.command, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
                                     cwd=REPO_ROOT)
        try:
            ready, _, _ = select.select([self.proc.stdout], [], [], self.start_timeout)
            line = self.proc.stdout.readline().strip() if ready else ""  # EOF if it died
            if not line.startswith("READY "):
                raise RuntimeError(f"upstream did not start (said {line!r}, exit {self.proc.poll()})")
            self.port = int(line.split()[1])
            _wait_port(self.port, self.proc, time.monotonic() + self.start_timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.returncode = _stop(self.proc)
            if self.proc.stdout:
                self.proc.stdout.close()

    def __enter__(self) -> UpstreamProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class _LoggedProcess:
    """A benchmarked server process with a temporary home holding its log: `proc`, `home`,
    `log_path` (subclasses), `stop()` (SIGTERM; returns the exit code), `cleanup()` (deletes the
    home), and a context manager doing `start()` ... `stop()` + `cleanup()`."""

    home: Path | None = None
    proc: subprocess.Popen | None = None
    returncode: int | None = None
    _log = None

    @property
    def log_path(self) -> Path:
        raise NotImplementedError

    def start(self):
        raise NotImplementedError

    @property
    def pid(self) -> int:
        return self.proc.pid

    def cpu_seconds(self) -> float | None:
        return process_cpu_seconds(self.proc.pid)

    def tree_cpu_seconds(self) -> float:
        """CPU time of the process and its children (a proxy's workers), Linux /proc."""
        pid = str(self.proc.pid)
        children = []
        for entry in Path("/proc").iterdir():
            try:
                if entry.name.isdigit() and (entry / "stat").read_text().rsplit(")", 1)[1].split()[1] == pid:
                    children.append(int(entry.name))
            except (OSError, IndexError):
                continue
        return sum(process_cpu_seconds(p) or 0.0 for p in [self.proc.pid, *children])

    def wait_logged(self, text: str, timeout: float = 20.0) -> None:
        """Until the process's log has `text` (something a process does after its ports open)."""
        deadline = time.monotonic() + timeout
        while text not in self.log_path.read_text(errors="replace"):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{text!r} not logged in {timeout:.0f} s:\n{self.log_tail()}")
            time.sleep(0.05)

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except (OSError, TypeError):
            return ""

    def stop(self) -> int | None:
        """SIGTERM (a proxy flushes its usage rows first); returns the exit code."""
        if self.proc is not None and self.returncode is None:
            self.returncode = _stop(self.proc)
        if self._log is not None:
            self._log.close()
            self._log = None
        return self.returncode

    def cleanup(self) -> None:
        if self.home is not None:
            shutil.rmtree(self.home, ignore_errors=True)
            self.home = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        try:
            self.stop()
        finally:
            self.cleanup()


class ProxyProcess(_LoggedProcess):
    """`python -m launcher proxy` with its own temporary home, rules and ports.

    `rules_edit(rules_dict)` may change the repository's rules.yaml before it is written (a later
    benchmark's cache or rate-limit settings); each reverse listener is moved to a free port.
    `overrides` maps upstream names to local URLs (PROJECTIONIST_UPSTREAMS); `env` adds variables
    (server credentials such as PROJECTIONIST_TRAKT_CLIENT_ID). The home directory,
    with its SQLite file and the proxy's log, lives until `cleanup()` (called by `__exit__`)
    so the caller can read the database after `stop()`.
    """

    def __init__(self, overrides: dict[str, str], rules_edit=None, start_timeout: float = 60.0,
                 log_level: str | None = None, env: dict[str, str] | None = None, workers: int | None = 1) -> None:
        self.overrides = overrides
        # --workers (PROJECTIONIST_PROXY_WORKERS): one process unless asked (with proxy.redis_url
        # the default would be one per core); None: the rules' or the default choice.
        self.workers = workers
        self.extra_env = dict(env or {})  # e.g. PROJECTIONIST_TRAKT_CLIENT_ID for the fakes
        self.rules_edit = rules_edit
        self.start_timeout = start_timeout
        self.log_level = log_level
        self.proxy_port: int | None = None
        self.reverse_ports: dict[str, int] = {}

    @property
    def db_path(self) -> Path:
        return self.home / "projectionist.db"

    @property
    def log_path(self) -> Path:
        return self.home / "proxy.log"

    @property
    def proxy_url(self) -> str:
        return f"http://{LOCALHOST}:{self.proxy_port}"

    def reverse_port(self, upstream: str) -> int:
        return self.reverse_ports[upstream]

    def _listening(self) -> int:
        """How many proxy processes have logged that they listen."""
        try:
            return self.log_path.read_text(errors="replace").count('"proxy listening: ')
        except OSError:
            return 0

    def logged_errors(self) -> list[str]:
        """The messages of the error lines in the proxy's log (an addon failing per request shows
        up here long before it shows in a throughput figure)."""
        errors = []
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return []
        for line in lines:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and record.get("level") in ("error", "critical"):
                errors.append(str(record.get("msg", ""))[:200])
        return errors

    def start(self) -> ProxyProcess:
        self.home = Path(tempfile.mkdtemp(prefix="projectionist-bench-"))
        try:
            rules = yaml.safe_load((REPO_ROOT / "rules.yaml").read_text())
            # The benches' clients send TMDB requests without a user's surrogate and measure the
            # server's key (cache, limits, images): lent to them, as before proxy.anonymous.
            rules.setdefault("proxy", {})["anonymous"] = "lend"
            if self.rules_edit is not None:
                self.rules_edit(rules)
            for name, upstream in rules.get("upstreams", {}).items():
                if upstream.get("listen") is not None:
                    upstream["listen"] = self.reverse_ports[name] = free_port()
            rules_path = self.home / "rules.yaml"
            rules_path.write_text(yaml.safe_dump(rules, sort_keys=False))
            self.proxy_port = free_port()
            env = {k: v for k, v in os.environ.items() if not k.startswith("PROJECTIONIST_")}
            env.update(
                PROJECTIONIST_HOME=str(self.home),
                PROJECTIONIST_RULES=str(rules_path),
                PROJECTIONIST_HOST=LOCALHOST,
                PROJECTIONIST_PROXY_PORT=str(self.proxy_port),
                PROJECTIONIST_UPSTREAMS=",".join(f"{k}={v}" for k, v in self.overrides.items()),
            )
            if self.log_level:  # default: the shipped level (INFO logs connections, not requests)
                env["PROJECTIONIST_LOG_LEVEL"] = self.log_level
            if self.workers is not None:
                env["PROJECTIONIST_PROXY_WORKERS"] = str(self.workers)
            self.env = env
            env.update(self.extra_env)
            self._log = open(self.log_path, "wb")
            self.proc = subprocess.Popen([sys.executable, "-m", "launcher", "proxy"], env=env,
                                         cwd=REPO_ROOT, stdin=subprocess.DEVNULL, stdout=self._log,
                                         stderr=subprocess.STDOUT)
            deadline = time.monotonic() + self.start_timeout
            for port in (self.proxy_port, *self.reverse_ports.values()):
                _wait_port(port, self.proc, deadline)
            while self.workers and self.workers > 1 and self._listening() < self.workers:  # all, not the first
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{self.workers} proxy workers did not all start")
                time.sleep(0.05)
        except BaseException as exc:
            tail = self.log_tail()
            self.stop()
            self.cleanup()
            if isinstance(exc, RuntimeError) and tail:
                raise RuntimeError(f"{exc}; proxy log:\n{tail}") from exc
            raise
        return self


class ControlProcess(_LoggedProcess):
    """`python -m launcher control` beside a started ProxyProcess: its home, rules and database
    (with `proxy.redis_url`, the control plane commits the proxies' usage rows). The home stays
    the proxy's to clean up."""

    def __init__(self, proxy: ProxyProcess, start_timeout: float = 60.0) -> None:
        self.proxy = proxy
        self.start_timeout = start_timeout
        self.port: int | None = None

    @property
    def log_path(self) -> Path:
        return self.proxy.home / "control.log"

    def start(self) -> ControlProcess:
        self.port = free_port()
        env = dict(self.proxy.env, PROJECTIONIST_CONTROL_PORT=str(self.port))
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "launcher", "control"], env=env, cwd=REPO_ROOT,
                                     stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT)
        try:
            _wait_port(self.port, self.proc, time.monotonic() + self.start_timeout)
        except BaseException:
            self.stop()
            raise
        return self


class MitmdumpProcess(_LoggedProcess):
    """A stock `mitmdump` (no scripts, default addons) as a reverse proxy in front of `target`.

    The baseline "plain mitmproxy pass-through": `mitmdump --mode reverse:TARGET@PORT -q`, with
    its confdir (CA files) in a temporary directory so nothing is written to ~/.mitmproxy.
    `extra_args` are appended (e.g. ["--set", "connection_strategy=lazy"]).
    """

    def __init__(self, target: str, extra_args: list[str] | None = None, start_timeout: float = 60.0) -> None:
        self.target = target.rstrip("/")
        self.extra_args = list(extra_args or [])
        self.start_timeout = start_timeout
        self.port: int | None = None

    @property
    def url(self) -> str:
        return f"http://{LOCALHOST}:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.home / "mitmdump.log"

    @staticmethod
    def executable() -> str:
        """The mitmdump next to this interpreter (the project's venv), else the one on PATH."""
        local = Path(sys.executable).parent / "mitmdump"
        return str(local) if local.exists() else (shutil.which("mitmdump") or "mitmdump")

    def start(self) -> MitmdumpProcess:
        self.home = Path(tempfile.mkdtemp(prefix="projectionist-bench-mitmdump-"))
        try:
            self.port = free_port()
            self._log = open(self.log_path, "wb")
            cmd = [self.executable(), "--mode", f"reverse:{self.target}@{LOCALHOST}:{self.port}", "-q",
                   "--set", f"confdir={self.home}", *self.extra_args]
            env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
            self.proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=self._log,
                                         stderr=subprocess.STDOUT)
            _wait_port(self.port, self.proc, time.monotonic() + self.start_timeout)
        except BaseException as exc:
            tail = self.log_tail()
            self.stop()
            self.cleanup()
            if isinstance(exc, RuntimeError) and tail:
                raise RuntimeError(f"{exc}; mitmdump log:\n{tail}") from exc
            raise
        return self
