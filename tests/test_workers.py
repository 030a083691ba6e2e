"""Proxy workers (launcher/workers.py), end to end: `projectionist run` with `proxy.workers: 2` and
a real `redis-server`, the fakes behind it, clients that open a new connection for every request
(so the kernel spreads them over both workers, as it does a browser's many connections).

- both workers serve the same ports (each one's /metrics counts requests);
- a player signs in, lists its servers and browses the second server at its `*.plex.direct`
  connection through the explicit proxy: whichever worker saw the resources answer, every worker
  lets those requests through with that server's token (the connections are shared in Redis);
- one play reported over many connections is one play (the events reach one writer: the control
  plane's consumer), and the usage rows equal the responses;
- `kill -9` of one worker: the other answers every request meanwhile, the supervisor restarts it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import sys
import threading
import time
import uuid
from contextlib import closing
from urllib.parse import urlsplit

import pytest
import redis
import requests

from fake_upstreams.data import PLEX_ACCOUNT_TOKEN, PLEX_SERVER_TOKEN, SECOND_PMS_MACHINE_ID, SECOND_PMS_TOKEN
from support import free_port, make_stack, wait_for
from test_e2e_plex_servers import Player, titles, token_of, tokens_seen

pytestmark = [pytest.mark.e2e]

WORKERS = 2


def _two_free_ports() -> int:
    """A port p with p + 1 free too: worker i's metrics listen at p + i."""
    for _ in range(50):
        port = free_port()
        try:
            with closing(socket.create_server(("127.0.0.1", port + 1))):
                return port
        except OSError:
            continue
    raise RuntimeError("no two consecutive free ports")


@pytest.fixture(scope="module")
def workers_stack(fakes, redis_server, tmp_path_factory):
    def edit(rules: dict) -> None:
        rules["proxy"]["redis_url"] = redis_server.url
        rules["proxy"]["workers"] = WORKERS

    stack = make_stack(tmp_path_factory.mktemp("workers"), fakes, edit)
    stack.metrics_port = _two_free_ports()
    stack.extra_env = {"PROJECTIONIST_PROXY_METRICS_PORT": str(stack.metrics_port)}
    stack.start()
    try:
        wait_for(lambda: all(_ready(stack, i) for i in range(WORKERS)), timeout=60, what="every worker ready")
        yield stack
    finally:
        code = stack.stop()
        assert code == 0, f"`projectionist run` exited with {code}:\n{stack.logs()}"


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = open(f"/proc/{entry}/stat").read()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry))
    return out


def _cmdline(pid: int) -> str:
    try:
        return open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _ready(stack, index: int) -> bool:
    try:
        return requests.get(f"http://127.0.0.1:{stack.metrics_port + index}/health", timeout=2).status_code == 200
    except requests.RequestException:
        return False


def worker_pids(stack) -> list[int]:
    supervisor = next(p for p in _children(stack.process.pid) if "launcher proxy" in _cmdline(p))
    return sorted(p for p in _children(supervisor) if "launcher proxy" in _cmdline(p))


def reaped_at(pid: int, timeout: float = 10.0) -> float:
    """time.monotonic() once the supervisor has reaped `pid`: every thread gone, every file (the
    listening sockets among them) closed. (A zombie group leader is not enough: its other threads
    may still hold the files.)"""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and os.path.exists(f"/proc/{pid}"):
        time.sleep(0.001)
    return time.monotonic()


def fresh(url: str, **kw) -> requests.Response:
    """One request on a connection of its own."""
    with requests.Session() as session:
        session.trust_env = False
        return session.get(url, headers={"Connection": "close", **kw.pop("headers", {})}, timeout=15, **kw)


def answered(stack, index: int) -> float:
    """Requests worker `index` answered, from its own /metrics."""
    text = requests.get(f"http://127.0.0.1:{stack.metrics_port + index}/metrics", timeout=5).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("projectionist_requests_total{"))


def test_both_workers_serve_the_same_ports(workers_stack):
    stack = workers_stack
    assert len(worker_pids(stack)) == WORKERS
    params = {"X-Plex-Token": PLEX_SERVER_TOKEN}
    for _ in range(24):
        assert fresh(f"{stack.plex_url}/library/sections", params=params,
                     headers={"Accept": "application/json"}).status_code == 200
    counts = [answered(stack, i) for i in range(WORKERS)]
    assert all(c > 0 for c in counts), counts
    assert sum(counts) >= 24


def test_every_worker_signs_with_the_one_ca_on_disk(workers_stack):
    """The workers start together on a home without a CA: the supervisor creates it before them,
    else each would create its own and the certificates of all but one would fail to verify."""
    stack = workers_stack
    before = [answered(stack, i) for i in range(WORKERS)]
    for _ in range(24):  # a new tunnel each: both workers sign certificates
        with requests.Session() as session:
            session.trust_env = False
            session.proxies = {"https": stack.proxy_url}
            r = session.get("https://plex.tv/api/v2/user", headers={"X-Plex-Token": "not-a-token"},
                            verify=str(stack.ca_path), timeout=15)
            assert r.status_code in (200, 401), r.status_code
    after = [answered(stack, i) for i in range(WORKERS)]
    assert all(a > b for a, b in zip(after, before)), (before, after)


def test_the_second_servers_connections_are_known_to_every_worker(workers_stack, fakes):
    stack = workers_stack
    fakes.plextv.list_second_server = True
    try:
        fakes.clear()
        player = FreshPlayer(stack)
        account = player.login(PLEX_ACCOUNT_TOKEN)
        second = player.servers(account)[SECOND_PMS_MACHINE_ID]
        local_b = next(c["uri"] for c in second["connections"] if c["local"])
        assert urlsplit(local_b).port == urlsplit(fakes.second_plex_url).port
        player.through_proxy(local_b)
        for _ in range(8):
            assert titles(player.get(f"{local_b}/library/sections", second["accessToken"])) == [
                "Documentaries", "Soundtracks"]
        assert tokens_seen(fakes.second_plex) == {SECOND_PMS_TOKEN}
        assert "refused a misdirected request" not in stack.logs()
    finally:
        fakes.plextv.list_second_server = False


class FreshPlayer(Player):
    """A player whose every request opens a new connection (a new tunnel): both workers see it."""

    def request(self, method: str, url: str, **kw) -> requests.Response:
        pooled = self.session
        with requests.Session() as self.session:
            self.session.trust_env = False
            self.session.proxies, self.session.verify = dict(pooled.proxies), pooled.verify
            try:
                return super().request(method, url, **kw)
            finally:
                pooled.proxies = self.session.proxies
                self.session = pooled


def _db(stack):
    return closing(sqlite3.connect(f"file:{stack.db_path}?mode=ro", uri=True, timeout=10))


def test_one_play_over_many_connections_is_one_play_and_every_response_is_a_row(workers_stack):
    stack = workers_stack
    started = time.time()
    params = {"X-Plex-Token": PLEX_SERVER_TOKEN, "X-Plex-Client-Identifier": "workers-player",
              "X-Plex-Product": "Workers Player", "ratingKey": "1001", "key": "/library/metadata/1001",
              "duration": "8160000"}
    states = ["playing"] * 6 + ["paused"] * 2 + ["stopped"]
    for i, state in enumerate(states):
        r = fresh(f"{stack.plex_url}/:/timeline", params={**params, "state": state, "time": str(i * 10_000)})
        assert r.status_code == 200, r.text
        time.sleep(0.05)

    def plays():
        with _db(stack) as conn:
            return conn.execute("SELECT state, stopped_at IS NOT NULL, position_ms FROM plays "
                                "WHERE player = 'Workers Player'").fetchall()
    wait_for(lambda: any(row[1] for row in plays()), timeout=15, what="the play stopped")
    assert plays() == [("stopped", 1, 80_000)], plays()

    def rows():
        with _db(stack) as conn:
            return conn.execute("SELECT count(*) FROM usage_events WHERE route LIKE 'plex.timeline%' AND ts >= ?",
                                (started,)).fetchone()[0]
    wait_for(lambda: rows() == len(states), timeout=15, what=f"{len(states)} usage rows")
    # ... through the event stream: each worker's writers saw the control plane's consumer.
    streaming = {json.loads(line)["service"] for line in stack.log_path.read_text().splitlines()
                 if "a control plane consumes the event stream: events go to it" in line}
    assert streaming == {f"proxy-{i}" for i in range(WORKERS)}, streaming


def test_kill_9_of_one_worker_loses_no_request_of_the_other_and_it_comes_back(workers_stack):
    stack = workers_stack
    before = worker_pids(stack)
    results: list[int | str] = []
    failed_at: list[tuple] = []
    killed = [float("inf")]
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            sent = time.monotonic()
            try:
                results.append(fresh(f"{stack.plex_url}/identity").status_code)
            except requests.RequestException as exc:
                results.append(type(exc).__name__)
                failed_at.append((round(sent - killed[0], 3), round(time.monotonic() - killed[0], 3), repr(exc)[:200]))

    thread = threading.Thread(target=load)
    thread.start()
    try:
        time.sleep(1.0)
        killed[0] = time.monotonic()
        os.kill(before[0], signal.SIGKILL)
        closed = reaped_at(before[0])
        killed_at = len(results)
        back = wait_for(lambda: len(pids := worker_pids(stack)) == WORKERS and pids != before and pids,
                        timeout=15, what="the killed worker restarted")
        wait_for(lambda: all(_ready(stack, i) for i in range(WORKERS)), timeout=60, what="the new worker ready")
        time.sleep(1.0)
    finally:
        stop.set()
        thread.join(20)
    # What the killed worker had taken may fail: the request in hand, and new connections the
    # kernel had queued on its sockets until they closed (SO_REUSEPORT: a queue per socket; reset
    # unless net.ipv4.tcp_migrate_req=1). Every request sent once they closed is answered.
    gone = closed - killed[0]
    late = [f for f in failed_at if f[0] > gone]
    explanation = (f"killed worker reaped (its sockets closed) {gone:.3f} s after the kill; failures (sent, failed, what) "
                   f"s after it: {failed_at}; {len(results)} requests, {killed_at} before the kill; supervisor: "
                   f"{[line for line in stack.logs().splitlines() if 'listening' in line or 'worker' in line]}")
    if late or len(failed_at) > 3:
        print(explanation, file=sys.stderr)  # whole, where the assertion message would be cut
    assert not late, "a request sent after the killed worker's sockets closed failed (see stderr)"
    assert len(failed_at) <= 3, "more than the killed worker's own requests failed (see stderr)"
    assert len(results) > 20
    assert before[1] in back and before[0] not in back
    assert "proxy worker 0" in stack.logs() or "proxy worker 1" in stack.logs()
    assert "exited with SIGKILL" in stack.logs()


def test_segments_of_a_transcode_started_through_one_worker_play_through_any(workers_stack, fakes, redis_server):
    """Segments carry no token: the worker that saw the session start shares the token (encrypted)
    with the others, so every segment, whichever worker it reaches, gets it; Redis holds no token
    in clear."""
    stack = workers_stack
    player = FreshPlayer(stack)
    account = player.login(PLEX_ACCOUNT_TOKEN)
    server_token = player.server(account)["accessToken"]
    fakes.clear()
    sid = str(uuid.uuid4())
    qs = f"path=%2Flibrary%2Fmetadata%2F1001&session={sid}&protocol=dash&X-Plex-Token={server_token}"
    assert fresh(f"{stack.plex_url}/video/:/transcode/universal/decision?{qs}").status_code == 200
    for _ in range(8):
        segment = fresh(f"{stack.plex_url}/video/:/transcode/universal/session/{sid}/0/header")
        assert segment.status_code == 200 and segment.content
    # (A worker that has not met the configured server yet asks its /identity first, tokenless as Plex allows.)
    assert {token_of(r) for r in fakes.plex.requests if r.path.startswith("/video/")} == {PLEX_SERVER_TOKEN}
    assert len([r for r in fakes.plex.requests if r.path.startswith("/video/")]) == 9
    client = redis.Redis.from_url(redis_server.url)
    stored = b"".join(client.get(k) or b"" for k in client.scan_iter(match="projectionist:peers:*transcode:*"))
    assert stored and PLEX_SERVER_TOKEN.encode() not in stored


def test_the_supervisor_suggests_migrating_a_dead_workers_queue_only_when_linux_resets_it(tmp_path):
    from launcher.workers import queue_migration_hint

    setting = tmp_path / "tcp_migrate_req"
    setting.write_text("0\n")
    assert "sysctl -w net.ipv4.tcp_migrate_req=1" in queue_migration_hint(str(setting))
    setting.write_text("1\n")
    assert queue_migration_hint(str(setting)) is None
    assert queue_migration_hint(str(tmp_path / "absent")) is None  # not Linux, or older than 5.14
