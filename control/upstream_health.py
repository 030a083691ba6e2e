"""Is each Plex server of rules.yaml reachable? Checked at start and every `INTERVAL` seconds.

`/health` reports `degraded` (still HTTP 200: the control plane itself works) with the failing
upstream, why, and since when; the setup page runs the same check live. A Plex server answers
`/identity` without a token, so the check needs no secret. A task of its own rather than a job
of control/jobs.py: the result is this process's state, and wants no lease or `job_runs` row
every 30 seconds.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from urllib.parse import urlsplit, urlunsplit

import aiohttp
from aiohttp import web

from projectionist.rules import Rules
from projectionist.config import parse_overrides

from .keys import CONFIG, HTTP, LIVE_RULES, UPSTREAM_HEALTH

log = logging.getLogger("control.upstreams")

INTERVAL = 30.0
TIMEOUT = aiohttp.ClientTimeout(total=5)


@dataclass
class Check:
    ok: bool
    url: str  # without user information
    error: str | None = None  # refused | timeout | tls | dns | http | not-plex | unreachable
    detail: str | None = None  # what to do about it, or what answered
    version: str | None = None
    machine_identifier: str | None = None
    since: str | None = None  # when the current state (ok or not) began, UTC ISO 8601

    def as_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


def shown(url: str) -> str:
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def plex_servers(rules: Rules, overrides: tuple[str, ...]) -> dict[str, str]:
    """upstream name -> where its Plex server is reached (an override wins, as in the proxy)."""
    sent = parse_overrides(overrides)
    return {name: sent.get(name) or up.base_url for name, up in rules.upstreams.items()
            if up.kind == "plex-server" and (sent.get(name) or up.base_url)}


async def check_plex(session: aiohttp.ClientSession, base_url: str) -> Check:
    url = base_url.rstrip("/") + "/identity"
    where = shown(base_url)
    try:
        async with session.get(url, headers={"Accept": "application/json"}, timeout=TIMEOUT,
                               allow_redirects=False) as response:
            if response.status != 200:
                return Check(False, where, "http", f"{where}/identity answered HTTP {response.status}; "
                             "is upstreams.plex.base_url a Plex Media Server?")
            try:
                container = (await response.json(content_type=None))["MediaContainer"]
                machine, version = container["machineIdentifier"], container["version"]
            except (ValueError, KeyError, TypeError):
                return Check(False, where, "not-plex", f"{where}/identity did not answer like a Plex Media Server")
            return Check(True, where, version=str(version), machine_identifier=str(machine))
    except (aiohttp.ClientConnectorCertificateError, aiohttp.ClientSSLError, ssl.SSLError) as exc:
        return Check(False, where, "tls", f"TLS to {where} failed ({_reason(exc)}); use http:// or a certificate "
                     "this machine trusts")
    except aiohttp.ClientConnectorDNSError:
        return Check(False, where, "dns", f"the name in {where} does not resolve; check upstreams.plex.base_url")
    except aiohttp.ClientConnectorError as exc:
        if isinstance(exc.os_error, ConnectionRefusedError):
            return Check(False, where, "refused", f"connection refused at {where}: is Plex Media Server running "
                         "there, and is upstreams.plex.base_url in rules.yaml right?")
        return Check(False, where, "unreachable", f"cannot connect to {where} ({_reason(exc)})")
    except TimeoutError:
        return Check(False, where, "timeout", f"no answer from {where} within {TIMEOUT.total:.0f} s: "
                     "a firewall, or the wrong address?")
    except aiohttp.ClientError as exc:
        return Check(False, where, "unreachable", f"{where}: {_reason(exc)}")


def _reason(exc: BaseException) -> str:
    return type(exc).__name__ if not str(exc) else str(exc).split("\n")[0][:200]


class UpstreamHealth:
    """The latest check per Plex upstream, each with the time its current state began."""

    def __init__(self) -> None:
        self.checks: dict[str, Check] = {}
        self.checked = False  # the first round is done (the CLI's banner waits for it)

    def record(self, name: str, check: Check) -> Check:
        previous = self.checks.get(name)
        if previous is not None and previous.ok == check.ok and previous.error == check.error:
            check.since = previous.since
        else:
            check.since = datetime.now(UTC).isoformat(timespec="seconds")
            if not check.ok:
                log.warning("upstream %s unreachable: %s", name, check.detail)
            elif previous is not None:
                log.info("upstream %s reachable again", name)
        self.checks[name] = check
        return check

    def failing(self) -> dict[str, dict]:
        return {name: c.as_dict() for name, c in self.checks.items() if not c.ok}


async def check_all(app: web.Application) -> dict[str, Check]:
    rules = await app[LIVE_RULES].get()
    servers = plex_servers(rules, app[CONFIG].upstream_overrides) if rules is not None else {}
    results = await asyncio.gather(*(check_plex(app[HTTP], url) for url in servers.values()))
    health = app[UPSTREAM_HEALTH]
    for name in set(health.checks) - set(servers):  # removed from rules.yaml
        del health.checks[name]
    recorded = {name: health.record(name, check) for name, check in zip(servers, results)}
    health.checked = True
    return recorded


async def monitor(app: web.Application) -> AsyncIterator[None]:
    """Cleanup context (after the HTTP client): checks in the background, never delaying start-up."""
    app[UPSTREAM_HEALTH] = UpstreamHealth()

    async def loop() -> None:
        while True:
            try:
                await check_all(app)
            except Exception:
                log.exception("upstream check failed")
            await asyncio.sleep(INTERVAL)

    task = asyncio.create_task(loop(), name="upstream-health")
    yield
    task.cancel()
