"""Helpers for the end-to-end tests: the real stack as the user runs it, fakes, real clients.

`Stack` is `projectionist run` in a subprocess (proxy, control plane, Datasette), on free ports,
with the shipped rules.yaml (only the reverse listener's port changed) and every upstream sent to
the fake upstreams, which run in a thread of the test process so tests can read what they received.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import yaml
from aiohttp import web
from requests.adapters import HTTPAdapter

from fake_upstreams.data import TRAKT_CLIENT_ID, TRAKT_CLIENT_SECRET

REPO = Path(__file__).resolve().parent.parent
FAKE_TO_RULES = {"plex": "plex", "plextv": "plextv", "tmdb": "tmdb",
                 "tmdb_images": "tmdb-images", "trakt": "trakt"}


async def timed_get(client: aiohttp.ClientSession, url: str, **kw) -> tuple[int, bytes, dict, float]:
    """GET `url`: (status, body, headers, seconds until the whole body came)."""
    started = time.monotonic()
    async with client.get(url, **kw) as r:
        return r.status, await r.read(), dict(r.headers), time.monotonic() - started


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate: Callable[[], object], timeout: float = 10.0, interval: float = 0.05,
             what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


class FakesThread:
    """Runs `fake_upstreams.FakeUpstreams` on an event loop of its own thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="fakes", daemon=True)
        self.fakes = None

    def __enter__(self):
        from fake_upstreams import FakeUpstreams

        self.thread.start()
        self.fakes = FakeUpstreams()
        asyncio.run_coroutine_threadsafe(self.fakes.__aenter__(), self.loop).result(30)
        return self.fakes

    def __exit__(self, *exc) -> None:
        asyncio.run_coroutine_threadsafe(self.fakes.__aexit__(None, None, None), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def load_bench(name: str):
    """A bench/ script as a module (e.g. "dashboard": its data generator and Datasette runner)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_bench(script: str, *args: str, timeout: float, check: bool = True) -> dict:
    """`python bench/<script> *args --json`: its report. With `check`, the benchmark must exit 0."""
    proc = subprocess.run([sys.executable, str(REPO / "bench" / script), *args, "--json"],
                          cwd=REPO, capture_output=True, text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout[-5000:]}\nstderr:\n{proc.stderr[-5000:]}"
    return json.loads(proc.stdout)


def write_test_rules(path: Path, plex_listen: int, edit: Callable[[dict], None] | None = None) -> Path:
    """The shipped rules.yaml with only the reverse listener's port changed (and `edit` applied).
    No Plex warming after sign-ins (tests count the Plex requests a sign-in is followed by;
    tests/test_cache_warm.py turns it back on). `proxy.anonymous: lend`: tests about caching, limits
    or images send TMDB requests without a user's surrogate; tests/test_e2e_anonymous.py and the
    first-hour browser tests hold the shipped default (`forward`)."""
    rules = yaml.safe_load((REPO / "rules.yaml").read_text())
    rules["upstreams"]["plex"]["listen"] = plex_listen
    rules.setdefault("warming", {})["plex_paths"] = []
    rules.setdefault("proxy", {})["anonymous"] = "lend"
    if edit:
        edit(rules)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(rules, sort_keys=False))
    os.replace(tmp, path)
    return path


class LocalUpstream:
    """An aiohttp upstream on 127.0.0.1 for the in-process proxy tests: every request goes to
    `handle` (subclasses override it). The port is fixed at creation, so a test can stop the
    upstream (dead upstream) and start it again at the same address."""

    def __init__(self) -> None:
        self.port = free_port()
        self.runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def handle(self, request: web.Request) -> web.StreamResponse:
        raise NotImplementedError

    async def start(self) -> LocalUpstream:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()
        return self

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    async def __aenter__(self) -> LocalUpstream:
        return await self.start()

    async def __aexit__(self, *exc) -> None:
        await self.stop()


async def start_embedded_proxy(home: Path, overrides: Sequence[str], edit: Callable[[dict], None] | None = None,
                               plex_listen: int | None = None):
    """An EmbeddedProxy in this event loop with the shipped rules (`edit` applied, unless `home`
    already has a rules.yaml) and `overrides` ("name=url") sending upstreams to local ones."""
    from projectionist.config import Config
    from proxy_addons.runner import EmbeddedProxy

    rules = home / "rules.yaml"
    choose_port = not rules.exists() and plex_listen is None
    if not rules.exists():
        write_test_rules(rules, plex_listen or free_port(), edit)
    config = Config(home=home, rules_path=rules, datasette_metadata=home / "unused.yml", proxy_port=0,
                    upstream_overrides=tuple(overrides))
    for attempt in range(3):
        try:
            return await EmbeddedProxy(config).start()
        except OSError as e:
            # free_port's port can be taken by another process before the proxy binds it; a port
            # chosen here is chosen again (a caller's own port is the caller's to retry).
            if e.errno != errno.EADDRINUSE or not choose_port or attempt == 2:
                raise
            write_test_rules(rules, free_port(), edit)


class HangingUpstream(LocalUpstream):
    """A LocalUpstream whose handlers can hang on command (`delay` before the headers, `hang()`
    anywhere); `released` set at teardown ends every hung handler, so the server stops at once."""

    def __init__(self) -> None:
        super().__init__()
        self.delay = 0.0  # before the headers
        self.released = asyncio.Event()

    async def hang(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self.released.wait(), seconds)
        except TimeoutError:
            pass


class UnknownTokenPlexTv(LocalUpstream):
    """plex.tv knowing no token (the proxy asks plex.tv whose a newly seen token is)."""

    async def handle(self, request: web.Request) -> web.StreamResponse:
        return web.json_response({"errors": [{"code": 1001, "message": "User could not be authenticated",
                                              "status": 401}]}, status=401)


@dataclass
class Stack:
    home: Path
    rules_path: Path
    proxy_port: int
    plex_port: int
    control_port: int
    dashboard_port: int
    fakes: object
    process: subprocess.Popen | None = None
    log_path: Path | None = None
    env: dict[str, str] = field(default_factory=dict)
    extra_env: dict[str, str] = field(default_factory=dict)  # e.g. PROJECTIONIST_PROXY_METRICS_PORT

    @property
    def db_path(self) -> Path:
        return self.home / "projectionist.db"

    @property
    def ca_path(self) -> Path:
        return self.home / "mitmproxy" / "mitmproxy-ca-cert.pem"

    @property
    def proxy_url(self) -> str:
        return f"http://127.0.0.1:{self.proxy_port}"

    @property
    def plex_url(self) -> str:
        """What a user types as the player's Plex URL: the reverse listener."""
        return f"http://127.0.0.1:{self.plex_port}"

    @property
    def control_url(self) -> str:
        return f"http://127.0.0.1:{self.control_port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def client_env(self, **extra: str) -> dict[str, str]:
        """Environment for a real client that reaches the hard-coded hosts through the proxy."""
        env = {k: v for k, v in os.environ.items() if not k.upper().endswith("_PROXY")}
        env.update(HTTPS_PROXY=self.proxy_url, HTTP_PROXY=self.proxy_url,
                   REQUESTS_CA_BUNDLE=str(self.ca_path), NO_PROXY="127.0.0.1,localhost")
        env.update(extra)
        return env

    def run_client(self, code: str, **env: str) -> object:
        """Run `code` in a fresh interpreter configured only by environment; return its JSON print."""
        result = subprocess.run([sys.executable, "-c", code], env=self.client_env(**env),
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, f"client failed:\n{result.stderr[-3000:]}"
        return json.loads(result.stdout.strip().splitlines()[-1])

    def usage(self, where: str = "1", params: tuple = ()) -> list[dict]:
        conn = sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True, timeout=10)
        conn.row_factory = sqlite3.Row
        try:
            return [dict(r) for r in conn.execute(f"SELECT * FROM usage_events WHERE {where} ORDER BY id", params)]
        finally:
            conn.close()

    def wait_usage(self, where: str, params: tuple = (), count: int = 1, timeout: float = 5.0) -> list[dict]:
        return wait_for(lambda: (rows := self.usage(where, params)) and len(rows) >= count and rows,
                        timeout, what=f"{count} usage row(s) where {where} {params}")

    def flush_cache(self, target: str = "all", value: str | None = None, timeout: float = 10.0) -> int:
        """Ask the proxy to flush its response cache, as the control plane does; wait until done."""
        conn = sqlite3.connect(self.db_path, timeout=10)
        try:
            with conn:
                request_id = conn.execute(
                    "INSERT INTO cache_flush_requests (target, value, requested_at) VALUES (?, ?, datetime('now'))",
                    (target, value)).lastrowid
            applied = wait_for(lambda: conn.execute(
                "SELECT flushed FROM cache_flush_requests WHERE id = ? AND applied_at IS NOT NULL",
                (request_id,)).fetchone(), timeout, what="the proxy to apply a cache flush")
            return applied[0]
        finally:
            conn.close()

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")[-20000:] if self.log_path else ""

    # --- lifecycle ----------------------------------------------------------------------------

    def start(self, timeout: float = 90.0) -> Stack:
        from launcher.cli import DEMO_ALSO_SERVES  # app.plex.tv and trakt.tv/activate, as the demo

        overrides = ",".join([f"{FAKE_TO_RULES[name]}={url}" for name, url in self.fakes.urls.items()
                              if name in FAKE_TO_RULES]
                             + [f"{up}={self.fakes.urls[fake]}" for up, fake in DEMO_ALSO_SERVES.items()])
        self.env = {k: v for k, v in os.environ.items() if not k.upper().endswith("_PROXY")}
        self.env.update(
            PROJECTIONIST_HOME=str(self.home),
            PROJECTIONIST_RULES=str(self.rules_path),
            PROJECTIONIST_PROXY_PORT=str(self.proxy_port),
            PROJECTIONIST_CONTROL_PORT=str(self.control_port),
            PROJECTIONIST_DASHBOARD_PORT=str(self.dashboard_port),
            PROJECTIONIST_UPSTREAMS=overrides,
            # The server's own Trakt app credentials (the frontend's hard-coded ones are replaced).
            PROJECTIONIST_TRAKT_CLIENT_ID=TRAKT_CLIENT_ID,
            PROJECTIONIST_TRAKT_CLIENT_SECRET=TRAKT_CLIENT_SECRET,
        )
        self.env.update(self.extra_env)
        self.log_path = self.home / "stack.log"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "launcher", "run"], env=self.env, cwd=REPO,
            stdout=subprocess.PIPE, stderr=self.log_path.open("w"), text=True,
            start_new_session=True,
        )
        banner: list[str] = []

        def read_banner() -> None:
            for line in self.process.stdout:
                banner.append(line)
                if line.startswith("Ctrl-C"):
                    return

        reader = threading.Thread(target=read_banner, daemon=True)
        reader.start()
        reader.join(timeout)
        if not any(line.startswith("Projectionist is running") for line in banner):
            self.stop()
            raise RuntimeError(f"the stack did not start.\nstdout: {''.join(banner)}\nlogs:\n{self.logs()}")
        return self

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM, as an operator's Ctrl-C would; returns the exit code."""
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else None
        self.process.send_signal(signal.SIGINT)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(5)
            raise AssertionError(f"the stack did not stop within {timeout}s:\n{self.logs()}")


def make_stack(home: Path, fakes, edit: Callable[[dict], None] | None = None) -> Stack:
    home.mkdir(parents=True, exist_ok=True)
    plex_port = free_port()
    rules = write_test_rules(home / "rules.yaml", plex_port, edit)
    return Stack(home=home, rules_path=rules, proxy_port=free_port(), plex_port=plex_port,
                 control_port=free_port(), dashboard_port=free_port(), fakes=fakes)


class SourceAddressAdapter(HTTPAdapter):
    """requests from a chosen loopback address (127.0.0.0/8 is all this machine): one per client."""

    def __init__(self, address: str) -> None:
        self.address = address
        super().__init__()

    def init_poolmanager(self, *args, **kwargs):
        kwargs["source_address"] = (self.address, 0)
        return super().init_poolmanager(*args, **kwargs)


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# As a user's browser runs here: headless, and without the background traffic this closed network refuses.
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync")


async def start_chromium(profile: Path, log: Path, *flags: str,
                         env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    """Headless Chromium on a fresh profile with `flags`; returns the process and the DevTools
    WebSocket URL of its page."""
    assert CHROMIUM, "Chromium is missing: apt-get install chromium (.ci/run does)"
    browser = subprocess.Popen([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *flags,
                                "--remote-debugging-port=0", "about:blank"],
                               stdout=subprocess.DEVNULL, stderr=log.open("w"), env=env)
    port_file = profile / "DevToolsActivePort"
    deadline = time.monotonic() + 30
    while not (port_file.exists() and port_file.read_text().strip()):
        if time.monotonic() > deadline or browser.poll() is not None:
            browser.kill()
            raise AssertionError(f"Chromium did not start:\n{log.read_text()[-2000:]}")
        await asyncio.sleep(0.1)
    port = port_file.read_text().split()[0]
    async with aiohttp.ClientSession(trust_env=False) as session:
        async with session.get(f"http://127.0.0.1:{port}/json/list") as response:
            targets = await response.json()
    return browser, next(t for t in targets if t["type"] == "page")["webSocketDebuggerUrl"]
