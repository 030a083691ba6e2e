"""The setup page served over https (the control plane behind a TLS front, PROJECTIONIST_CONTROL_URL
https://...): there the browser blocks the plain-http probe as mixed content, so step 1 must be
told by the https probe, and without the CA say how to tell the two steps apart."""

from __future__ import annotations

import ssl
import subprocess
from pathlib import Path

import aiohttp
import pytest
import trustme
from aiohttp import web
from test_setup_browser import check_setup_page, download_ca_from_the_page, trust_in_nss

from projectionist.onboarding import SETUP_HOST

pytestmark = [pytest.mark.e2e, pytest.mark.browser]


class TlsFront:
    """https://127.0.0.1:PORT in front of the control plane (GETs only: all the page makes)."""

    def __init__(self, backend: str) -> None:
        self.backend = backend
        self.ca = trustme.CA()
        self.runner: web.AppRunner | None = None
        self.port = 0

    async def forward(self, request: web.Request) -> web.Response:
        async with aiohttp.ClientSession(trust_env=False) as session, \
                session.get(self.backend + request.path_qs) as response:
            headers = {k: v for k, v in response.headers.items()
                       if k.lower() in ("content-type", "content-security-policy", "cache-control")}
            return web.Response(status=response.status, body=await response.read(), headers=headers)

    async def __aenter__(self) -> TlsFront:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.ca.issue_cert("127.0.0.1").configure_cert(context)
        app = web.Application()
        app.router.add_get("/{tail:.*}", self.forward)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0, ssl_context=context)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc) -> None:
        await self.runner.cleanup()

    def trust(self, home: Path) -> None:
        pem = home / "front-ca.pem"
        self.ca.cert_pem.write_to_path(str(pem))
        subprocess.run(["certutil", "-d", f"sql:{home / '.pki' / 'nssdb'}", "-A", "-t", "C,,", "-n", "front",
                        "-i", str(pem)], check=True, env={"HOME": str(home), "PATH": "/usr/bin:/bin"})


async def test_setup_page_over_https_all_green_with_the_ca(stack, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    trust_in_nss(home, download_ca_from_the_page(stack, tmp_path / "projectionist-ca.pem"))
    async with TlsFront(stack.control_url) as front:
        front.trust(home)
        states = await check_setup_page(stack, home, "setup-https-green.png",
                                        url=f"https://127.0.0.1:{front.port}/setup")
    for step in ("proxy", "ca", "plex", "player", "keys"):
        assert states[step][0] == "ok", (step, states)
    assert f"https://{SETUP_HOST}" in states["proxy"][1]


async def test_setup_page_over_https_without_the_ca_says_how_to_tell_steps_1_and_2_apart(stack, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / ".pki" / "nssdb").mkdir(parents=True)
    subprocess.run(["certutil", "-d", f"sql:{home / '.pki' / 'nssdb'}", "-N", "--empty-password"], check=True,
                   env={"HOME": str(home), "PATH": "/usr/bin:/bin"})
    async with TlsFront(stack.control_url) as front:
        front.trust(home)  # the front's certificate only: the proxy's CA is not trusted
        states = await check_setup_page(stack, home, "setup-https-red-no-ca.png",
                                        url=f"https://127.0.0.1:{front.port}/setup")
    state, text = states["proxy"]
    assert state == "fail" and "served over https" in text and f"http://{SETUP_HOST}/" in text, states
    assert states["ca"][0] == "fail", states
    for step in ("plex", "player", "keys"):
        assert states[step][0] == "ok", (step, states)
