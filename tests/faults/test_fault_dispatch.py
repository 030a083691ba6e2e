"""Issue 16 case 8: the mitmproxy internals proxy_addons/dispatch.py replaces are checked at start;
changed ones (or PROJECTIONIST_STOCK_DISPATCH=1) mean mitmproxy's stock dispatch, with one
warning, and the proxy serves the same through its real reverse listener either way."""

from __future__ import annotations

import logging

import aiohttp
import pytest
from aiohttp import web
from mitmproxy import addonmanager
from mitmproxy.proxy import mode_servers

from proxy_addons import dispatch
from support import LocalUpstream, free_port, start_embedded_proxy


class Plex(LocalUpstream):
    async def handle(self, request: web.Request) -> web.StreamResponse:
        return web.Response(text='<MediaContainer machineIdentifier="x"/>', content_type="application/xml")


async def serve_identity(tmp_path) -> tuple[object, int, type]:
    async with Plex() as up:
        port = free_port()
        proxy = await start_embedded_proxy(tmp_path, [f"plex={up.url}", f"plextv={up.url}"], plex_listen=port)
        try:
            async with aiohttp.ClientSession() as client:
                async with client.get(f"http://127.0.0.1:{port}/identity") as r:
                    status = r.status
            return proxy, status, type(proxy.master.addons)
        finally:
            await proxy.stop()


def test_the_installed_mitmproxy_has_the_expected_internals():
    assert dispatch.unexpected_internals() == []


async def test_fast_dispatch_when_internals_match(tmp_path, monkeypatch):
    monkeypatch.delenv(dispatch.STOCK_DISPATCH_ENV, raising=False)
    proxy, status, manager = await serve_identity(tmp_path)
    assert status == 200 and proxy.fast_dispatch and manager is dispatch.CachedDispatchAddonManager
    assert mode_servers.ProxyConnectionHandler is dispatch.InlineHookConnectionHandler


async def test_changed_internals_fall_back_to_stock_with_one_warning(tmp_path, monkeypatch, caplog):
    monkeypatch.delenv(dispatch.STOCK_DISPATCH_ENV, raising=False)

    async def handle_lifecycle(self, event):  # a "new release" with other hook semantics
        return None
    monkeypatch.setattr(addonmanager.AddonManager, "handle_lifecycle", handle_lifecycle)
    caplog.set_level(logging.WARNING, logger="proxy_addons.dispatch")
    # Stock dispatch through the patched manager would answer nothing: check the verdict alone,
    # then serve with the real manager restored.
    assert "addonmanager.AddonManager.handle_lifecycle" in dispatch.unexpected_internals()

    class FakeMaster:
        addons = "stock"
    master = FakeMaster()
    assert dispatch.choose_dispatch(master) is False and master.addons == "stock"
    assert mode_servers.ProxyConnectionHandler is not dispatch.InlineHookConnectionHandler
    warnings = [r for r in caplog.records if r.name == "proxy_addons.dispatch"]
    assert len(warnings) == 1 and "stock" in warnings[0].getMessage()
    assert "handle_lifecycle" in warnings[0].getMessage()


async def test_stock_dispatch_forced_by_environment_serves_the_same(tmp_path, monkeypatch):
    monkeypatch.setenv(dispatch.STOCK_DISPATCH_ENV, "1")
    proxy, status, manager = await serve_identity(tmp_path)
    assert status == 200 and not proxy.fast_dispatch and manager is addonmanager.AddonManager
    assert mode_servers.ProxyConnectionHandler is not dispatch.InlineHookConnectionHandler


@pytest.fixture(autouse=True)
def restore_handler():
    yield
    dispatch.restore_stock_hooks()
