"""Rate-limit state in Redis: the Lua GCRA, pauses and throttles, and two proxy processes sharing
one budget. Each module run starts its own `redis-server` on a free port and stops it."""

from __future__ import annotations

import asyncio
import random
import shutil
import time

import aiohttp
import pytest
import redis

from projectionist.limits import LimitKey, RedisBackend

from _stack import ProxyProcess, RedisServer
from support import free_port
from test_ratelimit import ORIGIN, UNCACHED, assert_gcra, limit_rules, run_proxy, upstream  # noqa: F401 (a fixture)


@pytest.fixture(scope="module")
def redis_url():
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (.ci/run installs it)")
    with RedisServer() as server:
        yield server.url


@pytest.fixture
async def backends(redis_url):
    redis.Redis.from_url(redis_url).flushdb()
    one, two = RedisBackend(redis_url), RedisBackend(redis_url)
    yield one, two
    await one.close()
    await two.close()


async def test_lua_gcra_is_one_budget_for_every_client_of_redis(backends):
    one, two = backends
    key = [LimitKey("k", 0.5, 3, "lim")]
    decisions = [await (one if i % 2 else two).acquire(key, None, 1.0) for i in range(6)]
    assert [d.allowed for d in decisions] == [True] * 5 + [False]
    waits = [d.wait for d in decisions]
    assert waits[:3] == pytest.approx([0, 0, 0], abs=0.02)
    assert waits[3:] == pytest.approx([0.5, 1.0, 1.5], abs=0.02)
    assert decisions[3].binding == "lim" and decisions[0].binding is None


async def test_lua_pause_and_throttle(backends):
    one, two = backends
    await one.pause("tmdb|default", 2)
    decision = await two.acquire([LimitKey("k2", 0.01, 10, "lim")], "tmdb|default", 5)
    assert decision.allowed and decision.binding == "retry-after"
    assert decision.wait == pytest.approx(2, abs=0.05) and decision.paused_for == pytest.approx(2, abs=0.05)
    assert not (await one.acquire([LimitKey("k2", 0.01, 10, "lim")], "tmdb|default", 1)).allowed
    assert [await b.throttle("t", 10, s) for b, s in [(one, "playing"), (two, "playing"), (one, "paused"),
                                                      (two, "paused")]] == [True, False, True, False]


async def test_rules_yaml_setting_selects_redis_and_a_dead_redis_fails_soft(tmp_path, upstream, redis_url):
    def with_redis(url):
        def edit(rules):
            limit_rules(rate="1/s", burst=2, max_wait=0)(rules)
            rules["proxy"]["redis_url"] = url
        return edit

    async with aiohttp.ClientSession() as session:
        for url, where in [(redis_url, "redis"), (f"redis://127.0.0.1:{free_port()}/0", "memory")]:
            redis.Redis.from_url(redis_url).flushdb()
            home = tmp_path / where
            home.mkdir()
            proxy, client = await run_proxy(home, upstream, session, with_redis(url))
            try:
                statuses = [(await client.tmdb(UNCACHED))[0] for _ in range(3)]
            finally:
                await proxy.stop()
            assert statuses == [200, 200, 429]  # limited either way
            stored = redis.Redis.from_url(redis_url).keys("projectionist:rl:gcra:*")
            assert bool(stored) == (where == "redis")


async def test_two_proxy_processes_share_one_budget(redis_url, upstream):
    rate, burst, duration = 5, 5, 4.0
    procs = [ProxyProcess(overrides={"tmdb": f"http://127.0.0.1:{upstream.port}"},
                          rules_edit=limit_rules(rate=f"{rate}/s", burst=burst, max_wait=1),
                          env={"PROJECTIONIST_REDIS_URL": redis_url}) for _ in range(2)]
    try:
        await asyncio.gather(*(asyncio.to_thread(p.start) for p in procs))
        statuses: dict[int, list[int]] = {0: [], 1: []}
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=100)) as session:
            async def get(i: int) -> int:
                async with session.get(f"http://api.themoviedb.org{UNCACHED}", proxy=procs[i].proxy_url,
                                       headers={"Origin": ORIGIN}) as r:
                    await r.read()
                    return r.status

            # Warm both processes (their Redis connections, the first flow's imports) and then
            # start from an empty budget: otherwise the first process ready takes the whole
            # burst and queue, 11 of the run's 29 slots, and the other may barely take part.
            assert [await get(0), await get(1)] == [200, 200]
            redis.Redis.from_url(redis_url).flushdb()
            upstream.received.clear()

            async def browser(i: int) -> None:
                deadline = time.monotonic() + duration
                while time.monotonic() < deadline:
                    statuses[i].append(await get(i))
                    # Think time after every answer, jittered like independent users: a client
                    # asking again the instant it is served would race the refused ones for
                    # the next slot in lockstep.
                    await asyncio.sleep(random.uniform(0.05, 0.15))

            started = time.monotonic()
            await asyncio.gather(*(browser(i % 2) for i in range(40)))
            wall = time.monotonic() - started
    finally:
        codes = await asyncio.gather(*(asyncio.to_thread(p.stop) for p in procs))
        for p in procs:
            p.cleanup()
    calls = upstream.calls(UNCACHED)
    assert codes == [0, 0]
    assert_gcra(calls, rate=rate, burst=burst)
    assert len(calls) <= burst + rate * wall + 1  # the configured rate, not twice it
    assert len(calls) >= rate * duration * 0.8
    # Both processes forwarded and refused. How the slots split between them is a race per slot
    # (GCRA promises a rate, not fairness between processes), so only taking part is asserted.
    assert set(statuses[0]) == set(statuses[1]) == {200, 429}
    assert statuses[0].count(200) + statuses[1].count(200) == len(calls)
