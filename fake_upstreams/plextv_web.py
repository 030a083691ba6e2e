"""What a browser itself loads from plex.tv's web hosts, served by the fake plex.tv app.

- `GET /auth/` (app.plex.tv, which the offline demo routes to this fake): the sign-in page the player sends
  the whole window to, `https://app.plex.tv/auth/#!?clientID=…&code=…&forwardUrl=…` (the PIN rides in the
  fragment, which only the page's script sees). One "Approve" button per fake account links the PIN
  (`POST /auth/approve`: the next poll of the PIN carries that account's token), then the page follows
  `forwardUrl`, as plex.tv does. No token ever reaches the page.
- `GET /users/{uuid}/avatar`: the account's avatar (the `thumb` of /api/v2/user and /api/v2/users), a PNG.
"""

from __future__ import annotations

import html

from aiohttp import web

from . import data, images

routes = web.RouteTableDef()

AUTH_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Plex: sign in (offline demo)</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
 body {{ font-family: system-ui, sans-serif; background: #1f2326; color: #eee; display: grid; place-items: center;
        min-height: 100vh; margin: 0; }}
 main {{ background: #2b3035; padding: 2rem 2.5rem; border-radius: 8px; max-width: 28rem; }}
 h1 {{ color: #e5a00d; margin-top: 0; }} code {{ font-size: 1.3em; letter-spacing: .1em; }}
 button {{ display: block; width: 100%; margin: .6rem 0; padding: .7rem; font-size: 1rem; border: 0;
          border-radius: 4px; background: #e5a00d; color: #1f2326; cursor: pointer; }}
 #status {{ min-height: 1.5em; }} .error {{ color: #ff8a80; }}
</style></head>
<body><main>
<h1>Plex</h1>
<p>This is the offline demo's stand-in for app.plex.tv: no account or network needed.</p>
<p id="request">A player asks to sign in with the code <code id="code">?</code>.</p>
{buttons}
<p id="status" role="status"></p>
</main>
<script>
// The PIN and where to go next ride in the fragment: #!?clientID=…&code=…&forwardUrl=…
const params = new URLSearchParams(location.hash.replace(/^#!?\\??/, ""));
const code = params.get("code"), clientID = params.get("clientID"), forwardUrl = params.get("forwardUrl");
const status = document.getElementById("status");
document.getElementById("code").textContent = code || "(none)";
function fail(text) {{ status.textContent = text; status.className = "error"; }}
if (!code) fail("No sign-in code in this address: start the sign-in from the player.");
for (const button of document.querySelectorAll("button[data-account]")) {{
  button.disabled = !code;
  button.addEventListener("click", async () => {{
    status.textContent = "Approving…"; status.className = "";
    const body = new URLSearchParams({{code, clientID: clientID || "", account: button.dataset.account}});
    const response = await fetch("/auth/approve", {{method: "POST", body}});
    if (!response.ok) return fail("Plex did not accept the code (expired?): start the sign-in again.");
    let target = null;
    try {{ target = new URL(forwardUrl); }} catch (e) {{}}
    if (target && (target.protocol === "http:" || target.protocol === "https:")) {{
      status.textContent = "Approved: returning to the player…";
      location.assign(target.href);
    }} else {{
      status.textContent = "Approved. You can close this tab and return to the player.";
    }}
  }});
}}
</script></body></html>
"""


def _auth_page() -> str:
    buttons = "\n".join(
        f'<button type="button" data-account="{html.escape(a.username)}">Approve as {html.escape(a.username)}'
        f"</button>" for a in data.ACCOUNTS)
    return AUTH_PAGE.format(buttons=buttons)


@routes.get("/auth")
@routes.get("/auth/")
async def auth_page(_request: web.Request) -> web.Response:
    return web.Response(text=_auth_page(), content_type="text/html", charset="utf-8")


@routes.post("/auth/approve")
async def approve(request: web.Request) -> web.Response:
    from .plextv import error, get_state

    form = await request.post()
    account = next((a for a in data.ACCOUNTS if a.username == form.get("account")), None)
    if account is None:
        return error(request, 400, 1000, "Unknown account")
    client_id = form.get("clientID")
    state = get_state(request)
    for pin in state.pins.values():
        if pin["code"] == form.get("code") and (not client_id or pin["clientIdentifier"] == client_id):
            state.link_pin(pin["id"], account.account_token)
            return web.Response(status=204)
    return error(request, 404, 1020, "Code not found or expired")


@routes.get("/users/{uuid}/avatar")
async def avatar(request: web.Request) -> web.Response:
    uuid = request.match_info["uuid"]
    if not any(a.uuid == uuid for a in data.ACCOUNTS):
        raise web.HTTPNotFound()
    body = await images.render_async(f"avatar-{uuid}", 256, 256, "PNG")
    return web.Response(body=body, headers={"Content-Type": "image/png", "Cache-Control": "public, max-age=3600"})
