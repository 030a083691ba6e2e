"""The setup page in a fresh headless Chromium, set up as a user would: only the PAC URL, and the
CA imported into the profile's NSS store from the page's own download link. Every step turns
green; without the CA, step 2 is red and says what to do. Screenshots go to test-artifacts/."""

from __future__ import annotations

import base64
import os
import re
import subprocess
from pathlib import Path

import aiohttp
import pytest
import requests
from support import REPO, start_chromium
from test_control_browser import DevTools

pytestmark = [pytest.mark.e2e, pytest.mark.browser]

STEPS = ["proxy", "ca", "plex", "player", "keys"]


def download_ca_from_the_page(stack, dest: Path) -> Path:
    """What a user does: follow the page's PEM download link."""
    session = requests.Session()
    session.trust_env = False
    html = session.get(f"{stack.control_url}/setup", timeout=10).text
    href = re.search(r'<a id="download-pem" href="([^"]+)"', html).group(1)
    response = session.get(stack.control_url + href, timeout=10)
    assert response.status_code == 200 and b"BEGIN CERTIFICATE" in response.content
    dest.write_bytes(response.content)
    return dest


def trust_in_nss(home: Path, ca: Path) -> None:
    """The profile's NSS store, as platform-notes.md (and the setup page) say."""
    nssdb = home / ".pki" / "nssdb"
    nssdb.mkdir(parents=True)
    env = dict(os.environ, HOME=str(home))
    subprocess.run(["certutil", "-d", f"sql:{nssdb}", "-N", "--empty-password"], check=True, env=env)
    subprocess.run(["certutil", "-d", f"sql:{nssdb}", "-A", "-t", "C,,", "-n", "projectionist", "-i", str(ca)],
                   check=True, env=env)


async def open_setup_page(stack, home: Path, log: Path, pac: bool = True) -> tuple[subprocess.Popen, str]:
    env = {k: v for k, v in os.environ.items() if not k.upper().endswith("_PROXY")}
    env["HOME"] = str(home)  # the profile's NSS store is under $HOME/.pki
    return await start_chromium(home / "profile", log,
                                f"--proxy-pac-url={stack.control_url}/proxy.pac" if pac else "--no-proxy-server",
                                "--window-size=1100,3000", env=env)


async def check_setup_page(stack, home: Path, screenshot: str, url: str | None = None,
                           pac: bool = True) -> dict[str, tuple[str, str]]:
    """Load /setup (or `url`), wait for its checks; return {step: (state, text)} and save a screenshot."""
    browser, ws_url = await open_setup_page(stack, home, home / "chromium.log", pac)
    try:
        async with aiohttp.ClientSession(trust_env=False) as session, \
                session.ws_connect(ws_url, max_msg_size=0) as ws:
            page = DevTools(ws)
            await page.send("Page.navigate", url=url or f"{stack.control_url}/setup")
            await page.wait_for("document.body && document.body.dataset.checked === 'true'", timeout=40,
                                what="the setup page's checks")
            states = {}
            for step in STEPS:
                state = await page.evaluate(f"document.getElementById('step-{step}').dataset.state")
                states[step] = (state, await page.text(f"step-{step}-result"))
            states["summary"] = ("", await page.text("summary"))
            states["ca-instructions-open"] = (str(await page.evaluate(
                "document.getElementById('ca-instructions').open")), "")
            states["player-url"] = ("", await page.evaluate("document.getElementById('player-url').value"))
            # Accessible: every field has a label, every result is announced, and Tab starts at the skip link.
            assert await page.evaluate("[...document.querySelectorAll('input')].every(i => i.labels.length > 0)")
            assert await page.evaluate("[...document.querySelectorAll('.result')]"
                                       ".every(r => r.getAttribute('role') === 'status')")
            await page.send("Input.dispatchKeyEvent", type="keyDown", key="Tab", code="Tab",
                            windowsVirtualKeyCode=9)
            await page.send("Input.dispatchKeyEvent", type="keyUp", key="Tab", code="Tab", windowsVirtualKeyCode=9)
            assert await page.evaluate("document.activeElement.className") == "skip"
            shot = await page.send("Page.captureScreenshot", format="png", captureBeyondViewport=True)
            artifacts = REPO / "test-artifacts"
            artifacts.mkdir(exist_ok=True)
            (artifacts / screenshot).write_bytes(base64.b64decode(shot["data"]))
            return states
    finally:
        browser.terminate()
        browser.wait(10)


async def test_setup_page_all_green_with_the_pac_url_and_the_downloaded_ca(stack, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    trust_in_nss(home, download_ca_from_the_page(stack, tmp_path / "projectionist-ca.pem"))
    states = await check_setup_page(stack, home, "setup-green.png")
    for step in STEPS:
        assert states[step][0] == "ok", (step, states)
    assert "through the proxy" in states["proxy"][1]
    assert "trusts the proxy's certificate" in states["ca"][1]
    assert "Plex Media Server 1." in states["plex"][1]
    assert stack.plex_url in states["player"][1] and states["player-url"][1] == stack.plex_url
    assert states["summary"][1].startswith("All five steps are done")


async def test_setup_page_without_the_ca_shows_step_2_red_with_the_instructions(stack, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    states = await check_setup_page(stack, home, "setup-red-no-ca.png")
    assert states["proxy"][0] == "ok", states  # the PAC file works on its own
    state, text = states["ca"]
    assert state == "fail", states
    assert "does not trust the proxy's certificate" in text and "projectionist-ca.pem" in text
    assert states["ca-instructions-open"][0] == "True"  # the per-system steps are shown
    for step in ("plex", "player", "keys"):
        assert states[step][0] == "ok", (step, states)
    assert "4 of 5 steps done" in states["summary"][1]


async def test_setup_page_without_the_proxy_shows_step_1_red_with_the_pac_url(stack, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    states = await check_setup_page(stack, home, "setup-red-no-proxy.png", pac=False)
    state, text = states["proxy"]
    assert state == "fail" and "does not go through the proxy" in text and "PAC URL" in text, states
    assert states["ca"][0] == "fail" and "step 1 first" in states["ca"][1], states
    assert states["plex"][0] == "ok"  # checked by the server, whatever this browser does
