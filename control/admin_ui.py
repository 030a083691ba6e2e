"""The admin pages (`/admin`, `/admin/users`, `/admin/cache`, `/admin/limits`, `/admin/jobs`) and the
JSON views only they need: what is playing now, each rate limit with its recent use, and whether
each service's listener answers.

The pages are one static shell (control/static/admin.html and its script and style, no build step,
no inline script: the strict CSP holds); the script picks the tab from the URL and talks to the JSON
API (`/api/admin/*`, `/api/cache/*`, `/api/jobs`, `/api/setup`) with the session's CSRF token on
every write. The gate is here, before the page is sent: a browser without a session gets a page
that links to the sign-in, a signed-in user who is not an admin a 403 page.
"""

from __future__ import annotations

import asyncio
import html
import sqlite3
import time
from datetime import UTC, datetime

from aiohttp import web
from pydantic import BaseModel, Field

from projectionist.live_activity import playing_now

from .keys import CONFIG, LIVE_RULES
from .openapi import ADMIN, Api, Call
from .page import STATIC_DIR
from .sessions import apply_renewal, authenticate
from .usage import query

api = Api("admin")
routes = api.routes
pages = web.RouteTableDef()

TABS = ("users", "cache", "limits", "jobs")


def _gate_page(status: int, title: str, body: str) -> web.Response:
    text = ('<!doctype html><html lang="en"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f'<title>{html.escape(title)} - Projectionist admin</title>'
            '<link rel="stylesheet" href="/static/admin.css"></head>'
            f'<body><main class="gate"><h1>{html.escape(title)}</h1>{body}</main></body></html>')
    return web.Response(status=status, text=text, content_type="text/html", headers={"Cache-Control": "no-store"})


async def _admin_page(request: web.Request) -> web.StreamResponse:
    identity = await authenticate(request)
    if identity is None:
        response = _gate_page(401, "Sign in to continue",
                              '<p>The admin pages are for admins signed in with Plex.</p>'
                              '<p><a id="sign-in-link" href="/">Sign in on the settings page</a>, '
                              'then come back here.</p>')
    elif not identity.is_admin:
        response = _gate_page(403, "Admins only",
                              f'<p>You are signed in as <strong>{html.escape(identity.username)}</strong>, '
                              'who is not an admin of this Projectionist.</p>'
                              '<p><a href="/">Back to your settings</a></p>')
    else:
        response = web.FileResponse(STATIC_DIR / "admin.html", headers={"Cache-Control": "no-cache"})
    apply_renewal(request, response)
    return response


pages.get("/admin")(_admin_page)
for _tab in TABS:
    pages.get(f"/admin/{_tab}")(_admin_page)


# --- what is playing now -------------------------------------------------------------------------

class ActivePlay(BaseModel):
    play_id: int
    user_id: int | None
    username: str
    title: str
    media_type: str | None
    state: str = Field(description="The player's last reported state: playing, paused, buffering.")
    position_ms: int | None
    duration_ms: int | None
    progress_pct: float | None
    delivery: str | None = Field(description="`transcode` when the user's recent Plex requests went to the "
                                             "transcoder, `direct` when they fetched the file's parts, else null.")
    client: str | None = Field(description="Product and device the player reported (no identifier).")
    started_at: datetime
    last_seen_at: datetime


class Activity(BaseModel):
    now: datetime
    plays: list[ActivePlay]


def activity(conn: sqlite3.Connection, now: float) -> Activity:
    plays = [ActivePlay(**{**row, "started_at": datetime.fromtimestamp(row["started_at"], UTC),
                           "last_seen_at": datetime.fromtimestamp(row["last_seen_at"], UTC)})
             for row in playing_now(conn, now)]
    return Activity(now=datetime.fromtimestamp(now, UTC), plays=plays)


@api.get("/api/admin/activity", summary="What is playing now: user, title, progress, direct or transcode, client",
         access=ADMIN, response=Activity)
async def admin_activity(request: web.Request, call: Call) -> Activity:
    """Open plays of the viewing history (the player's timeline reports through the proxy) with a report in
    the last two minutes; refreshed as the reports arrive (a few per second while playing)."""
    return await query(request.app, activity, time.time())

_admin_page.documented_statuses = {401: "A page linking to the sign-in (no session)",  # type: ignore[attr-defined]
                                   403: "A page saying admins only (not an admin)"}


# --- rate limits and their recent use ------------------------------------------------------------

class LimitWindowQuery(BaseModel):
    model_config = {"extra": "forbid"}
    hours: int = Field(default=24, ge=1, le=24 * 30, description="How many hours of events to count.")


class LimitUse(BaseModel):
    name: str
    rate_per_second: float
    burst: int
    per: str
    when_credential: str
    max_wait_seconds: float
    upstreams: list[str] = Field(description="Upstreams that take this limit (rules.yaml upstreams.*.limits).")
    routes: list[str] = Field(description="Routes that take it besides (rules.yaml routes[].limits).")
    forwarded_last_minute: int = Field(description="Requests of those upstreams and routes that reached the "
                                                   "upstream (not cache hits) in the last 60 s.")
    forwarded: int = Field(description="The same over the window.")
    queued: int
    refused: int
    stale: int = Field(description="Over the limit, answered from stale cache data instead.")
    waited_ms_max: float | None
    last_event_at: datetime | None


class OtherLimitEvents(BaseModel):
    rule: str = Field(description="`throttle:<route>`, `pause` (an upstream's Retry-After), or another rule.")
    outcome: str
    events: int


class Limits(BaseModel):
    since_hours: int
    rules_problem: str | None
    limits: list[LimitUse]
    other: list[OtherLimitEvents]


def limit_use(conn: sqlite3.Connection, model, hours: int, now: float) -> tuple[list[LimitUse], list[OtherLimitEvents]]:
    since = now - hours * 3600
    since_hour = time.strftime("%Y-%m-%dT%H:00", time.gmtime(since))
    events: dict[tuple[str, str], tuple[int, float]] = {
        (rule, outcome): (n, waited) for rule, outcome, n, waited in conn.execute(
            "SELECT rule, outcome, sum(events), max(waited_ms_max) FROM rate_limit_hourly WHERE hour >= ? "
            "GROUP BY rule, outcome", (since_hour,))}
    last = dict(conn.execute("SELECT rule, max(ts) FROM rate_limit_events WHERE ts >= ? GROUP BY rule", (since,)))
    # Forwarded requests per upstream, route and credential kind (a limit may take only one kind).
    forwarded = ("SELECT upstream, route, credential, count(*) FROM usage_events WHERE ts >= ? AND cache != 'hit' "
                 "AND status IS NOT NULL AND status != 429 GROUP BY upstream, route, credential")
    recent = conn.execute(forwarded, (now - 60,)).fetchall()
    window = conn.execute(forwarded, (since,)).fetchall()
    out = []
    for name, limit in (model.limits if model is not None else {}).items():
        ups = sorted(u for u, up in model.upstreams.items() if name in up.limits)
        rts = sorted(r.name for r in model.routes if name in r.limits and r.upstream not in ups)

        def count(rows, kind=limit.when_credential) -> int:
            return sum(n for upstream, route, credential, n in rows
                       if (upstream in ups or route in rts) and kind in ("any", credential))
        waits = [events[(name, o)][1] for o in ("queued", "refused", "stale") if (name, o) in events]
        out.append(LimitUse(
            name=name, rate_per_second=limit.rate, burst=limit.burst, per=limit.per,
            when_credential=limit.when_credential, max_wait_seconds=limit.max_wait, upstreams=ups, routes=rts,
            forwarded_last_minute=count(recent), forwarded=count(window),
            queued=events.get((name, "queued"), (0, 0))[0], refused=events.get((name, "refused"), (0, 0))[0],
            stale=events.get((name, "stale"), (0, 0))[0], waited_ms_max=round(max(waits), 1) if waits else None,
            last_event_at=datetime.fromtimestamp(last[name], UTC) if name in last else None))
    named = {limit.name for limit in out}
    other = [OtherLimitEvents(rule=rule, outcome=outcome, events=n)
             for (rule, outcome), (n, _) in sorted(events.items()) if rule not in named]
    return out, other


@api.get("/api/admin/limits", summary="Each rate limit of rules.yaml with its recent use, queued and refused counts",
         access=ADMIN, query=LimitWindowQuery, response=Limits)
async def admin_limits(request: web.Request, call: Call) -> Limits:
    """The limits as rules.yaml declares them now (rate in requests per second, burst, per, max_wait), the
    requests that reached their upstreams (cache hits never take a slot), and the `rate_limit_events` of the
    window: queued (waited for a slot), refused (429) and stale (answered from the cache instead)."""
    live = request.app[LIVE_RULES]
    rules = await live.get()
    limits, other = await query(request.app, limit_use, rules.model if rules is not None else None,
                                call.query.hours, time.time())
    return Limits(since_hours=call.query.hours, rules_problem=live.problem, limits=limits, other=other)


# --- the services' listeners ---------------------------------------------------------------------

class ServiceCheck(BaseModel):
    name: str
    address: str
    ok: bool
    latency_ms: float | None = None
    error: str | None = None


class Services(BaseModel):
    services: list[ServiceCheck]


SERVICE_TIMEOUT = 2.0


async def _tcp_check(name: str, host: str, port: int) -> ServiceCheck:
    """Whether something accepts connections there: the proxy and the dashboard run in other processes
    (or threads) this one cannot ask, and a listening socket is what a player or a browser needs."""
    address = f"{host}:{port}"
    started = time.perf_counter()
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), SERVICE_TIMEOUT)
    except (OSError, TimeoutError) as exc:
        return ServiceCheck(name=name, address=address, ok=False,
                            error="timeout" if isinstance(exc, TimeoutError) else (exc.strerror or type(exc).__name__))
    writer.close()
    return ServiceCheck(name=name, address=address, ok=True, latency_ms=round((time.perf_counter() - started) * 1000, 2))


@api.get("/api/admin/services", summary="Whether each service's listener accepts connections (proxy, Plex "
         "listeners, dashboard)", access=ADMIN, response=Services)
async def admin_services(request: web.Request, call: Call) -> Services:
    config = request.app[CONFIG]
    host = "127.0.0.1" if config.host in ("0.0.0.0", "", "::") else config.host  # noqa: S104  (a wildcard bind)
    targets = [("explicit proxy", config.proxy_port)]
    rules = await request.app[LIVE_RULES].get()
    for name, up in (rules.model.upstreams.items() if rules is not None else ()):
        if up.kind == "plex-server" and up.listen:
            targets.append((f"Plex listener ({name})", up.listen))
    if config.dashboard_port:
        targets.append(("dashboard", config.dashboard_port))
    return Services(services=list(await asyncio.gather(*(_tcp_check(n, host, p) for n, p in targets))))


# --- refused sign-ins (who is admitted is Plex's sharing, not a list here) ----------------------

class RefusalReason(BaseModel):
    reason: str = Field(description="Why the sign-in was refused (admission.py), e.g. `not_shared`, `disabled`.")
    refusals: int
    last_hour: str = Field(description="The last hour (UTC, `YYYY-MM-DDTHH:00`) with a refusal for this reason.")


class SignInRefusals(BaseModel):
    since_hours: int
    reasons: list[RefusalReason]


def sign_in_refusals(conn: sqlite3.Connection, hours: int, now: float) -> SignInRefusals:
    since_hour = time.strftime("%Y-%m-%dT%H:00", time.gmtime(now - hours * 3600))
    return SignInRefusals(since_hours=hours, reasons=[
        RefusalReason(reason=r[0], refusals=r[1], last_hour=r[2]) for r in conn.execute(
            "SELECT reason, sum(refusals), max(hour) FROM sign_in_refusals WHERE hour >= ? GROUP BY reason "
            "ORDER BY sum(refusals) DESC", (since_hour,))])


@api.get("/api/admin/sign-in-refusals", summary="Refused sign-ins per reason (counts only, no accounts)",
         access=ADMIN, query=LimitWindowQuery, response=SignInRefusals)
async def admin_sign_in_refusals(request: web.Request, call: Call) -> SignInRefusals:
    return await query(request.app, sign_in_refusals, call.query.hours, time.time())
