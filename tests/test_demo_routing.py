"""`intercept: when_overridden` (rules.yaml's app.plex.tv and trakt.tv): such hosts pass through the
proxy untouched, TLS and all, unless an upstream override sends them elsewhere, as `run --demo` does
(to the fakes' Approve and activate pages). Real embedded proxy, a real TLS origin on 127.0.0.1."""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading

import pytest
import requests
import trustme

from support import free_port, start_embedded_proxy


class TlsOrigin:
    """A one-request HTTPS server with its own CA (a site that is not ours)."""

    def __init__(self, tmp_path) -> None:
        self.ca = trustme.CA()
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.ca.issue_cert("127.0.0.1").configure_cert(self.context)
        self.ca_file = tmp_path / "origin-ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_file))
        self.port = free_port()
        self.listener = socket.create_server(("127.0.0.1", self.port))
        self.listener.settimeout(10)
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        try:
            conn, _ = self.listener.accept()
            with self.context.wrap_socket(conn, server_side=True) as tls:
                tls.recv(65536)
                tls.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
        except OSError:
            pass  # the client gave up on our certificate (the intercepted case)


def _get_through(proxy, origin: TlsOrigin) -> requests.Response:
    session = requests.Session()
    session.trust_env = False
    return session.get(f"https://127.0.0.1:{origin.port}/", timeout=10, verify=str(origin.ca_file),
                       proxies={"https": f"http://127.0.0.1:{proxy.ports['regular']}"})


def _sign_in_page_upstream(unknown_hosts: str):
    def edit(rules: dict) -> None:
        rules["proxy"]["unknown_hosts"] = unknown_hosts
        rules["upstreams"]["plex-web"]["hosts"] = ["127.0.0.1"]  # stands in for app.plex.tv
    return edit


@pytest.mark.parametrize("unknown_hosts", ["pass", "refuse"])
async def test_when_overridden_hosts_pass_through_untouched_without_an_override(tmp_path, unknown_hosts):
    origin = TlsOrigin(tmp_path)
    proxy = await start_embedded_proxy(tmp_path, [], _sign_in_page_upstream(unknown_hosts))
    try:
        response = await asyncio.to_thread(_get_through, proxy, origin)
    finally:
        await proxy.stop()
        origin.listener.close()
    # Verified against the origin's own CA: the proxy never intercepted the connection.
    assert response.status_code == 200 and response.text == "ok"


async def test_when_overridden_hosts_are_intercepted_with_an_override(tmp_path):
    origin = TlsOrigin(tmp_path)
    proxy = await start_embedded_proxy(tmp_path, [f"plex-web=http://127.0.0.1:{free_port()}"],
                                       _sign_in_page_upstream("pass"))
    try:
        with pytest.raises(requests.exceptions.SSLError):  # the proxy's certificate, not the origin's
            await asyncio.to_thread(_get_through, proxy, origin)
    finally:
        await proxy.stop()
        origin.listener.close()
