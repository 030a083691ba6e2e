"""Datasette plugin hooks that let the datasette-dashboards plugin draw the dashboard home
(`/-/dashboards/home`) while arbitrary SQL stays off.

datasette-dashboards fetches each chart's rows from `/<db>.json?sql=<the chart's query>` and
refuses to render a dashboard whose database denies `execute-sql`. The dashboard denies SQL on
purpose (it bypasses every table permission; projectionist/dashboard.py), so:

- each chart's `query` in datasette_metadata.yml is the *name* of a canned query, and a
  `/<db>.json?sql=NAME` request is answered as that canned query (`/<db>/NAME.json`, the other
  arguments kept as its parameters). Nothing new can run: a canned query's page answers the same.
  Any other `?sql=` reaches Datasette unchanged, which refuses it.
- `execute-sql` is granted to the admin only while Datasette renders a `/-/dashboards/...` page,
  whose SQL all comes from the metadata (the filters' option lists, checked for secret tables at
  start-up by `metadata_problems`); a contextvar set around that one request says so.
"""

from __future__ import annotations

import contextvars
import re
from urllib.parse import parse_qsl, urlencode

from datasette import hookimpl

from .dashboard import ADMIN_USER, DATABASE
from .live_activity import DASHBOARD_QUERIES

_DASHBOARD_PAGE = re.compile(r"^/-/dashboards/[^/]+(/[^/]+)?(/embed)?$")
_rendering_dashboard: contextvars.ContextVar[bool] = contextvars.ContextVar("rendering_dashboard", default=False)


def canned_query_for(path: str, query_string: bytes, canned: set[str]) -> tuple[str, bytes] | None:
    """(path, query string) of the canned query a chart's `?sql=NAME` request names, else None."""
    if path != f"/{DATABASE}.json":
        return None
    args = parse_qsl(query_string.decode("latin-1"), keep_blank_values=True)
    names = [value for key, value in args if key == "sql"]
    if len(names) != 1 or names[0] not in canned:
        return None
    rest = [(key, value) for key, value in args if key != "sql"]
    return f"/{DATABASE}/{names[0]}.json", urlencode(rest).encode("latin-1")


def charts(app, datasette):
    async def wrapped(scope, receive, send):
        if scope["type"] != "http":
            return await app(scope, receive, send)
        path = scope.get("path", "")
        target = None
        if path == f"/{DATABASE}.json":
            canned = set(datasette.metadata("queries", database=DATABASE) or {}) | set(DASHBOARD_QUERIES)
            target = canned_query_for(path, scope.get("query_string", b""), canned)
        if target is not None:
            new_path, new_query = target
            scope = dict(scope, path=new_path, raw_path=new_path.encode(), query_string=new_query)
            return await app(scope, receive, send)
        if _DASHBOARD_PAGE.match(path):
            token = _rendering_dashboard.set(True)
            try:
                return await app(scope, receive, send)
            finally:
                _rendering_dashboard.reset(token)
        return await app(scope, receive, send)
    return wrapped


@hookimpl
def asgi_wrapper(datasette):
    return lambda app: charts(app, datasette)


# trylast: Datasette keeps the last answer that is not None, and its own default (allow_sql: false
# says False) must come first for this one exception to count.
@hookimpl(trylast=True)
def permission_allowed(actor, action, resource):
    if (action == "execute-sql" and resource == DATABASE and _rendering_dashboard.get()
            and (actor or {}).get("id") == ADMIN_USER):
        return True
    return None
