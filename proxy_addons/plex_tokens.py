"""The Plex token vault in the traffic: the browser holds surrogates, upstreams get real tokens.

Requests to plex.tv, discover.provider.plex.tv and Plex servers: every `X-Plex-Token` (query or
header) that is a surrogate is swapped for the real token; an unknown, revoked or expired one is
answered 401 in the upstream's own format without calling it. Transcode segments carry no token
in the real player; they get the token of the decision/start request of the same `session`.

Responses from plex.tv: every `authToken` / `accessToken` (PIN poll, user, resources; JSON or XML)
is vaulted and replaced by a surrogate (a server's bound to its machine identifier). The
connection URIs of the server a reverse listener serves (its upstream's base_url) point at that
listener; every other server of the account keeps its own `*.plex.direct` URIs, which the player
reaches through the explicit proxy (never another server's listener). Either way the frontend keeps
using the proxy and never holds a real token.

A real token sent by a client from before Projectionist passes through once and is vaulted, so
that the responses it receives from then on carry surrogates. plex.tv is asked once whose it is:
concurrent first requests with the same token share that look-up, and an answer plex.tv cannot
give (down, refused, not an account) vaults the token for no user rather than asking again.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections import OrderedDict
from xml.etree import ElementTree
from dataclasses import astuple, dataclass

import aiohttp
from mitmproxy import ctx, http

from projectionist.vault import SURROGATE_PREFIX, VaultEntry, is_surrogate, upsert_plex_user

from . import binding, flowinfo
from .credentials import CredentialStore
from .local_responses import misdirected, unauthorized
from .peers import Peers
from .router import Router
from .rules_watch import RulesWatcher

log = logging.getLogger(__name__)

PLEX = "plex"  # vault kind of Plex account and server tokens
TOKEN = "X-Plex-Token"
_SEGMENT = re.compile(r"^/video/:/transcode/universal/session/(?P<sid>[^/]+)/")
_SESSION_START = re.compile(r"^/video/:/transcode/universal/(decision|start\.mpd|start\.m3u8)$")
_XML_TOKEN_ATTR = re.compile(rb'\b(authToken|accessToken)="([^"]+)"')
_XML_CONNECTION_URI = re.compile(rb'(<[Cc]onnection\b[^>]*?\buri=")([^"]+)(")')
_XML_RESOURCE = re.compile(rb'<\w+\b[^>]*?\bclientIdentifier="([^"]*)"[^>]*>')
_XML_PROVIDES = re.compile(rb'\bprovides="([^"]*)"')
_TOKEN_FIELDS = ("authToken", "accessToken")
_EMBEDDED_SURROGATE = re.compile(re.escape(SURROGATE_PREFIX) + r"[A-Za-z0-9_-]{20,}")


@dataclass(frozen=True)
class TranscodeSession:
    real: str
    user_id: int | None
    destination: tuple[str, int]  # the segments' token goes only where the session was started


class PlexTokens:
    def __init__(self, store: CredentialStore, watcher: RulesWatcher, router: Router, peers: Peers | None = None) -> None:
        self.store = store
        self.watcher = watcher
        self.router = router
        self.peers = peers  # shares the transcode sessions with the other processes
        # Transcode session id -> the token its decision/start request carried (bounded LRU).
        self.sessions: OrderedDict[str, TranscodeSession] = OrderedDict()
        self.max_sessions = 10_000
        # Real token -> its vaulting in progress, shared by the requests that present it meanwhile.
        self._adopting: dict[str, asyncio.Future[VaultEntry | None]] = {}
        # A configured server's address -> (its machine id or "", when to ask again after a failure).
        self._identities: dict[str, tuple[str, float]] = {}
        self._identity_lookups: dict[str, asyncio.Future[str]] = {}

    def load(self, loader) -> None:
        loader.add_option("projectionist_rewrite_plex_connections", bool, True,
                          "Point the connection URIs of the server a reverse listener serves (plex.tv resources) at it.")

    # --- requests ---------------------------------------------------------------------------------

    async def request(self, flow: http.HTTPFlow) -> None:
        info = flowinfo.get(flow)
        if info is None or info.match.credentials != PLEX or flow.response is not None:
            return
        request = flow.request
        kind = info.match.upstream.kind
        presented = [("query", request.query.get(TOKEN)), ("header", request.headers.get(TOKEN))]
        presented = [(where, value) for where, value in presented if value]
        if not presented:
            if not await self._token_for_segment(flow, info):
                self._refuse_if_required(flow, info)
            return
        users: set[int | None] = set()
        for where, value in presented:
            if is_surrogate(value):
                entry = await self.store.call(self.store.vault.resolve, value)
                if entry is None or entry.kind != PLEX or (kind == "plex-server" and entry.server_id is None):
                    # An account surrogate is no server token: a shared server never sees an account token.
                    flow.response = unauthorized(request, kind)
                    return
                await self._identify_configured(info)
                if not self._bound_here(flow, info, entry):
                    flow.response = misdirected(request, kind)
                    return
                real, users_entry = entry.real, entry.user_id
                info.credential, info.credential_ref = "vault", entry.id
            else:
                entry = await self._adopt_real_token(value)
                real, users_entry = value, entry.user_id if entry else None
                info.credential = info.credential or "client"
            users.add(users_entry)
            if where == "query":
                request.query[TOKEN] = real
            else:
                request.headers[TOKEN] = real
        # Surrogates inside other parameters, e.g. the image URL of /photo/:/transcode?url=...
        for name, value in list(request.query.items(multi=True)):
            for surrogate in set(_EMBEDDED_SURROGATE.findall(value)) if name != TOKEN else ():
                entry = await self.store.call(self.store.vault.resolve, surrogate)
                if entry is None or entry.kind != PLEX or (kind == "plex-server" and entry.server_id is None):
                    # An account surrogate is no server token: a shared server never sees an account token.
                    flow.response = unauthorized(request, kind)
                    return
                if not self._bound_here(flow, info, entry):
                    flow.response = misdirected(request, kind)
                    return
                users.add(entry.user_id)
                request.query[name] = request.query[name].replace(surrogate, entry.real)
        if len(users) > 1:  # surrogates of two different users in one request
            flow.response = unauthorized(request, kind)
            return
        info.user_id = users.pop()
        await self._remember_session(flow, info)

    async def _identify_configured(self, info: flowinfo.FlowInfo) -> None:
        """Which server the configured address is, before a server token goes there: a resources
        answer tells, but after a restart the player may come before one (its surrogates are in
        the vault), and until then another server's token would have been let through."""
        connections = self.router.plex_connections
        if info.match.upstream.kind != "plex-server" or info.server or info.upstream in connections.configured:
            return
        target = self.router.overrides.get(info.upstream) or self.watcher.rules.upstreams[info.upstream].base_url
        if target and (machine_id := await self._identity(target)):
            connections.configured.setdefault(info.upstream, machine_id)

    def _bound_here(self, flow: http.HTTPFlow, info: flowinfo.FlowInfo, entry: VaultEntry) -> bool:
        """A server's token goes only to that server: through the explicit proxy a `*.plex.direct`
        destination must be one of the connections plex.tv listed for the server the token belongs
        to (or the configured base_url); a reverse listener (and the configured address) serves its
        upstream's configured server, so once that server is identified no other server's token goes
        there. The router has already refused unknown destinations."""
        request = flow.request
        if info.match.upstream.kind != "plex-server":
            return True
        connections = self.router.plex_connections
        configured = connections.configured.get(info.upstream)
        if info.server:  # another server of the account, at one of its own connections
            if entry.server_id == info.server:
                return True
        elif (info.listener != "regular" or info.upstream in self.router.overrides
              or not binding.normal_host(request.host).endswith(binding.PLEX_DIRECT)
              or binding.is_configured_address(self.watcher.rules, info.upstream, request.host, request.port)):
            # Where the configured server is (its listener, its override or its base_url).
            if configured is None or entry.server_id == configured:
                return True
        elif entry.server_id in connections.servers_at(request.host, request.port):
            return True
        log.warning("refused a Plex token of another server (or an account token) for %s:%s", request.host, request.port)
        info.refused = "misdirected"
        return False

    def _refuse_if_required(self, flow: http.HTTPFlow, info: flowinfo.FlowInfo) -> bool:
        # Preflights carry no credentials by design; the upstream answers them.
        if flow.request.method != "OPTIONS":
            flow.response = unauthorized(flow.request, info.match.upstream.kind)
        return True

    async def _token_for_segment(self, flow: http.HTTPFlow, info: flowinfo.FlowInfo) -> bool:
        m = _SEGMENT.match(flow.request.path.split("?", 1)[0])
        session = self.sessions.get(m.group("sid")) if m else None
        if session is None and m and self.peers is not None and (shared := await self.peers.session(m.group("sid"))):
            session = self._keep_session(m.group("sid"), TranscodeSession(*shared))  # started through another process
        if session is None or session.destination != (flow.request.host, flow.request.port):
            return False
        flow.request.query[TOKEN] = session.real
        info.user_id, info.credential = session.user_id, "vault"
        return True

    async def _remember_session(self, flow: http.HTTPFlow, info: flowinfo.FlowInfo) -> None:
        request = flow.request
        sid = request.query.get("session")
        if sid and _SESSION_START.match(request.path.split("?", 1)[0]):
            session = self._keep_session(sid, TranscodeSession(request.query.get(TOKEN) or request.headers.get(TOKEN),
                                                               info.user_id, (request.host, request.port)))
            if self.peers is not None:  # before the start request goes on: its segments may reach another process
                await self.peers.share_session(sid, *astuple(session))

    def _keep_session(self, sid: str, session: TranscodeSession) -> TranscodeSession:
        self.sessions[sid] = session
        self.sessions.move_to_end(sid)
        while len(self.sessions) > self.max_sessions:
            self.sessions.popitem(last=False)
        return session

    async def _adopt_real_token(self, real: str) -> VaultEntry | None:
        """A real token from a client: known already, or vaulted now for the responses to come."""
        entry = await self.store.call(self.store.vault.find_real, PLEX, real)
        if entry is not None:
            return entry
        pending = self._adopting.get(real)
        if pending is None:
            pending = self._adopting[real] = asyncio.ensure_future(self._vault_real_token(real))
            pending.add_done_callback(lambda _: self._adopting.pop(real, None))
        return await asyncio.shield(pending)

    async def _vault_real_token(self, real: str) -> VaultEntry | None:
        user_id = await self._user_for_account_token(real)
        await self.store.call(self.store.vault.surrogate_for, PLEX, real, user_id)
        return await self.store.call(self.store.vault.find_real, PLEX, real)

    # --- responses --------------------------------------------------------------------------------

    async def response(self, flow: http.HTTPFlow) -> None:
        info = flowinfo.get(flow)
        response = flow.response
        if (info is None or response is None or response.stream or info.match.upstream.kind != "plex-tv"
                or not response.raw_content):
            return
        content_type = response.headers.get("content-type", "")
        if "json" in content_type:
            await self._rewrite_json(flow, info)
        elif "xml" in content_type:
            await self._rewrite_xml(flow, info)
        if self.peers is not None:  # the connections learned are in Redis before the player sees them
            await self.peers.written()

    async def _rewrite_json(self, flow: http.HTTPFlow, info: flowinfo.FlowInfo) -> None:
        try:
            body = json.loads(flow.response.content)
        except ValueError:
            return
        servers: dict[str, list[dict]] = {}
        for node in _walk(body):  # the servers' real connections, before they are pointed at us
            if _is_server(node.get("provides"), node.get("clientIdentifier")) and isinstance(node.get("connections"), list):
                servers[node["clientIdentifier"]] = [c for c in node["connections"] if isinstance(c, dict)]
                self.router.plex_connections.learn(node["clientIdentifier"], servers[node["clientIdentifier"]])
        listeners = await self._listener_urls(servers) if servers else {}
        if not _has_token_field(body):
            return
        owner = await self._owner(body, info)
        for node in _walk(body):
            for field in _TOKEN_FIELDS:
                if isinstance(node.get(field), str) and node[field] and not is_surrogate(node[field]):
                    node[field] = await self._surrogate(node[field], owner, field, node)
            # Only the server a reverse listener serves is pointed at it; every other server keeps
            # its own connections (reached through the explicit proxy: `*.plex.direct`).
            if (public := listeners.get(node.get("clientIdentifier"))) and "server" in str(node.get("provides", "")):
                for connection in node.get("connections") or []:
                    if isinstance(connection, dict) and "uri" in connection:
                        connection["uri"] = public
        flow.response.content = json.dumps(body, separators=(",", ":")).encode()

    async def _rewrite_xml(self, flow: http.HTTPFlow, info: flowinfo.FlowInfo) -> None:
        raw = flow.response.content
        servers = self._learn_xml_connections(raw) if b"<connection" in raw.lower() else {}
        listeners = await self._listener_urls(servers) if servers else {}
        tokens = {m.group(2).decode() for m in _XML_TOKEN_ATTR.finditer(raw)}
        tokens = {t for t in tokens if not is_surrogate(t)}
        if not tokens:
            return
        owner = info.user_id
        if owner is None:  # /api/v2/user in XML: the account is the one whose token it is
            owner = await self._user_for_account_token(next(iter(tokens)))
        parts = []
        # Each resource element with what follows it up to the next one: its token is vaulted for
        # that server, and its connections point at a listener only if that listener serves it.
        for segment, server_id in _xml_segments(raw):
            node = {"clientIdentifier": server_id} if server_id else {}
            surrogates = {}
            for m in _XML_TOKEN_ATTR.finditer(segment):
                field, real = m.group(1).decode(), m.group(2).decode()
                if real in tokens and (field, real) not in surrogates:
                    surrogates[field, real] = await self._surrogate(real, owner, field, node)
            segment = _XML_TOKEN_ATTR.sub(lambda m: m.group(1) + b'="' + surrogates.get(
                (m.group(1).decode(), m.group(2).decode()), m.group(2).decode()).encode() + b'"', segment)
            if public := listeners.get(server_id):
                segment = _XML_CONNECTION_URI.sub(lambda m: m.group(1) + public.encode() + m.group(3), segment)
            parts.append(segment)
        flow.response.content = b"".join(parts)

    def _learn_xml_connections(self, raw: bytes) -> dict[str, list[dict]]:
        try:
            root = ElementTree.fromstring(raw)
        except ElementTree.ParseError:
            return {}
        servers = {}
        for node in root.iter():
            if _is_server(node.get("provides"), node.get("clientIdentifier")):
                servers[node.get("clientIdentifier")] = [dict(c.attrib) for c in node.iter()
                                                         if c.tag.lower() == "connection"]
                self.router.plex_connections.learn(node.get("clientIdentifier"), servers[node.get("clientIdentifier")])
        return servers

    async def _owner(self, body, info: flowinfo.FlowInfo) -> int | None:
        """Whose tokens these are: the account described by the body (user, PIN), else the requester."""
        if isinstance(body, dict) and body.get("authToken") and (body.get("id") and body.get("username")):
            return await self.store.call(self._upsert_user, body)
        if isinstance(body, dict) and body.get("authToken") and "code" in body:  # a linked PIN
            return await self._user_for_account_token(body["authToken"])
        return info.user_id

    def _upsert_user(self, account: dict) -> int:
        return upsert_plex_user(self.store.vault.conn, str(account["id"]), account.get("username") or account.get("title") or "",
                                account.get("email"), account.get("thumb"))

    async def _surrogate(self, real: str, owner: int | None, field: str, node: dict) -> str:
        server_id = node.get("clientIdentifier") if field == "accessToken" else None
        return await self.store.call(self.store.vault.surrogate_for, PLEX, real, owner, server_id)

    async def _user_for_account_token(self, token: str) -> int | None:
        """Ask plex.tv whose account token this is (best effort: None when it cannot say)."""
        base = self.router.overrides.get(self._plextv_upstream() or "", "https://plex.tv")
        headers = {TOKEN: token, "Accept": "application/json", "X-Plex-Client-Identifier": "projectionist",
                   "X-Plex-Product": "Projectionist"}
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
                # Never followed: a redirect would carry the token to wherever it points.
                async with session.get(f"{base}/api/v2/user", headers=headers, allow_redirects=False) as r:
                    if r.status != 200:
                        return None
                    account = await r.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            log.warning("plex.tv account look-up failed: %s", type(exc).__name__)
            return None
        if not isinstance(account, dict) or not isinstance(account.get("id"), int | str) or account["id"] == "":
            log.warning("plex.tv account look-up: the answer describes no account")
            return None
        return await self.store.call(self._upsert_user, account)

    # --- where the player should connect ----------------------------------------------------------

    def _plextv_upstream(self) -> str | None:
        rules = self.watcher.rules
        return next((n for n, u in rules.upstreams.items() if u.kind == "plex-tv"), None) if rules else None

    def _public_url(self, name: str) -> str:
        """The address of an upstream's reverse listener, as the player should reach it."""
        upstream = self.watcher.rules.upstreams[name]
        if upstream.public_url:
            return upstream.public_url.rstrip("/")
        host = ctx.options.listen_host or "127.0.0.1"
        return f"http://{host if host not in ('0.0.0.0', '::') else '127.0.0.1'}:{upstream.listen}"

    async def _listener_urls(self, servers: dict[str, list[dict]]) -> dict[str, str]:
        """Machine id -> the public URL of the reverse listener that serves it, for the servers of
        this resources answer. A listener serves its upstream's base_url, and only the server
        found there: the one listing that address among its connections, else the one its
        `/identity` names (asked once, no token); an answer listing one server only (so nothing
        else can be mixed up) gives it the first listener, as before several servers were known."""
        rules = self.watcher.rules
        if rules is None:
            return {}
        connections = self.router.plex_connections
        out: dict[str, str] = {}
        for name, upstream in rules.upstreams.items():
            if upstream.kind != "plex-server" or not upstream.listen:
                continue
            target = self.router.overrides.get(name) or upstream.base_url
            address = binding.url_address(target) if target else None
            here = connections.servers_at(*address) & set(servers) if address else set()
            if len(here) == 1:
                connections.configured[name] = next(iter(here))
            elif connections.configured.get(name) not in servers and len(servers) > 1 and target:
                if machine_id := await self._identity(target):
                    connections.configured[name] = machine_id
            server = connections.configured.get(name)
            if server not in servers and len(servers) == 1 and not out:
                server = next(iter(servers))  # for this answer only: not remembered as the configured one
            if server in servers:
                out.setdefault(server, self._public_url(name))
        self._forget_unserved(rules, servers)
        return out if ctx.options.projectionist_rewrite_plex_connections else {}

    def _forget_unserved(self, rules, servers) -> None:
        """Servers no plex-server upstream reaches (`servers: {include, exclude}`) are no known
        connections: the router refuses their `*.plex.direct` names, so their tokens go nowhere."""
        connections = self.router.plex_connections
        plex = [(n, u) for n, u in rules.upstreams.items() if u.kind == "plex-server"]
        for server in servers:
            if not any(connections.configured.get(n) == server or u.servers.allows(server) for n, u in plex):
                connections.forget(server)

    async def _identity(self, target: str) -> str | None:
        """The machine identifier a Plex server's `/identity` (which needs no token) names; None when
        it does not answer (asked again a minute later at the earliest). Concurrent askers (a
        resources answer and the warmer's, say) share one request."""
        known = self._identities.get(target)
        if known is not None and (known[0] or known[1] > asyncio.get_running_loop().time()):
            return known[0] or None
        lookup = self._identity_lookups.get(target)
        if lookup is None:
            lookup = self._identity_lookups[target] = asyncio.ensure_future(self._fetch_identity(target))
            lookup.add_done_callback(lambda _: self._identity_lookups.pop(target, None))
        return await asyncio.shield(lookup) or None

    async def _fetch_identity(self, target: str) -> str:
        machine_id = ""
        try:
            connector = aiohttp.TCPConnector(resolver=binding.PlexDirectResolver())
            async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=5)) as session:
                async with session.get(target.rstrip("/") + "/identity", headers={"Accept": "application/json"},
                                       allow_redirects=False) as r:
                    if r.status == 200:
                        body = await r.json(content_type=None)
                        machine_id = str((body.get("MediaContainer") or {}).get("machineIdentifier") or "")
        except (aiohttp.ClientError, TimeoutError, ValueError, AttributeError) as exc:
            log.warning("Plex /identity of a configured server failed: %s", type(exc).__name__)
        self._identities[target] = (machine_id, asyncio.get_running_loop().time() + 60)
        return machine_id


def _xml_segments(raw: bytes):
    """(bytes, machine id or None): the document cut before each element naming a clientIdentifier;
    the id is given for servers only (a PIN or a player names its own client, no server)."""
    starts = [m.start() for m in _XML_RESOURCE.finditer(raw)]
    bounds = [0, *starts, len(raw)]
    for begin, end in zip(bounds, bounds[1:]):
        segment = raw[begin:end]
        m = _XML_RESOURCE.match(segment)
        provides = _XML_PROVIDES.search(m.group(0)) if m else None
        yield segment, (m.group(1).decode() if provides and b"server" in provides.group(1) else None)


def _is_server(provides, client_identifier) -> bool:
    return isinstance(client_identifier, str) and bool(client_identifier) and "server" in str(provides or "")


def _has_token_field(body) -> bool:
    return any(isinstance(node.get(f), str) and node.get(f) for node in _walk(body) for f in _TOKEN_FIELDS)


def _walk(value):
    """Every dict inside a JSON document."""
    if isinstance(value, dict):
        yield value
        for child in value.values():
            yield from _walk(child)
    elif isinstance(value, list):
        for child in value:
            yield from _walk(child)

