"""Inline hook completion (proxy_addons/dispatch.py) through a real mitmproxy listener.

A bare Master with mitmproxy's proxy addons, our dispatch, one test addon and a local aiohttp
upstream: hooks that return at once must complete inline, hooks that wait, fail or intercept must
behave as under mitmproxy's own task-per-hook dispatch.
"""

from __future__ import annotations

import asyncio
import inspect
import logging

import aiohttp
import pytest
from aiohttp import web
from mitmproxy import http, options
from mitmproxy.master import Master

from proxy_addons import dispatch
from proxy_addons.runner import mitmproxy_addons

from support import LocalUpstream


class Recorder:
    """Records hook order; `answer` answers in requestheaders; `slow`, `fail`, `hold` alter `request`."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.mode = "pass"
        self.held: http.HTTPFlow | None = None

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        self.calls.append("requestheaders")
        if self.mode == "answer":
            flow.response = http.Response.make(200, b"from the addon")

    async def request(self, flow: http.HTTPFlow) -> None:
        self.calls.append("request")
        if self.mode == "slow":
            await asyncio.sleep(0.05)
            flow.request.headers["x-added-after-wait"] = "yes"
        elif self.mode == "fail":
            raise RuntimeError("addon bug")
        elif self.mode == "hold":
            flow.intercept()
            self.held = flow

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        self.calls.append("responseheaders")

    def response(self, flow: http.HTTPFlow) -> None:
        self.calls.append("response")


class EchoUpstream(LocalUpstream):
    async def handle(self, request: web.Request) -> web.Response:
        return web.Response(text=f"upstream saw x-added-after-wait={request.headers.get('x-added-after-wait')}")


@pytest.fixture
async def upstream():
    async with EchoUpstream() as up:
        yield up.url


@pytest.fixture
async def proxy(tmp_path, upstream, monkeypatch):
    """(base url, recorder, outcomes of _run_hook: True = completed inline)."""
    outcomes: list[tuple[str, bool]] = []
    original = dispatch._InlineHooks._run_hook

    def spy(self, hook):
        done = original(self, hook)
        outcomes.append((hook.name, done))
        return done

    monkeypatch.setattr(dispatch._InlineHooks, "_run_hook", spy)
    assert dispatch.install_inline_hooks()
    opts = options.Options()
    master = Master(opts, event_loop=asyncio.get_running_loop())
    master.addons = dispatch.CachedDispatchAddonManager(master)
    recorder = Recorder()
    master.addons.add(*mitmproxy_addons(), recorder)
    opts.update(confdir=str(tmp_path), listen_host="127.0.0.1", mode=[f"reverse:{upstream}@0"],
                connection_strategy="lazy")
    task = asyncio.create_task(master.run())
    ps = master.addons.get("proxyserver")
    for _ in range(500):
        running = [s for s in ps.servers if s.is_running]
        if running and not ps.servers.is_updating:
            break
        await asyncio.sleep(0.01)
    port = running[0].listen_addrs[0][1]
    yield f"http://127.0.0.1:{port}", recorder, outcomes
    await ps.servers.update([])
    master.shutdown()
    await task


async def get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
            return resp.status, await resp.text()


async def test_hooks_that_return_at_once_complete_inline_in_order(proxy):
    base, recorder, outcomes = proxy
    assert await get(base + "/x") == (200, "upstream saw x-added-after-wait=None")
    assert recorder.calls == ["requestheaders", "request", "responseheaders", "response"]
    flow_hooks = [(name, done) for name, done in outcomes if name in recorder.calls]
    assert flow_hooks == [(name, True) for name in recorder.calls]


async def test_an_answer_set_in_requestheaders_is_sent_without_the_upstream(proxy):
    base, recorder, outcomes = proxy
    recorder.mode = "answer"
    assert await get(base + "/x") == (200, "from the addon")
    # mitmproxy emulates responseheaders for answers set by an addon; all four ran inline
    assert recorder.calls == ["requestheaders", "request", "responseheaders", "response"]
    assert all(done for name, done in outcomes if name in recorder.calls)


async def test_a_hook_that_waits_completes_later_and_its_changes_reach_the_upstream(proxy):
    base, recorder, outcomes = proxy
    recorder.mode = "slow"
    assert await get(base + "/x") == (200, "upstream saw x-added-after-wait=yes")
    assert ("request", False) in outcomes
    assert recorder.calls == ["requestheaders", "request", "responseheaders", "response"]


async def test_a_failing_hook_is_logged_and_the_flow_goes_on(proxy, caplog):
    base, recorder, _ = proxy
    recorder.mode = "fail"
    with caplog.at_level(logging.ERROR):
        assert await get(base + "/x") == (200, "upstream saw x-added-after-wait=None")
    assert any("addon bug" in r.getMessage() for r in caplog.records)


async def test_an_intercepted_flow_waits_for_resume(proxy):
    base, recorder, outcomes = proxy
    recorder.mode = "hold"
    pending = asyncio.create_task(get(base + "/x"))
    for _ in range(200):
        if recorder.held is not None:
            break
        await asyncio.sleep(0.01)
    assert recorder.held is not None
    await asyncio.sleep(0.2)
    assert not pending.done(), "an intercepted flow must not be sent on"
    assert ("request", False) in outcomes
    recorder.held.resume()
    assert await asyncio.wait_for(pending, 5) == (200, "upstream saw x-added-after-wait=None")


async def test_an_answers_head_and_body_leave_in_one_write_and_pipelined_answers_keep_their_order(proxy, monkeypatch):
    base, recorder, _ = proxy
    recorder.mode = "answer"
    writes: list[bytes] = []
    original = asyncio.StreamWriter.write

    def counting(self, data):
        writes.append(bytes(data))
        return original(self, data)

    monkeypatch.setattr(asyncio.StreamWriter, "write", counting)
    host, port = base.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    request = b"GET /x HTTP/1.1\r\nHost: example.com\r\n\r\n"
    writer.write(request * 3)  # pipelined: three requests in one segment
    received = b""
    while received.count(b"from the addon") < 3:
        chunk = await asyncio.wait_for(reader.read(65536), 5)
        assert chunk, received
        received += chunk
    writer.close()
    answers = [w for w in writes if w.startswith(b"HTTP/1.1 200")]
    assert len(answers) == 3 and all(w.endswith(b"\r\n\r\nfrom the addon") for w in answers), writes
    assert received == b"".join(answers)


def test_a_lean_fork_shares_what_mitmproxys_fork_shares():
    from mitmproxy import connection
    from mitmproxy.proxy import context

    client = connection.Client(peername=("127.0.0.1", 1), sockname=("127.0.0.1", 2), timestamp_start=0)
    parent = dispatch.LeanForkContext(client, options.Options())
    parent.layers = ["a layer"]
    stock, lean = context.Context.fork(parent), parent.fork()
    assert type(lean) is dispatch.LeanForkContext
    for forked in (stock, lean):
        assert (forked.client, forked.options, forked.server) == (parent.client, parent.options, parent.server)
        assert forked.layers == parent.layers and forked.layers is not parent.layers
    assert vars(lean).keys() == vars(stock).keys()


def test_install_is_idempotent_and_targets_mitmproxys_handler():
    from mitmproxy.proxy import mode_servers

    assert dispatch.install_inline_hooks()
    assert dispatch.install_inline_hooks()
    assert mode_servers.ProxyConnectionHandler is dispatch.InlineHookConnectionHandler


def test_request_lines_are_parsed_once_and_a_bad_line_still_fails_every_time():
    from mitmproxy.net.http.http1 import read

    dispatch.memoize_request_lines()
    dispatch.memoize_request_lines()  # idempotent: one memo, not a memo of a memo
    parse = read._read_request_line
    assert parse.__wrapped__ is inspect.unwrap(parse)
    parse.cache_clear()
    line = b"GET http://api.themoviedb.org/3/movie/603?api_key=x HTTP/1.1"
    first = read.read_request_head([line, b"Host: api.themoviedb.org"])
    second = read.read_request_head([line, b"Host: api.themoviedb.org"])
    assert (first.host, first.port, first.path) == (second.host, second.port, second.path) == (
        "api.themoviedb.org", 80, "/3/movie/603?api_key=x")
    assert parse.cache_info().hits == 1
    for _ in range(2):
        with pytest.raises(ValueError, match="Bad HTTP request line"):
            read.read_request_head([b"GET http://exa mple.com:99999/ HTTP/1.1"])
    from mitmproxy.proxy import mode_servers

    handler = mode_servers.ProxyConnectionHandler
    dispatch.restore_stock_hooks()
    assert not hasattr(read._read_request_line, "cache_info")
    dispatch.memoize_request_lines()  # as the rest of the session runs
    mode_servers.ProxyConnectionHandler = handler


def test_consecutive_sends_join_per_tcp_connection_and_keep_their_order():
    from mitmproxy import connection
    from mitmproxy.proxy import commands

    def conn(protocol: str = "tcp") -> connection.Client:
        return connection.Client(peername=("127.0.0.1", 1), sockname=("127.0.0.1", 2), timestamp_start=0,
                                 transport_protocol=protocol)

    client, server, udp = conn(), conn(), conn("udp")
    log = commands.Log("between")

    class Layer:
        context = None

        def handle_event(self, event):
            yield from [commands.SendData(client, b"head "), commands.SendData(client, b"body"),
                        commands.SendData(server, b"request"), log, commands.SendData(client, b"more"),
                        commands.SendData(udp, b"datagram 1"), commands.SendData(udp, b"datagram 2")]

    sent = list(dispatch._InlineHooks(Layer(), handler=None).handle_event(object()))
    assert [(c.connection, c.data) if isinstance(c, commands.SendData) else c for c in sent] == [
        (client, b"head body"), (server, b"request"), log, (client, b"more"),
        (udp, b"datagram 1"), (udp, b"datagram 2")]
