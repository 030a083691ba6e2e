"""Answers the reserved setup host (`projectionist.invalid`), which no DNS knows: a browser reaches
it only through this proxy. Over plain HTTP that proves the browser uses the proxy; over HTTPS,
that it trusts the proxy's CA. The setup page on the control plane fetches `/probe` both ways;
the CA downloads are here too, for a device that reaches the proxy but not the control plane.
"""

from __future__ import annotations

import json

from mitmproxy import ctx, http
from mitmproxy.proxy.mode_specs import ReverseMode

from projectionist.onboarding import CA_DOWNLOADS, PROBE_PATH, SETUP_HOST, ca_download, probe_answer

from .binding import pretty_host

PAGE = """<!doctype html><html lang="en"><meta charset="utf-8"><title>Projectionist proxy</title>
<h1>This browser uses the Projectionist proxy</h1>
<p>Download its certificate authority, then trust it (the control plane's <code>/setup</code> page
says how, per system and browser):</p>
<ul>{links}</ul></html>
"""


def is_setup_request(flow: http.HTTPFlow) -> bool:
    return (not isinstance(flow.client_conn.proxy_mode, ReverseMode)
            and pretty_host(flow.request).lower().rstrip(".") == SETUP_HOST)


class SetupHost:
    def _ca_pem(self) -> bytes:
        # mitmproxy's own CA object: the certificate, never its key, and no file I/O per request.
        return ctx.master.addons.get("tlsconfig").certstore.default_ca.to_pem()

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if not is_setup_request(flow):
            return
        path = flow.request.path.split("?", 1)[0]
        no_store = {"Cache-Control": "no-store"}
        if path == PROBE_PATH:
            body = json.dumps(probe_answer(flow.request.scheme, self._ca_pem())).encode()
            # Any origin may read it: the setup page is on the control plane's origin.
            flow.response = http.Response.make(200, body, {
                "Content-Type": "application/json", "Access-Control-Allow-Origin": "*", **no_store})
        elif path.startswith("/ca/") and path[4:] in CA_DOWNLOADS:
            name = path[4:]
            flow.response = http.Response.make(200, ca_download(self._ca_pem(), name), {
                "Content-Type": CA_DOWNLOADS[name], "Content-Disposition": f'attachment; filename="{name}"',
                **no_store})
        elif path == "/":
            links = "".join(f'<li><a href="/ca/{n}">{n}</a></li>' for n in CA_DOWNLOADS)
            flow.response = http.Response.make(200, PAGE.format(links=links),
                                               {"Content-Type": "text/html; charset=utf-8", **no_store})
        else:
            flow.response = http.Response.make(404, b"not found\n", {"Content-Type": "text/plain", **no_store})
