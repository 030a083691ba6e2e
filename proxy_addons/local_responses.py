"""Answers the proxy makes itself, shaped like the upstream's own.

Whatever the proxy answers without asking the upstream (a refused credential here; cache hits
and rate-limit answers later) must look like the upstream's answer, so that the frontend's error
handling works, and must carry the CORS headers the upstream would send for this `Origin`, or the
browser hides the answer from the page.
"""

from __future__ import annotations

import json

from mitmproxy import http

from .header_lookup import header

PLEX_SERVER_401 = b"<html><head><title>Unauthorized</title></head><body><h1>401 Unauthorized</h1></body></html>"
PLEX_TV_ERROR_JSON = {"errors": [{"code": 1001, "message": "User could not be authenticated", "status": 401}]}
PLEX_TV_ERROR_XML = (b'<?xml version="1.0" encoding="UTF-8"?>\n<errors>\n'
                     b'  <error code="1001" message="User could not be authenticated" status="401"/>\n</errors>\n')
TMDB_401 = {"status_code": 7, "status_message": "Invalid API key: You must be granted a valid key.", "success": False}
TRAKT_401 = {"error": "invalid_grant", "error_description": "The access token provided is invalid or has been revoked."}


def cors_headers(request: http.Request, upstream_kind: str) -> dict[str, str]:
    origin = header(request.headers, b"origin")
    if not origin:
        return {}
    if upstream_kind in ("tmdb", "tmdb-images", "trakt"):
        return {"Access-Control-Allow-Origin": "*"}
    # Plex servers and plex.tv echo the requesting origin.
    return {"Access-Control-Allow-Origin": origin, "Vary": "Origin",
            "Access-Control-Expose-Headers": "*"}


def unauthorized(request: http.Request, upstream_kind: str) -> http.Response:
    """401 in the upstream's own format, for a missing, unknown, revoked or mismatched credential."""
    wants_json = "json" in request.headers.get("Accept", "")
    if upstream_kind == "plex-server":
        body, content_type = PLEX_SERVER_401, "text/html"
    elif upstream_kind == "plex-tv":
        body, content_type = ((json.dumps(PLEX_TV_ERROR_JSON).encode(), "application/json") if wants_json
                              else (PLEX_TV_ERROR_XML, "application/xml"))
    elif upstream_kind == "tmdb":
        body, content_type = json.dumps(TMDB_401).encode(), "application/json;charset=utf-8"
    else:
        body, content_type = json.dumps(TRAKT_401).encode(), "application/json"
    return http.Response.make(401, body, {"Content-Type": content_type, **cors_headers(request, upstream_kind)})


MISDIRECTED = "Misdirected Request: this proxy sends requests for this host only to its configured address"


def misdirected(request: http.Request, upstream_kind: str) -> http.Response:
    """421 in the upstream's own format: the request's Host, target and SNI name different places."""
    wants_json = "json" in request.headers.get("Accept", "")
    if upstream_kind == "plex-server":
        body, content_type = (b"<html><head><title>Misdirected Request</title></head><body><h1>421 "
                              b"Misdirected Request</h1></body></html>"), "text/html"
    elif upstream_kind == "plex-tv":
        error = {"code": 1421, "message": MISDIRECTED, "status": 421}
        body, content_type = ((json.dumps({"errors": [error]}).encode(), "application/json") if wants_json else (
            (f'<?xml version="1.0" encoding="UTF-8"?>\n<errors>\n  <error code="1421" message="{MISDIRECTED}" '
             f'status="421"/>\n</errors>\n').encode(), "application/xml"))
    elif upstream_kind in ("tmdb", "tmdb-images"):
        body = json.dumps({"status_code": 421, "status_message": MISDIRECTED + ".", "success": False}).encode()
        content_type = "application/json;charset=utf-8"
    elif upstream_kind == "trakt":
        body, content_type = json.dumps({"error": "misdirected_request", "error_description": MISDIRECTED}).encode(), \
            "application/json"
    else:
        body, content_type = (MISDIRECTED + "\n").encode(), "text/plain; charset=utf-8"
    return http.Response.make(421, body, {"Content-Type": content_type, **cors_headers(request, upstream_kind)})


# TMDB's own codes: 24 "Your request to the backend server timed out", 43 "Couldn't connect to the backend server".
_TMDB_GATEWAY = {504: 24, 502: 43}


def gateway_error(request: http.Request, upstream_kind: str, status: int, message: str) -> http.Response:
    """502/504 in the upstream's own format, for an upstream that failed or did not answer in time."""
    title = "Gateway Timeout" if status == 504 else "Bad Gateway"
    wants_json = "json" in request.headers.get("Accept", "")
    if upstream_kind == "plex-tv":
        error = {"code": status, "message": f"{title}: {message}", "status": status}
        body, content_type = ((json.dumps({"errors": [error]}).encode(), "application/json") if wants_json else (
            ('<?xml version="1.0" encoding="UTF-8"?>\n<errors>\n  <error code="%d" message="%s" status="%d"/>\n'
             '</errors>\n' % (status, f"{title}: {message}", status)).encode(), "application/xml"))
    elif upstream_kind == "tmdb":
        body = json.dumps({"status_code": _TMDB_GATEWAY[status], "status_message": f"{title}: {message}",
                           "success": False}).encode()
        content_type = "application/json;charset=utf-8"
    elif upstream_kind == "trakt":
        body = json.dumps({"error": title.lower().replace(" ", "_"), "error_description": message}).encode()
        content_type = "application/json"
    elif upstream_kind == "plex-server":
        body = f"<html><head><title>{title}</title></head><body><h1>{status} {title}</h1></body></html>".encode()
        content_type = "text/html"
    else:
        body, content_type = f"{title}: {message}\n".encode(), "text/plain; charset=utf-8"
    return http.Response.make(status, body, {"Content-Type": content_type, **cors_headers(request, upstream_kind)})
