"""Bodies too big for the shared tier (projectionist/peer_bodies.py), end to end: proxy processes
with homes of their own (two machines) and one real `redis-server`. Each proxy has its operations
listener, a TMDB-shaped upstream on 127.0.0.1 counts what reaches it, and the clients go through
each proxy's explicit listener.

- An answer over `cache.shared_max_body_bytes` is held by the proxy that fetched it. Redis holds
  only its index record, and a second machine's miss is answered with the holder's body: a hit,
  the upstream asked once. The same goes for an image variant.
- The holder's endpoint answers signed requests only, signed for it (shown to another holder, a
  signature is refused). A machine with another vault key is refused and asks the upstream.
- A record whose digest does not match, or whose holder is gone, is a miss: the upstream is asked,
  and nothing hangs.
- A flush removes the index records too.
"""

from __future__ import annotations

import contextlib
import json
import struct
import time

import aiohttp
import pytest
import redis
import requests
from cryptography.fernet import Fernet

from _stack import ProxyProcess, free_port
from projectionist.vault import SecretBox
from test_shared_tier import CountingUpstream, flush_requested, wait_applied

pytestmark = [pytest.mark.e2e]

SHARED_MAX = 5_000
BIG = json.dumps({"id": 603, "title": "The Matrix", "credits": [{"name": f"person {i}", "character": "x" * 40}
                                                                for i in range(3000)]}).encode()
TIER = "projectionist-cache"


@contextlib.contextmanager
def machine(upstream: str, redis_url: str, vault_key: str):
    """One machine's proxy: its own home, the shared Redis and vault key, its ops listener."""
    def edit(rules: dict) -> None:
        rules["proxy"]["redis_url"] = redis_url
        rules["cache"]["shared_max_body_bytes"] = SHARED_MAX
    ops_port = free_port()
    proxy = ProxyProcess({"tmdb": upstream, "tmdb-images": upstream}, edit,
                         env={"PROJECTIONIST_PROXY_METRICS_PORT": str(ops_port), "PROJECTIONIST_SECRET_KEY": vault_key})
    proxy.ops_port = ops_port
    proxy.start()
    try:
        deadline = time.monotonic() + 20  # the ops listener (the holder's address) binds after the proxy
        while "metrics and health at" not in proxy.log_path.read_text(errors="replace"):
            assert time.monotonic() < deadline, proxy.log_tail()
            time.sleep(0.05)
        yield proxy
    finally:
        proxy.stop()
        proxy.cleanup()


async def get(session: aiohttp.ClientSession, proxy: ProxyProcess, path: str) -> tuple[int, str, bytes]:
    async with session.get(f"http://api.themoviedb.org{path}", params={"api_key": "x"}, proxy=proxy.proxy_url,
                           timeout=aiohttp.ClientTimeout(total=30)) as r:
        return r.status, r.headers.get("Cache-Status", ""), await r.read()


def records(r: redis.Redis, kind: str, route: str = "tmdb.details") -> dict[bytes, bytes]:
    return {name: r.get(name) for name in r.keys(f"projectionist:cache:{kind}:{route}|*")}


def wait_for_record(r: redis.Redis, kind: str = "i", route: str = "tmdb.details", count: int = 1,
                    prefix: str = "projectionist:cache:") -> dict[bytes, bytes]:
    deadline = time.monotonic() + 10
    while len(found := {n: r.get(n) for n in r.keys(f"{prefix}{kind}:{route}|*")}) < count:
        assert time.monotonic() < deadline, f"no {kind}: record for {route}"
        time.sleep(0.05)
    return found


async def test_a_body_too_big_for_redis_is_served_to_another_machine_by_its_holder(redis_server):
    r = redis.Redis.from_url(redis_server.url)
    r.flushdb()
    key = Fernet.generate_key().decode()
    async with CountingUpstream(BIG) as upstream, aiohttp.ClientSession() as session:
        with machine(upstream.url, redis_server.url, key) as a, machine(upstream.url, redis_server.url, key) as b:
            status, cache_status, body = await get(session, a, "/3/movie/603")
            assert (status, body) == (200, BIG) and "stored" in cache_status, cache_status
            index = wait_for_record(r, "i")
            assert not records(r, "e")  # the body is not in Redis ...
            (name, record), = index.items()
            assert len(record) < 2_000 and BIG[:200] not in record  # ... only where it is and what it is
            assert f"127.0.0.1:{a.ops_port}".encode() in record

            for _ in range(2):  # B asks A for the body the first time, then has it itself
                status, cache_status, body = await get(session, b, "/3/movie/603")
                assert (status, body) == (200, BIG) and "; hit;" in cache_status, (cache_status, b.log_tail())
            assert upstream.paths == ["/3/movie/603"]

            # The holder's endpoint: signed requests only.
            entry_key = name.decode().rsplit("|", 1)[1]
            url = f"http://127.0.0.1:{a.ops_port}/peer/v1/{TIER}/{entry_key}"
            assert requests.get(url, timeout=5).status_code == 403
            assert requests.get(url, params={"expires": int(time.time()) + 30, "sig": "0" * 64}, timeout=5).status_code == 403
            assert BIG not in requests.get(url, timeout=5).content
            # Signed as B signs for holder A (the vault key): A answers; the same signature shown
            # to B is refused, since it names A.
            path = f"/peer/v1/{TIER}/{entry_key}"
            expires = int(time.time()) + 30
            signature = SecretBox([key.encode()]).lookup_hash(f"peer-body\nhttp://127.0.0.1:{a.ops_port}{path}\n{expires}")
            signed = {"expires": expires, "sig": signature}
            assert requests.get(url, params=signed, timeout=5).content == BIG
            assert requests.get(f"http://127.0.0.1:{b.ops_port}{path}", params=signed, timeout=5).status_code == 403

            # A record whose digest is not the body's: the body is refused, the upstream asked.
            status, _, _ = await get(session, a, "/3/movie/604")
            (name604, record604), = {n: v for n, v in wait_for_record(r, "i", count=2).items() if n != name}.items()
            (length,) = struct.unpack_from("!I", record604)
            ref = json.loads(record604[4:4 + length])
            ref["sha256"] = "0" * 64
            forged = json.dumps(ref).encode()
            r.set(name604, struct.pack("!I", len(forged)) + forged + record604[4 + length:], keepttl=True)
            r.delete(*r.keys("projectionist:cache:o:*"))  # else B takes A's outcome of a moment ago
            status, cache_status, body = await get(session, b, "/3/movie/604")
            assert (status, body) == (200, BIG) and "fwd=uri-miss" in cache_status, cache_status
            assert upstream.paths == ["/3/movie/603", "/3/movie/604", "/3/movie/604"]

            # An image variant over the limit: indexed likewise, served through B from A's encode.
            path = "/t/p/original/pB8BM7pdSp6B6Ih7QZ4DrQ3PmJK.jpg"
            accept = {"Accept": "image/webp,image/*,*/*;q=0.8"}
            answers = []
            for proxy in (a, b):
                async with session.get(f"http://image.tmdb.org{path}", proxy=proxy.proxy_url, headers=accept,
                                       timeout=aiohttp.ClientTimeout(total=30)) as resp:
                    answers.append((resp.status, resp.headers.get("Cache-Status", ""), await resp.read()))
            assert answers[0][0] == answers[1][0] == 200 and answers[0][2] == answers[1][2], answers[1][:2]
            assert len(answers[0][2]) > SHARED_MAX and "; hit" in answers[1][1], answers[1][1]
            assert upstream.paths.count(path) == 1
            assert wait_for_record(r, "i", "*", prefix="projectionist:images:")

            # A flush removes index records as it removes entries.
            wait_applied(b, flush_requested(b, "route", "tmdb.details"))
            deadline = time.monotonic() + 5
            while records(r, "i"):
                assert time.monotonic() < deadline, records(r, "i")
                time.sleep(0.05)
            assert not a.logged_errors() and not b.logged_errors()


async def test_a_machine_with_another_vault_key_or_a_gone_holder_asks_the_upstream(redis_server):
    r = redis.Redis.from_url(redis_server.url)
    r.flushdb()
    key = Fernet.generate_key().decode()
    async with CountingUpstream(BIG) as upstream, aiohttp.ClientSession() as session:
        with machine(upstream.url, redis_server.url, key) as a, \
                machine(upstream.url, redis_server.url, Fernet.generate_key().decode()) as stranger:
            await get(session, a, "/3/movie/603")
            wait_for_record(r, "i")
            r.delete(*r.keys("projectionist:cache:o:*"))  # A's outcome of a moment ago: not what this tests
            status, cache_status, body = await get(session, stranger, "/3/movie/603")
            assert (status, body) == (200, BIG) and "fwd=uri-miss" in cache_status, cache_status
            assert upstream.paths == ["/3/movie/603"] * 2
            assert "answered 403" in stranger.log_path.read_text(errors="replace")

            with machine(upstream.url, redis_server.url, key) as b:
                await get(session, a, "/3/movie/605")
                wait_for_record(r, "i", count=2)
                a.stop()  # the holder is gone; its record is still there
                r.delete(*r.keys("projectionist:cache:o:*"))
                started = time.monotonic()
                status, cache_status, body = await get(session, b, "/3/movie/605")
                assert (status, body) == (200, BIG) and "fwd=uri-miss" in cache_status, cache_status
                assert time.monotonic() - started < 5
                assert upstream.paths.count("/3/movie/605") == 2
                assert not b.logged_errors()
