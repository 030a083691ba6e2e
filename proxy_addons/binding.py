"""Credentials reach only their own destination (issue 13): the checks the router makes.

Through the explicit proxy the upstream is chosen by the request's Host, while mitmproxy would
connect to the request's target (absolute-form URL, CONNECT target). A request whose Host, target
and TLS SNI do not name the same host and port, one of which is ours, is refused with 421
Misdirected Request before any credential addon runs. After that check the connection goes to the
configured host (resolved by DNS) or the upstream's configured override: never to an address only
the client named.

`*.plex.direct` names resolve to the IP embedded in them (192-168-1-10.<hash>.plex.direct is
192.168.1.10), so such a name may point anywhere: its address must be one of a Plex server's known
connections (plex.tv resources, learned by plex_tokens, plus the configured base_url), and a
server's token goes only to that server's connections (checked by plex_tokens, which knows whose
token it is).

Redirects are never followed with credentials (mitmproxy forwards them, the proxy's own fetches
do not follow them); a 3xx's Location loses the credentials the proxy injected: to another host
they are removed, on the same host the client's own value (its surrogate) is put back.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import re
import socket
from collections.abc import Callable, Iterable, Mapping
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from aiohttp.abc import ResolveResult
from aiohttp.resolver import DefaultResolver
from mitmproxy import http
from mitmproxy.net.http import url

from projectionist.rules import Rules

from . import flowinfo
from .header_lookup import host_header

log = logging.getLogger(__name__)

PLEX_DIRECT = ".plex.direct"
# Where the upstreams take credentials in a URL: these never survive a redirect to another host.
CREDENTIAL_PARAMS = frozenset({"x-plex-token", "api_key", "access_token", "token", "client_secret", "session_id"})
_PRESENTED = "projectionist.presented"  # flow.metadata: the request target as the client sent it
_DASHED_V4 = re.compile(r"^(\d{1,3})-(\d{1,3})-(\d{1,3})-(\d{1,3})$")

Address = tuple[str, int]


def normal_host(host: str) -> str:
    return host.lower().rstrip(".").strip("[]")


def default_port(scheme: str) -> int:
    return 443 if scheme == "https" else 80


@functools.lru_cache(maxsize=1024)
def _parse_authority(authority: str) -> tuple[str, int | None]:
    host, port = url.parse_authority(authority, check=False)
    return normal_host(host), port


def embedded_ip(host: str) -> str | None:
    """The address a `*.plex.direct` name stands for (its first label, dashes for dots or colons)."""
    host = normal_host(host)
    if not host.endswith(PLEX_DIRECT):
        return None
    label = host.split(".", 1)[0]
    m = _DASHED_V4.match(label)
    candidate = ".".join(m.groups()) if m else label.replace("-", ":")
    try:
        return str(ipaddress.ip_address(candidate))
    except ValueError:
        return None


@functools.lru_cache(maxsize=1024)
def _authority_host(authority: str) -> str:
    return url.parse_authority(authority, check=False)[0]


def pretty_host(request: http.Request) -> str:
    """`Request.pretty_host`, with the parse of the (few, repeating) Host headers memoised: it
    costs an IDNA round trip per request, which every request's routing and setup check paid."""
    authority = host_header(request)
    return _authority_host(authority) if authority else request.host


def _address_forms(host: str, port: int) -> set[Address]:
    """A connection's host as written and, for a plex.direct name, the IP it resolves to."""
    host = normal_host(host)
    out = {(host, port)}
    if (ip := embedded_ip(host)) is not None:
        out.add((ip, port))
    else:
        try:
            out.add((str(ipaddress.ip_address(host)), port))
        except ValueError:
            pass
    return out


def url_address(target: str) -> Address | None:
    parts = urlsplit(target)
    if not parts.hostname:
        return None
    return normal_host(parts.hostname), parts.port or default_port(parts.scheme)


class PlexDirectResolver(DefaultResolver):
    """aiohttp's resolver, with `*.plex.direct` names resolved to their embedded IP as Plex's DNS
    does (no look-up, and the same address mitmproxy connects to: see Router.server_connect)."""

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
                      ) -> list[ResolveResult]:
        if (ip := embedded_ip(host)) is not None:
            ip_family = socket.AF_INET6 if ":" in ip else socket.AF_INET
            return [ResolveResult(hostname=host, host=ip, port=port, family=ip_family, proto=0,
                                  flags=socket.AI_NUMERICHOST)]
        return await super().resolve(host, port, family)


class PlexConnections:
    """Each Plex server's connections as plex.tv `resources` listed them (machine id -> addresses)."""

    def __init__(self) -> None:
        self._by_server: dict[str, set[Address]] = {}
        # Upstream name -> machine id of the server at its base_url (plex_tokens identifies it): the
        # one its reverse listener serves. Every other server is reached at its own connections.
        self.configured: dict[str, str] = {}
        # Told of what this process learns or forgets (proxy_addons/peers.py shares it).
        self.on_change: Callable[[str, set[Address] | None], None] | None = None

    def learn(self, server_id: str, connections: Iterable[Mapping]) -> None:
        addresses: set[Address] = set()
        for connection in connections:
            uri = connection.get("uri")
            if isinstance(uri, str) and (address := url_address(uri)) is not None:
                addresses |= _address_forms(*address)
            host, port = connection.get("address"), connection.get("port")
            if isinstance(host, str) and host and str(port).isdigit():
                addresses |= _address_forms(host, int(port))
        if addresses:
            self._by_server[server_id] = addresses
            if self.on_change is not None:
                self.on_change(server_id, addresses)

    def absorb(self, server_id: str, addresses: Iterable[Address]) -> None:
        """A server's connections as another process learned them."""
        self._by_server[server_id] = {(str(host), int(port)) for host, port in addresses}

    def forget(self, server_id: str) -> None:
        self._by_server.pop(server_id, None)
        if self.on_change is not None:
            self.on_change(server_id, None)

    def other_server_at(self, upstream: str, host: str, port: int) -> str:
        """The machine id of the server at `host:port` if that is a known connection of a server
        other than the upstream's configured one (else ""): such a request goes to that server."""
        servers = self.servers_at(host, port)
        if not servers or self.configured.get(upstream) in servers:
            return ""
        return min(servers)

    def servers_at(self, host: str, port: int) -> set[str]:
        """The machine ids of the servers one of whose connections is `host:port`."""
        wanted = _address_forms(host, port)
        return {server for server, addresses in self._by_server.items() if wanted & addresses}


def is_configured_address(rules: Rules, upstream: str, host: str, port: int) -> bool:
    """Whether `host:port` is the upstream's configured base_url (as written or as its IP)."""
    configured = rules.upstreams[upstream].base_url
    address = url_address(configured) if configured else None
    return address is not None and bool(_address_forms(host, port) & _address_forms(*address))


def plex_direct_known(rules: Rules, upstream: str, connections: PlexConnections, host: str, port: int) -> bool:
    """Whether a `*.plex.direct` destination is a connection of a known server (or the configured one)."""
    if embedded_ip(host) is None:
        return False
    return is_configured_address(rules, upstream, host, port) or bool(connections.servers_at(host, port))


def misdirection(flow: http.HTTPFlow, rules: Rules, name: str | None) -> tuple[str, str] | None:
    """(upstream, reason) when the Host, the target and the SNI of an explicit-proxy request do not
    agree and one of them names an upstream of ours; None when they agree or none is ours."""
    req = flow.request
    if authority := host_header(req):
        host, port = _parse_authority(authority)
    else:
        host, port = normal_host(req.host), req.port
    port = port or default_port(req.scheme)
    target = normal_host(req.host)
    sni = normal_host(flow.client_conn.sni) if flow.client_conn.sni else None
    ours = name or rules.upstream_for_host(target) or (sni and rules.upstream_for_host(sni))
    if not ours:
        return None
    if (host, port) != (target, req.port):
        return ours, "Host and target differ"
    if sni is not None and sni != host:
        return ours, "Host and TLS SNI differ"
    return None


# --- redirects --------------------------------------------------------------------------------------

class Redirects:
    """A redirect never carries the credentials the proxy injected. Placed after the rate limiter's
    retries in the chain, so that a redirect fetched again is scrubbed too."""

    def response(self, flow: http.HTTPFlow) -> None:
        response = flow.response
        if (response is None or not 300 <= response.status_code < 400 or "location" not in response.headers
                or (info := flowinfo.get(flow)) is None):
            return
        if scrub_location(flow, redirect_is_same_host(flow, response.headers["location"])):
            log.info("removed credentials from a redirect's Location (%s)", info.route)


def remember_presented(flow: http.HTTPFlow) -> None:
    """Keep the request target as the client sent it (with its surrogates), before credentials are
    swapped in; parsed only if a redirect comes back."""
    if "?" in flow.request.path:
        flow.metadata[_PRESENTED] = flow.request.path


def _presented_params(flow: http.HTTPFlow) -> dict[str, str]:
    path = flow.metadata.get(_PRESENTED, "")
    return {k.lower(): v for k, v in parse_qsl(path.partition("?")[2], keep_blank_values=True)
            if k.lower() in CREDENTIAL_PARAMS}


def scrub_location(flow: http.HTTPFlow, same_host: bool) -> bool:
    """Take the credentials the proxy injected out of a redirect's Location. True if it changed."""
    location = flow.response.headers.get("location")
    if not location:
        return False
    injected = _injected_values(flow.request)
    presented = _presented_params(flow)
    parts = urlsplit(location)
    fields = parse_qsl(parts.query, keep_blank_values=True)
    kept = []
    for name, value in fields:
        if name.lower() in CREDENTIAL_PARAMS or any(secret in value for secret in injected):
            if same_host and name.lower() in presented:
                kept.append((name, presented[name.lower()]))
            continue
        kept.append((name, value))
    path = parts.path
    for secret in injected:  # a credential anywhere else in the URL (a path segment, user info)
        path = path.replace(secret, "")
    netloc = parts.netloc.rsplit("@", 1)[-1] if any(s in parts.netloc for s in injected) else parts.netloc
    scrubbed = urlunsplit((parts.scheme, netloc, path, urlencode(kept) if kept != fields else parts.query,
                           parts.fragment))
    if scrubbed == location:
        return False
    flow.response.headers["location"] = scrubbed
    return True


def _injected_values(request: http.Request) -> set[str]:
    """The credential values on the request as it went upstream (real tokens and keys)."""
    values = {v for k, v in request.query.items(multi=True) if k.lower() in CREDENTIAL_PARAMS} \
        if "?" in request.path else set()
    for header in ("x-plex-token", "trakt-api-key"):
        if value := request.headers.get(header):
            values.add(value)
    auth = request.headers.get("authorization", "")
    if auth[:7].lower() == "bearer ":
        values.add(auth[7:].strip())
    return {v for v in values if len(v) >= 8}  # never strip short, common strings


def redirect_is_same_host(flow: http.HTTPFlow, location: str) -> bool:
    parts = urlsplit(location)
    if not parts.netloc:
        return True  # relative: the same origin
    req = flow.request
    own = req.host_header or req.host
    host, port = _parse_authority(own)
    scheme = parts.scheme or req.scheme
    return (normal_host(parts.hostname or ""), parts.port or default_port(scheme)) == \
        (host, port or default_port(req.scheme)) and scheme == req.scheme
