"""`proxy.anonymous`: what a TMDB or Trakt request without a live surrogate of an enabled user gets.

The server's TMDB key and Trakt app credentials are lent only to the server's own people. A request
that carries none of a user's surrogates is anonymous: `forward` sends it on as the client sent it
(its own key works, the server's is never added, and no answer the server's key fetched is served
to it from the cache), `refuse` answers 401 in the upstream's format without calling it, `lend`
(the behaviour before issue 17) injects the server's credentials anyway.
"""

from __future__ import annotations

from mitmproxy import http

from projectionist.metrics import ANONYMOUS_REQUESTS

from . import flowinfo
from .local_responses import unauthorized
from .rules_watch import RulesWatcher

CREDENTIAL = "anonymous"  # usage_events.credential of such a request: nothing of the server's was used


def mode(watcher: RulesWatcher) -> str:
    rules = watcher.rules
    return rules.model.proxy.anonymous if rules is not None else "forward"


def handle(flow: http.HTTPFlow, info: flowinfo.FlowInfo, watcher: RulesWatcher) -> bool:
    """An anonymous request: True when it is done with (forwarded untouched, or refused); False
    when `lend` says the server's credentials go in."""
    chosen = mode(watcher)
    ANONYMOUS_REQUESTS.labels(info.upstream, {"forward": "forwarded", "refuse": "refused"}.get(chosen, "lent")).inc()
    if chosen == "lend":
        return False
    info.credential = CREDENTIAL
    if chosen == "refuse":
        info.refused = CREDENTIAL
        flow.response = unauthorized(flow.request, info.match.upstream.kind)
    return True
