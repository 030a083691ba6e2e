"""`projectionist proxy` with several workers: N proxy processes on the same ports, supervised.

Each worker is a whole proxy (`python -m launcher proxy` with PROJECTIONIST_PROXY_WORKER set) that
binds every listener with SO_REUSEPORT, so the kernel spreads new connections over the workers and
a dead worker takes only its own connections with it. The supervisor (this module, in the
process the user started) starts them, restarts one that dies (after a pause that doubles while it
keeps dying at once), and stops them all on SIGINT/SIGTERM: each drains its requests first.

Workers share what each learns through Redis (the shared tier, the event stream, the Plex
connections and transcode sessions of proxy_addons/peers.py), so more than one needs
`proxy.redis_url`; without it the proxy runs one worker, as before workers existed.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time

from projectionist.config import Config
from projectionist.lifetime import child_preexec
from projectionist.rules import Rules
from projectionist.shared_tier import redis_url

log = logging.getLogger("projectionist")

WORKERS_ENV = "PROJECTIONIST_PROXY_WORKERS"  # --workers, for this process and the ones it starts
WORKER_ENV = "PROJECTIONIST_PROXY_WORKER"  # set in a worker: its index, 0..N-1
AUTO_MAX = 4  # the default with Redis: the machine's cores, at most this
RESTART_DELAY = 0.5  # s: a dead worker's first restart; doubles while it keeps dying ...
RESTART_DELAY_MAX = 30.0  # ... up to this
STEADY_AFTER = 60.0  # s: a worker up this long died of something new: the pause starts over
STOP_TIMEOUT = 20.0  # s: a worker still running this long after SIGTERM is killed


def proxy_command() -> list[str]:
    """How a proxy process is started: with -O, which drops mitmproxy's debug-only checks (a type
    check of every field of every request and response it builds, an event-type check around each
    layer's handler): 30-40% of a cache hit's CPU (bench/cache.py), nothing a request relies on."""
    return [sys.executable, "-O", "-m", "launcher", "proxy"]


class WorkersError(Exception):
    """The configured worker count cannot be used (the message says why)."""


def configured_workers() -> int | None:
    """--workers / PROJECTIONIST_PROXY_WORKERS, or None when unset."""
    value = os.environ.get(WORKERS_ENV, "").strip()
    if not value:
        return None
    if not value.isdigit() or not 1 <= int(value) <= 64:
        raise WorkersError(f"{WORKERS_ENV}={value!r}: a number of workers from 1 to 64")
    return int(value)


def worker_count(rules: Rules) -> int:
    """How many proxy workers to run: --workers, else proxy.workers, else with Redis the cores (at
    most AUTO_MAX), else 1."""
    shared = redis_url(rules.model.proxy.redis_url)
    wanted = configured_workers() or rules.model.proxy.workers
    if wanted is None:
        return min(os.cpu_count() or 1, AUTO_MAX) if shared else 1
    if wanted > 1 and not shared:
        raise WorkersError(f"{wanted} proxy workers need proxy.redis_url (or PROJECTIONIST_REDIS_URL): "
                           "workers share their caches, plays and Plex connections through Redis; "
                           "without it run one worker (proxy.workers: 1)")
    return wanted


def worker_index() -> int | None:
    """This process's index when it is a worker of a supervisor, else None."""
    value = os.environ.get(WORKER_ENV)
    return int(value) if value is not None and value.isdigit() else None


def metrics_port(config: Config, index: int | None) -> int:
    """Worker i's /metrics and /health listener: the configured port + i (0 stays off)."""
    return config.proxy_metrics_port + (index or 0) if config.proxy_metrics_port else 0


class Supervisor:
    """Starts `count` workers and keeps them running until SIGINT/SIGTERM."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.workers: list[subprocess.Popen | None] = [None] * count
        self.started_at = [0.0] * count
        self.delay = [RESTART_DELAY] * count
        self.restart_at: list[float | None] = [None] * count
        self.restarts = 0
        self._stopping = False

    def _start(self, index: int) -> None:
        env = dict(os.environ, **{WORKER_ENV: str(index), WORKERS_ENV: str(self.count)})
        self.workers[index] = subprocess.Popen(proxy_command(), env=env,
                                               preexec_fn=child_preexec(signal.SIGTERM))
        self.started_at[index] = time.monotonic()

    def _stop(self, *_) -> None:
        self._stopping = True

    def run(self) -> int:
        signal.signal(signal.SIGINT, self._stop)
        signal.signal(signal.SIGTERM, self._stop)
        for index in range(self.count):
            self._start(index)
        log.info("proxy: %d workers started", self.count, extra={"fields": {"pids": self.pids()}})
        if (hint := queue_migration_hint()) is not None:
            log.info(hint)
        while not self._stopping:
            self._tend(time.monotonic())
            time.sleep(0.2)
        self._stop_all()
        return 0

    def _tend(self, now: float) -> None:
        for index, worker in enumerate(self.workers):
            if worker is not None and worker.poll() is not None:
                up = now - self.started_at[index]
                if up >= STEADY_AFTER:
                    self.delay[index] = RESTART_DELAY
                pause = self.delay[index]
                self.delay[index] = min(pause * 2, RESTART_DELAY_MAX)
                log.warning("proxy worker %d (pid %d) exited with %s after %.0f s; restarting in %.1f s",
                            index, worker.pid, _exit_text(worker.returncode), up, pause)
                self.workers[index] = None
                self.restart_at[index] = now + pause
            elif worker is None and self.restart_at[index] is not None and now >= self.restart_at[index]:
                self.restart_at[index] = None
                self.restarts += 1
                self._start(index)
                log.info("proxy worker %d restarted (pid %d)", index, self.workers[index].pid)

    def pids(self) -> list[int]:
        return [w.pid for w in self.workers if w is not None]

    def _stop_all(self) -> None:
        running = [w for w in self.workers if w is not None and w.poll() is None]
        for worker in running:
            worker.send_signal(signal.SIGTERM)  # each drains its requests, then exits
        deadline = time.monotonic() + STOP_TIMEOUT
        for worker in running:
            try:
                worker.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("proxy worker (pid %d) did not stop in %.0f s; killed", worker.pid, STOP_TIMEOUT)
                worker.kill()
                worker.wait()


MIGRATE_REQ = "/proc/sys/net/ipv4/tcp_migrate_req"


def queue_migration_hint(path: str = MIGRATE_REQ) -> str | None:
    """Advice when Linux will reset, not hand over, the connections a dying worker had accepted
    into its listening sockets' queues but not yet taken (SO_REUSEPORT keeps one queue per
    socket). The setting is the machine's (its network namespace's): suggested, never changed."""
    try:
        with open(path) as setting:
            if setting.read().strip() != "0":
                return None
    except OSError:  # not Linux, or a kernel older than 5.14: nothing to suggest
        return None
    return ("proxy: when a worker dies, connections still waiting in its accept queue are reset; "
            "`sysctl -w net.ipv4.tcp_migrate_req=1` has the kernel move them to the other workers")


def _exit_text(code: int) -> str:
    if code < 0:
        try:
            return signal.Signals(-code).name
        except ValueError:
            return f"signal {-code}"
    return f"code {code}"
