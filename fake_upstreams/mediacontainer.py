"""Plex `MediaContainer` documents: one tree, rendered as PMS XML or PMS JSON.

Mirrors what a real Plex Media Server sends: XML by default (`text/xml;charset=utf-8`, attributes only,
booleans as 1/0, a space before `/>`, one element per line); JSON only for `Accept: application/json`
(`{"MediaContainer": {...}}`, children grouped into arrays named `Directory`, `Metadata`, `Media`, `Part`,
`Stream`, `Hub`, `Genre`..., real booleans and numbers). In XML a movie is `<Video>` and a show is
`<Directory>`; in JSON both are `Metadata` entries, so every node carries its JSON key separately.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any
from xml.sax.saxutils import escape

from aiohttp import web

from .common import param

XML_CONTENT_TYPE = "text/xml;charset=utf-8"
PLEX_HEADERS = {"X-Plex-Protocol": "1.0", "Cache-Control": "no-cache"}
_XML_ENTITIES = {'"': "&quot;", "\n": "&#10;", "\r": "&#13;", "\t": "&#9;"}


@dataclass
class Node:
    tag: str
    attrs: dict[str, Any] = field(default_factory=dict)
    children: list["Node"] = field(default_factory=list)
    json_key: str | None = None  # defaults to `tag`
    json_object: bool = False  # JSON: a single nested object (e.g. `Extras`) instead of an array item

    @property
    def key(self) -> str:
        return self.json_key or self.tag


def container(attrs: dict[str, Any] | None = None, children: list[Node] | None = None) -> Node:
    children = children or []
    return Node("MediaContainer", {"size": len(children), **(attrs or {})}, children)


def _xml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, float):
        return f"{value:g}" if value != int(value) else f"{value:.1f}"
    return str(value)


def _xml_lines(node: Node, out: list[str]) -> None:
    attrs = "".join(
        f' {k}="{escape(_xml_value(v), _XML_ENTITIES)}"' for k, v in node.attrs.items() if v is not None
    )
    if not node.children and node.tag != "MediaContainer":
        out.append(f"<{node.tag}{attrs} />")
        return
    out.append(f"<{node.tag}{attrs}>")
    for child in node.children:
        _xml_lines(child, out)
    out.append(f"</{node.tag}>")


def to_xml(root: Node) -> bytes:
    lines = ['<?xml version="1.0" encoding="UTF-8"?>']
    _xml_lines(root, lines)
    return ("\n".join(lines) + "\n").encode()


def to_dict(node: Node) -> dict[str, Any]:
    out: dict[str, Any] = {k: v for k, v in node.attrs.items() if v is not None}
    for child in node.children:
        if child.json_object:
            out[child.key] = to_dict(child)
        else:
            out.setdefault(child.key, []).append(to_dict(child))
    return out


def to_json(root: Node) -> bytes:
    return json.dumps({root.key: to_dict(root)}, ensure_ascii=False, separators=(",", ":")).encode()


def wants_json(request: web.Request) -> bool:
    return "application/json" in request.headers.get("Accept", "")


def respond(request: web.Request, root: Node, *, headers: dict[str, str] | None = None,
            status: int = 200) -> web.Response:
    """Render `root` the way the client asked (JSON for `Accept: application/json`, else XML)."""
    all_headers = dict(headers or {})
    if wants_json(request):
        return web.Response(body=to_json(root), status=status, content_type="application/json",
                            headers=all_headers)
    all_headers["Content-Type"] = XML_CONTENT_TYPE
    return web.Response(body=to_xml(root), status=status, headers=all_headers)


def html_error(status: int, body: str = "") -> web.Response:
    """PMS errors are text/html; 404/400 have an empty body."""
    return web.Response(status=status, body=body.encode(), headers={"Content-Type": "text/html"})


UNAUTHORIZED_HTML = "<html><head><title>Unauthorized</title></head><body><h1>401 Unauthorized</h1></body></html>"


class BadPaging(ValueError):
    pass


def paginate(request: web.Request, items: list[Any]) -> tuple[list[Any], dict[str, Any], dict[str, str]]:
    """Apply `X-Plex-Container-Start/Size` (query or header) the way PMS does.

    Returns (page, extra container attrs, extra response headers). Without paging parameters the
    whole list is returned and no offset/totalSize is announced.
    """
    start_raw = param(request, "X-Plex-Container-Start")
    size_raw = param(request, "X-Plex-Container-Size")
    if start_raw is None and size_raw is None:
        return items, {}, {}
    try:
        start = max(int(start_raw or 0), 0)
        size = int(size_raw) if size_raw is not None else len(items)
    except ValueError as exc:
        raise BadPaging(str(exc)) from exc
    page = items[start:start + max(size, 0)]
    attrs = {"offset": start, "totalSize": len(items)}
    headers = {"X-Plex-Container-Start": str(start), "X-Plex-Container-Total-Size": str(len(items))}
    return page, attrs, headers
