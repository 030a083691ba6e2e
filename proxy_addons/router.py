"""Attributes each flow to an upstream and a route of rules.yaml, and sends it where it belongs.

- Explicit proxy: the request's host names the upstream (`upstreams.*.hosts`).
- Reverse listener: the listener's port names the upstream (`upstreams.*.listen`); the request
  goes to that upstream's `base_url`.
- `projectionist_upstreams` ("name=url") sends an upstream's traffic elsewhere: the offline demo
  and the tests point the hard-coded hosts (plex.tv, TMDB, ...) at local fakes this way.
- The connection address is configuration's, never the client's alone (proxy_addons/binding.py):
  an explicit-proxy request whose Host, target and SNI disagree, or a `*.plex.direct` name that is
  no known connection of a Plex server, is refused with 421 before any credential is added; an
  absolute-form URL on a reverse listener never moves its connection off `base_url`.

TLS to hosts that are not ours is not intercepted at all (`ignore_connection`), so the browser's
unrelated traffic passes through byte for byte and is never recorded; or it is refused, by rule.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
from collections.abc import Mapping, Sequence
from urllib.parse import urlsplit

from mitmproxy import ctx, exceptions, http, tls
from mitmproxy.proxy.mode_specs import ReverseMode

from projectionist.config import parse_overrides
from projectionist.onboarding import SETUP_HOST
from projectionist.rules import Match, Rules

from . import binding, flowinfo
from .local_responses import misdirected
from .rules_watch import RulesWatcher

log = logging.getLogger(__name__)


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
        self.plex_connections = binding.PlexConnections()  # filled by plex_tokens from plex.tv resources
        self.peers = None  # proxy_addons/peers.py: what other processes learned

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

    def _passed_through(self, rules: Rules, name: str) -> bool:
        """An upstream intercepted only when overridden (app.plex.tv outside the demo) is not ours."""
        return rules.upstreams[name].intercept == "when_overridden" and name not in self.overrides

    def _ours(self, rules: Rules, host: str) -> str | None:
        name = rules.upstream_for_host(host)
        return None if name is None or self._passed_through(rules, name) else name

    def tls_clienthello(self, data: tls.ClientHelloData) -> None:
        rules = self.watcher.rules
        if rules is None or isinstance(data.context.client.proxy_mode, ReverseMode):
            return
        # Passed through untouched only when neither the SNI nor the CONNECT target is ours: a
        # foreign SNI for one of our hosts is intercepted, and refused by requestheaders (421).
        # Hosts of an upstream intercepted only when overridden pass through even with `refuse`.
        sni, target = data.client_hello.sni, (data.context.server.address or ("",))[0]
        if SETUP_HOST in (sni, target):  # intercepted: its HTTPS probe tells whether the CA is trusted
            return
        if (not sni or self._ours(rules, sni) is None) and self._ours(rules, target) is None and (
                rules.model.proxy.unknown_hosts == "pass" or rules.upstream_for_host(sni or target) is not None):
            data.ignore_connection = True

    def requestheaders(self, flow: http.HTTPFlow):
        return self._route(flow, may_ask_peers=True)

    async def _route_after_asking_peers(self, flow: http.HTTPFlow) -> None:
        """A `*.plex.direct` name this process does not know may be one another process learned."""
        await self.peers.refresh_connections()
        self._route(flow, may_ask_peers=False)

    def _route(self, flow: http.HTTPFlow, may_ask_peers: bool):
        rules = self.watcher.rules
        if rules is None or flow.response is not None:  # answered before routing (SetupHost)
            return
        mode = flow.client_conn.proxy_mode
        req = flow.request
        if isinstance(mode, ReverseMode):
            name, listener = rules.reverse_listener(mode.custom_listen_port or 0), "reverse"
            if req.authority:  # absolute-form: the connection still goes to base_url (request())
                req.authority = ""
        else:
            name, listener = rules.upstream_for_host(binding.pretty_host(req)), "regular"
            if name is not None and self._passed_through(rules, name):
                return
            if may_ask_peers and self._ask_peers_first(rules, name, req):
                return self._route_after_asking_peers(flow)  # mitmproxy awaits it (rare: a new name)
            if (refusal := self._misdirected(flow, rules, name)) is not None:
                return self._refuse(flow, rules, *refusal)
        if name is None:
            if rules.model.proxy.unknown_hosts == "refuse":
                flow.response = http.Response.make(
                    403, b"This proxy only serves the hosts named in its rules.\n",
                    {"Content-Type": "text/plain; charset=utf-8"},
                )
            return
        target = req.path
        match = rules.match_target(name, req.method, target, lambda: req.query)
        private = rules.user_specific(match.upstream.kind, target, req.headers)
        info = flowinfo.FlowInfo(match=match, listener=listener, user_specific=private)
        if (listener == "regular" and match.upstream.kind == "plex-server"
                and binding.normal_host(req.host).endswith(binding.PLEX_DIRECT)):
            # Another server of the account (plex.tv resources listed this connection for it): it
            # is reached where the name points, with its own token, cache entries and limits.
            info.server = self.plex_connections.other_server_at(name, req.host, req.port)
        flowinfo.attach(flow, info)
        binding.remember_presented(flow)

    def _ask_peers_first(self, rules: Rules, name: str | None, req: http.Request) -> bool:
        """A `*.plex.direct` name of no server this process knows, with other processes to ask."""
        return (name is not None and self.peers is not None and rules.upstreams[name].kind == "plex-server"
                and binding.normal_host(req.host).endswith(binding.PLEX_DIRECT)
                and not self.plex_connections.servers_at(req.host, req.port) and self.peers.enabled)

    def _misdirected(self, flow: http.HTTPFlow, rules: Rules, name: str | None) -> tuple[str, str] | None:
        """(upstream, reason) if this explicit-proxy request may not go where it asks."""
        if (found := binding.misdirection(flow, rules, name)) is not None:
            return found
        req = flow.request
        # With an override the connection goes there, not to the name's embedded address.
        if (name is not None and rules.upstreams[name].kind == "plex-server" and name not in self.overrides
                and binding.normal_host(req.host).endswith(binding.PLEX_DIRECT)
                and not binding.plex_direct_known(rules, name, self.plex_connections, req.host, req.port)):
            return name, "not a known connection of a Plex server"
        return None

    def _refuse(self, flow: http.HTTPFlow, rules: Rules, name: str, reason: str) -> None:
        req = flow.request
        log.warning("refused a misdirected request for upstream %s (%s): Host %.100r, target %.100r, SNI %.100r",
                    name, reason, req.host_header, f"{req.host}:{req.port}", flow.client_conn.sni)
        upstream = rules.upstreams[name]
        flowinfo.attach(flow, flowinfo.FlowInfo(match=Match(name, upstream, None), listener="regular",
                                                refused="misdirected"))
        flow.response = misdirected(req, upstream.kind)

    def request(self, flow: http.HTTPFlow) -> None:
        """Point the request at its upstream's address, once an addon has not answered it already
        (mitmproxy connects after this hook; no route streams request bodies, which would connect
        right after requestheaders)."""
        info = flowinfo.get(flow)
        if info is None or flow.response is not None:
            return
        # An override moves the configured server (base_url), never another server of the account.
        target = None if info.server else self.overrides.get(info.upstream) or (
            info.match.upstream.base_url if info.listener == "reverse" else None)
        if target:
            scheme, host, port = _address(target)
            req = flow.request
            if (req.scheme, req.host, req.port) != (scheme, host, port):
                req.scheme, req.host, req.port = scheme, host, port
        elif (info.listener == "regular" and flow.request.scheme == "http" and flow.request.port == 80
              and info.match.upstream.kind in HTTPS_ONLY_KINDS):
            # These APIs speak only https: the credential the proxy adds never crosses a network in
            # clear. (An explicit other port is someone's own test or mirror, left as asked.)
            flow.request.scheme, flow.request.port = "https", 443

    def server_connect(self, data) -> None:
        """`*.plex.direct` names connect to the IP embedded in them, as Plex's DNS resolves them (the
        TLS SNI stays the name); the router has checked that IP is a known connection."""
        host, port = data.server.address or ("", 0)
        if (ip := binding.embedded_ip(host)) is not None:
            data.server.address = (ip, port)


HTTPS_ONLY_KINDS = frozenset({"tmdb", "trakt", "plex-tv"})


@functools.lru_cache(maxsize=1024)
def _address(target: str) -> tuple[str, str, int]:
    parts = urlsplit(target)
    return parts.scheme, parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)


def open_proxy_warning(rules: Rules, listen_host: str) -> str | None:
    """Why this configuration is an open proxy, if it is: a non-loopback listener that passes
    traffic for any host on (`proxy.unknown_hosts: pass`)."""
    if rules.model.proxy.unknown_hosts != "pass" or _is_loopback(listen_host):
        return None
    return (f"open proxy: the explicit proxy listens on {listen_host or 'every address'} and passes traffic for "
            "hosts not named in rules.yaml (proxy.unknown_hosts: pass), so anyone who can reach it can use it; "
            "listen on 127.0.0.1 or set proxy.unknown_hosts: refuse")


def lending_warning(rules: Rules, listen_host: str) -> str | None:
    """`proxy.anonymous: lend` on a listener others can reach lends them the server's credentials."""
    if rules.model.proxy.anonymous != "lend" or _is_loopback(listen_host):
        return None
    return (f"proxy.anonymous: lend while the explicit proxy listens on {listen_host or 'every address'}: anyone "
            "who can reach it gets TMDB and Trakt answers on the server's key and app credentials; set "
            "proxy.anonymous: forward (or refuse) unless only trusted clients can reach it")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # "" (every address) or a name


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
        self._warn_if_open()

    def _rules_changed(self, _rules: Rules) -> None:
        self._apply()
        self._warn_if_open()

    def _warn_if_open(self) -> None:
        for check in (open_proxy_warning, lending_warning):
            if self.watcher.rules is not None and (warning := check(self.watcher.rules, ctx.options.listen_host)):
                log.warning(warning)

    def _apply(self) -> None:
        if not ctx.options.projectionist_manage_listeners or self.watcher.rules is None:
            return
        modes = listener_modes(self.watcher.rules, ctx.options.projectionist_proxy_port, self.router.overrides)
        if list(ctx.options.mode) != modes:
            log.info("listeners: %s", ", ".join(modes))
            ctx.options.update(mode=modes)
