"""Datasette plugin hooks that guard the dashboard: password guessing is throttled, and a query
cut off by the time limit is a clear 400 on every format (Datasette's CSV path answered 500).

The dashboard's login is HTTP Basic (datasette-auth-passwords), checked on every request (its
`/-/login` form is behind it too). Each attempt that carries credentials is counted per client
address and per account: after COUNT // 3 failures every further attempt from that address waits
(exponentially, up to `MAX_DELAY`), and after COUNT failures from one address (or 3 x COUNT on one
account from anywhere) within SECONDS the attempts get a 429 that says how long the lock-out lasts
(`PROJECTIONIST_DASHBOARD_LOGIN_LIMIT=COUNT/SECONDS`, default 10/900). A success clears its
address. Failures and lock-outs are counted per hour in `dashboard_login_failures` (no address, no
user name), which the dashboard shows.

It wraps Datasette outermost (`trylast`), so the auth plugin's 401s pass through it.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import math
import os
import time
from collections import deque
from dataclasses import dataclass, field

from datasette import hookimpl
from datasette.database import QueryInterrupted
from datasette.utils.asgi import Response

from .dashboard import DATABASE

LIMIT_ENV = "PROJECTIONIST_DASHBOARD_LOGIN_LIMIT"
IP_LOCKOUT_AFTER = 10
WINDOW = 900.0  # seconds over which failures count; a lock-out lasts as long after the last failure
DELAY_AFTER = IP_LOCKOUT_AFTER // 3  # failures from one address before each attempt waits
MAX_DELAY = 16.0
ACCOUNT_LOCKOUT_AFTER = 3 * IP_LOCKOUT_AFTER
MAX_KEYS = 10_000


@dataclass
class LoginThrottle:
    window: float = WINDOW
    lockout: float = WINDOW
    delay_after: int = DELAY_AFTER
    max_delay: float = MAX_DELAY
    ip_lockout_after: int = IP_LOCKOUT_AFTER
    account_lockout_after: int = ACCOUNT_LOCKOUT_AFTER
    _failures: dict[str, deque[float]] = field(default_factory=dict)

    def _recent(self, key: str, now: float) -> deque[float]:
        times = self._failures.get(key)
        if times is None:
            return deque()
        while times and times[0] <= now - self.window:
            times.popleft()
        if not times:
            del self._failures[key]
        return times

    def locked_for(self, ip: str, account: str, now: float) -> float:
        """Seconds left on a lock-out of this address or account (0: none)."""
        left = 0.0
        for key, limit in ((f"ip:{ip}", self.ip_lockout_after), (f"account:{account}", self.account_lockout_after)):
            times = self._recent(key, now)
            if len(times) >= limit:
                left = max(left, times[-1] + self.lockout - now)
        return max(0.0, left)

    def delay(self, ip: str, now: float) -> float:
        failures = len(self._recent(f"ip:{ip}", now))
        if failures < self.delay_after:
            return 0.0
        return min(self.max_delay, 2.0 ** (failures - self.delay_after))

    def failed(self, ip: str, account: str, now: float) -> bool:
        """Count a failure; True when it starts a lock-out."""
        locked_before = self.locked_for(ip, account, now) > 0
        for key in (f"ip:{ip}", f"account:{account}"):
            self._failures.setdefault(key, deque()).append(now)
        while len(self._failures) > MAX_KEYS:  # the oldest keys go first (dicts keep insertion order)
            del self._failures[next(iter(self._failures))]
        return not locked_before and self.locked_for(ip, account, now) > 0

    def succeeded(self, ip: str) -> None:
        self._failures.pop(f"ip:{ip}", None)


def _basic_user(scope) -> str | None:
    for name, value in scope.get("headers") or ():
        if name == b"authorization":
            kind, _, encoded = value.decode("latin-1").partition(" ")
            if kind.lower() != "basic":
                return None
            try:
                return base64.b64decode(encoded.strip(), validate=True).decode("utf-8", "replace").partition(":")[0]
            except (binascii.Error, ValueError):
                return ""
    return None


async def _refuse(send, seconds: float) -> None:
    minutes = max(1, math.ceil(seconds / 60))
    body = (f"Too many failed sign-ins. Try again in {minutes} minute{'s' if minutes != 1 else ''}.\n").encode()
    await send({"type": "http.response.start", "status": 429, "headers": [
        (b"content-type", b"text/plain; charset=utf-8"), (b"retry-after", str(math.ceil(seconds)).encode()),
        (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def _count(datasette, lockout: bool) -> None:
    """One more failure (and lock-out) in this hour's row; queued, not awaited."""
    try:
        database = datasette.get_database(DATABASE)
    except KeyError:
        return
    sql = ("INSERT INTO dashboard_login_failures (hour, failures, lockouts) "
           "VALUES (strftime('%Y-%m-%d %H:00:00', 'now'), 1, ?) "
           "ON CONFLICT(hour) DO UPDATE SET failures = failures + 1, lockouts = lockouts + excluded.lockouts")
    asyncio.ensure_future(database.execute_write(sql, [int(lockout)], block=False))


def guard(app, datasette, throttle: LoginThrottle):
    async def guarded(scope, receive, send):
        if scope["type"] != "http":
            return await app(scope, receive, send)
        account = _basic_user(scope)
        if account is None:  # no credentials: not an attempt
            return await app(scope, receive, send)
        ip = (scope.get("client") or ("unknown",))[0]
        now = time.monotonic()
        locked = throttle.locked_for(ip, account, now)
        if locked > 0:
            return await _refuse(send, locked)
        delay = throttle.delay(ip, now)
        if delay:
            await asyncio.sleep(delay)
        status = None

        async def watching_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        await app(scope, receive, watching_send)
        if status == 401:
            _count(datasette, throttle.failed(ip, account, time.monotonic()))
        elif status is not None and status < 400:
            throttle.succeeded(ip)
    return guarded


def throttle_from_env() -> LoginThrottle:
    value = os.environ.get(LIMIT_ENV, "").strip()
    if not value:
        return LoginThrottle()
    count, _, seconds = value.partition("/")
    try:
        count, seconds = int(count), float(seconds or WINDOW)
    except ValueError:
        count = seconds = 0
    if count < 1 or seconds <= 0:
        raise ValueError(f"{LIMIT_ENV}={value!r} is not valid: use COUNT/SECONDS with both positive (e.g. 10/900)")
    return LoginThrottle(window=seconds, lockout=seconds, ip_lockout_after=count, account_lockout_after=3 * count,
                         delay_after=max(1, count // 3))


@hookimpl(trylast=True)
def asgi_wrapper(datasette):
    throttle = throttle_from_env()
    return lambda app: guard(app, datasette, throttle)


@hookimpl
def handle_exception(datasette, request, exception):
    if isinstance(exception, QueryInterrupted):
        return Response.text("The query took longer than the dashboard allows; narrow its date range or filters.\n",
                             status=400)
