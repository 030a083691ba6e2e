"""Attributes each flow to an upstream and a route of rules.yaml, and sends it where it belongs.

- Explicit proxy: the request's host names the upstream (`upstreams.*.hosts`).
- Reverse listener: the listener's port names the upstream (`upstreams.*.listen`); the request
  goes to that upstream's `base_url`.
- `projectionist_upstreams` ("name=url") sends an upstream's traffic elsewhere: the offline demo
  and the tests point the hard-coded hosts (plex.tv, TMDB, ...) at local fakes this way.

TLS to hosts that are not ours is not intercepted at all (`ignore_connection`), so the browser's
unrelated traffic passes through byte for byte and is never recorded; or it is refused, by rule.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping, Sequence
from urllib.parse import urlsplit

from mitmproxy import ctx, exceptions, http, tls
from mitmproxy.net.http import url
from mitmproxy.proxy.mode_specs import ReverseMode

from projectionist.rules import Rules

from . import flowinfo
from .rules_watch import RulesWatcher

log = logging.getLogger(__name__)


def parse_overrides(pairs: Sequence[str]) -> dict[str, str]:
    """["tmdb=http://127.0.0.1:9000", ...] -> {"tmdb": "http://127.0.0.1:9000"}."""
    out: dict[str, str] = {}
    for pair in pairs:
        name, sep, url = pair.partition("=")
        parts = urlsplit(url.strip())
        if not sep or not name.strip() or parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"upstream override must look like name=http(s)://host[:port], got {pair!r}")
        out[name.strip()] = url.strip().rstrip("/")
    return out


def reverse_target(rules: Rules, name: str, overrides: Mapping[str, str]) -> str | None:
    return overrides.get(name) or rules.upstreams[name].base_url


def listener_modes(rules: Rules, proxy_port: int, overrides: Mapping[str, str]) -> list[str]:
    """mitmproxy `mode` values: the explicit proxy plus one reverse listener per declared upstream."""
    modes = [f"regular@{proxy_port}"]
    for port, name in sorted(rules.reverse_listeners().items()):
        modes.append(f"reverse:{reverse_target(rules, name, overrides)}@{port}")
    return modes


class Router:
    def __init__(self, watcher: RulesWatcher) -> None:
        self.watcher = watcher
        self.overrides: dict[str, str] = {}

    def load(self, loader) -> None:
        loader.add_option(
            "projectionist_upstreams", Sequence[str], [],
            "Send an upstream's traffic elsewhere: name=http(s)://host:port (demo mode, tests).",
        )

    def configure(self, updated) -> None:
        if "projectionist_upstreams" in updated:
            try:
                self.overrides = parse_overrides(ctx.options.projectionist_upstreams)
            except ValueError as exc:
                raise exceptions.OptionsError(str(exc)) from None

    def _upstream_for(self, rules: Rules, mode, host: str) -> str | None:
        if isinstance(mode, ReverseMode):
            return rules.reverse_listener(mode.custom_listen_port or 0)
        return rules.upstream_for_host(host)

    def tls_clienthello(self, data: tls.ClientHelloData) -> None:
        rules = self.watcher.rules
        if rules is None or isinstance(data.context.client.proxy_mode, ReverseMode):
            return
        host = data.client_hello.sni or (data.context.server.address or ("",))[0]
        if rules.upstream_for_host(host) is None and rules.model.proxy.unknown_hosts == "pass":
            data.ignore_connection = True

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        rules = self.watcher.rules
        if rules is None:
            return
        mode = flow.client_conn.proxy_mode
        name = self._upstream_for(rules, mode, _pretty_host(flow.request))
        if name is None:
            if rules.model.proxy.unknown_hosts == "refuse":
                flow.response = http.Response.make(
                    403, b"This proxy only serves the hosts named in its rules.\n",
                    {"Content-Type": "text/plain; charset=utf-8"},
                )
            return
        req = flow.request
        # req.query parses lazily: only routes with query conditions pay for it.
        match = rules.match(name, req.method, req.path.split("?", 1)[0], req.query)
        listener = "reverse" if isinstance(mode, ReverseMode) else "regular"
        flowinfo.attach(flow, flowinfo.FlowInfo(match=match, listener=listener))

    def request(self, flow: http.HTTPFlow) -> None:
        """Point the request at its upstream's address, once an addon has not answered it already
        (mitmproxy connects after this hook; no route streams request bodies, which would connect
        right after requestheaders)."""
        info = flowinfo.get(flow)
        if info is None or flow.response is not None:
            return
        target = self.overrides.get(info.upstream) or (
            info.match.upstream.base_url if info.listener == "reverse" else None)
        if target:
            scheme, host, port = _address(target)
            req = flow.request
            if (req.scheme, req.host, req.port) != (scheme, host, port):
                req.scheme, req.host, req.port = scheme, host, port


@functools.lru_cache(maxsize=1024)
def _address(target: str) -> tuple[str, str, int]:
    parts = urlsplit(target)
    return parts.scheme, parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)


@functools.lru_cache(maxsize=1024)
def _authority_host(authority: str) -> str:
    return url.parse_authority(authority, check=False)[0]


def _pretty_host(request: http.Request) -> str:
    """`Request.pretty_host`, with the parse of the (few, repeating) Host headers memoised."""
    authority = request.host_header
    return _authority_host(authority) if authority else request.host


class Listeners:
    """Keeps mitmproxy's listeners in step with the reverse listeners declared in rules.yaml."""

    def __init__(self, watcher: RulesWatcher, router: Router) -> None:
        self.watcher = watcher
        self.router = router
        watcher.subscribe(self._rules_changed)

    def load(self, loader) -> None:
        loader.add_option("projectionist_proxy_port", int, 8080, "Port of the explicit HTTP(S) proxy.")
        loader.add_option("projectionist_manage_listeners", bool, False,
                          "Derive mitmproxy's listen modes from rules.yaml (the embedded runner does).")

    def running(self) -> None:
        self._apply()

    def _rules_changed(self, _rules: Rules) -> None:
        self._apply()

    def _apply(self) -> None:
        if not ctx.options.projectionist_manage_listeners or self.watcher.rules is None:
            return
        modes = listener_modes(self.watcher.rules, ctx.options.projectionist_proxy_port, self.router.overrides)
        if list(ctx.options.mode) != modes:
            log.info("listeners: %s", ", ".join(modes))
            ctx.options.update(mode=modes)
