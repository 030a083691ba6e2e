"""proxy_addons.header_lookup answers exactly what mitmproxy's own look-ups answer."""

from __future__ import annotations

import pytest
from mitmproxy import http

from proxy_addons.header_lookup import header, host_header


@pytest.mark.parametrize("fields", [
    [], [(b"Host", b"a.example")], [(b"host", b"a.example"), (b"HOST", b"b.example")],
    [(b"Content-Length", b"12"), (b"Origin", b"http://x"), (b"vary", b"a"), (b"Vary", b""), (b"X-\xff", b"\xfe")],
])
@pytest.mark.parametrize("name", ["Host", "content-length", "Vary", "origin", "x-\udcff", "absent"])
def test_header_lookup_answers_as_headers_get(fields, name):
    headers = http.Headers(fields)
    assert header(headers, name.lower().encode("utf-8", "surrogateescape")) == headers.get(name)


@pytest.mark.parametrize("version", ["HTTP/1.1", "HTTP/2.0", "HTTP/3"])
@pytest.mark.parametrize("authority", ["", "api.themoviedb.org"])
@pytest.mark.parametrize("fields", [[], [(b"Host", b"image.tmdb.org:443")]])
def test_host_header_is_mitmproxys(version, authority, fields):
    request = http.Request("example.com", 80, b"GET", b"http", authority.encode(), b"/", version.encode(),
                           http.Headers(fields), b"", None, 0, 0)
    assert host_header(request) == request.host_header
