"""Operations of the JSON API: validated from pydantic models, documented from the same models.

Each API module declares its operations on an `Api` (which fills a `web.RouteTableDef`):

    api = Api("settings")
    routes = api.routes

    @api.put("/api/settings", summary="...", body=SettingsUpdate, response=Settings, access=USER)
    async def put_settings(request: web.Request, call: Call) -> Settings: ...

The wrapper validates path, query and body (400 naming the field), authenticates (401), checks the
CSRF token on state-changing calls (403) and admin rights (403), then serialises the returned
model. `GET /api/openapi.json` is generated from the registered operations, the models and any
other route of the app (documented generically), so the document always covers the whole API.
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from aiohttp import web
from pydantic import BaseModel, ValidationError
from pydantic.json_schema import models_json_schema

from .errors import ApiError, forbidden, unauthenticated, validation_error
from .keys import OPERATIONS
from .models import ErrorField, ErrorResponse
from .security import RATE_LIMITED_PREFIXES, SAFE_METHODS
from .sessions import CSRF_HEADER, SESSION_COOKIE, Identity, apply_renewal, authenticate, csrf_ok

Access = Literal["public", "user", "admin"]
PUBLIC: Access = "public"
USER: Access = "user"
ADMIN: Access = "admin"
MAX_BODY_BYTES = 256 * 1024

Handler = Callable[[web.Request, "Call"], Awaitable[BaseModel | web.StreamResponse]]


@dataclass
class Call:
    """What the wrapper validated for the handler."""

    identity: Identity | None = None
    body: Any = None
    query: Any = None
    path: Any = None

    @property
    def user(self) -> Identity:
        assert self.identity is not None, "only for operations that require a session"
        return self.identity


@dataclass
class Operation:
    method: str
    path: str
    handler: Handler
    summary: str
    tag: str
    access: Access
    body: type[BaseModel] | None = None
    query: type[BaseModel] | None = None
    path_params: type[BaseModel] | None = None
    response: type[BaseModel] | None = None
    status: int = 200
    description: str | None = None
    responses: dict[int, str] = field(default_factory=dict)  # other documented statuses
    html: bool = False  # may answer a browser navigation with a redirect

    @property
    def operation_id(self) -> str:
        return self.handler.__name__


class Api:
    def __init__(self, tag: str) -> None:
        self.tag = tag
        self.routes = web.RouteTableDef()
        self.operations: list[Operation] = []

    def operation(self, method: str, path: str, *, summary: str, access: Access, **kw) -> Callable[[Handler], Handler]:
        def register(handler: Handler) -> Handler:
            op = Operation(method, path, handler, summary, self.tag, access,
                           description=(handler.__doc__ or "").strip() or None, **kw)
            self.operations.append(op)
            self.routes.route(method, path)(_endpoint(op))
            return handler
        return register

    def get(self, path: str, **kw):
        return self.operation("GET", path, **kw)

    def post(self, path: str, **kw):
        return self.operation("POST", path, **kw)

    def put(self, path: str, **kw):
        return self.operation("PUT", path, **kw)

    def delete(self, path: str, **kw):
        return self.operation("DELETE", path, **kw)


def register(app: web.Application, *apis: Api) -> None:
    """Add the APIs' routes to the app and their operations to its OpenAPI document."""
    for api in apis:
        app.add_routes(api.routes)
        app[OPERATIONS].extend(api.operations)


def _endpoint(op: Operation) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def endpoint(request: web.Request) -> web.StreamResponse:
        call = Call()
        if op.path_params is not None:
            call.path = _validate(op.path_params, dict(request.match_info), "path")
        if op.query is not None:
            call.query = _validate(op.query, {k: request.query.get(k) for k in request.query.keys()}, "query")
        if op.access != PUBLIC:
            call.identity = await authenticate(request)
            if call.identity is None:
                raise unauthenticated()
            if request.method not in SAFE_METHODS and not await csrf_ok(request, call.identity):
                raise ApiError(403, "csrf_token_invalid",
                               f"send this session's CSRF token (GET /api/auth/session) as {CSRF_HEADER}")
            if op.access == ADMIN and not call.identity.is_admin:
                raise forbidden("administrators only")
        if op.body is not None:
            call.body = _validate(op.body, await _json_body(request), "body")
        result = await op.handler(request, call)
        if isinstance(result, web.StreamResponse):
            response = result
        else:
            response = web.json_response(result.model_dump(mode="json"), status=op.status)
        apply_renewal(request, response)
        return response

    endpoint.__name__ = op.handler.__name__
    return endpoint


def _validate(model: type[BaseModel], data: Any, location: str) -> BaseModel:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc, location) from None


async def _json_body(request: web.Request) -> Any:
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        raise ApiError(413, "body_too_large", f"request bodies are limited to {MAX_BODY_BYTES} bytes")
    raw = await request.content.read(MAX_BODY_BYTES + 1)
    if len(raw) > MAX_BODY_BYTES:
        raise ApiError(413, "body_too_large", f"request bodies are limited to {MAX_BODY_BYTES} bytes")
    if not raw.strip():
        raise ApiError(400, "validation_error", "a JSON body is required",
                       [ErrorField(field="body", location="body", message="missing")])
    if request.content_type not in ("application/json", "") and not request.content_type.endswith("+json"):
        raise ApiError(415, "unsupported_media_type", "send the body as application/json")
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "invalid_json", "the body is not valid JSON",
                       [ErrorField(field="body", location="body", message="not valid JSON")]) from None


# --- the document --------------------------------------------------------------------------------

_PATH_PARAM = re.compile(r"\{([^}:]+)(?::[^}]*)?\}")
ERROR_STATUSES = {400: "Invalid request: the fields at fault are named",
                  401: "No valid session", 403: "Not allowed (cross-site, bad CSRF token, not an admin)",
                  413: "Body too large", 415: "Body is not JSON",
                  429: "Too many sign-in requests from this address", 502: "An upstream did not answer"}


def openapi_document(app: web.Application) -> dict[str, Any]:
    operations: list[Operation] = app[OPERATIONS]
    wanted: list[tuple[type[BaseModel], Literal["validation", "serialization"]]] = [(ErrorResponse, "serialization")]
    for op in operations:
        if op.body is not None:
            wanted.append((op.body, "validation"))
        if op.response is not None:
            wanted.append((op.response, "serialization"))
    refs, top = models_json_schema(list(dict.fromkeys(wanted)), ref_template="#/components/schemas/{model}")

    paths: dict[str, dict[str, Any]] = {}
    documented: set[tuple[str, str]] = set()
    for op in operations:
        documented.add((op.method, op.path))
        paths.setdefault(_PATH_PARAM.sub(r"{\1}", op.path), {})[op.method.lower()] = _operation_doc(op, refs)
    for method, path, handler in _other_routes(app):
        if (method, path) not in documented:
            paths.setdefault(path, {})[method.lower()] = _generic_doc(method, path, handler)

    return {
        "openapi": "3.1.0",
        "info": {"title": "Projectionist control plane", "version": "1",
                 "description": "Identity, per-user settings and administration. Sign in with "
                                "`POST /api/auth/plex`; state-changing calls need the session's "
                                f"CSRF token in `{CSRF_HEADER}`."},
        "paths": dict(sorted(paths.items())),
        "components": {
            "schemas": top.get("$defs", {}),
            "securitySchemes": {
                "session": {"type": "apiKey", "in": "cookie", "name": SESSION_COOKIE},
                "csrf": {"type": "apiKey", "in": "header", "name": CSRF_HEADER},
            },
        },
    }


def _operation_doc(op: Operation, refs) -> dict[str, Any]:
    doc: dict[str, Any] = {"operationId": op.operation_id, "summary": op.summary, "tags": [op.tag]}
    if op.description:
        doc["description"] = op.description
    params = []
    for location, model in (("path", op.path_params), ("query", op.query)):
        if model is None:
            continue
        schema = model.model_json_schema()
        required = set(schema.get("required", ()))
        for name, prop in schema.get("properties", {}).items():
            param = {"name": name, "in": location, "required": location == "path" or name in required,
                     "schema": {k: v for k, v in prop.items() if k not in ("title", "description")}}
            if "description" in prop:
                param["description"] = prop["description"]
            params.append(param)
    if params:
        doc["parameters"] = params
    if op.body is not None:
        doc["requestBody"] = {"required": True, "content": {
            "application/json": {"schema": refs[(op.body, "validation")]}}}
    ok: dict[str, Any] = {"description": "OK"}
    if op.response is not None:
        ok["content"] = {"application/json": {"schema": refs[(op.response, "serialization")]}}
    responses: dict[str, Any] = {str(op.status): ok}
    if op.html:
        responses["303"] = {"description": "A browser navigation is sent on to the settings page"}
    statuses = set(op.responses)
    if op.body is not None or op.query is not None or op.path_params is not None:
        statuses |= {400}
    if op.body is not None:
        statuses |= {413, 415}
    if op.access != PUBLIC:
        statuses |= {401}
    if op.access == ADMIN or op.method not in SAFE_METHODS:
        statuses |= {403}
    if op.path.startswith(RATE_LIMITED_PREFIXES):
        statuses |= {429}
    error_schema = refs[(ErrorResponse, "serialization")]
    for status in sorted(statuses):
        responses[str(status)] = {"description": op.responses.get(status) or ERROR_STATUSES.get(status, "Error"),
                                  "content": {"application/json": {"schema": error_schema}}}
    doc["responses"] = responses
    if op.access != PUBLIC:
        doc["security"] = [{"session": [], "csrf": []}] if op.method not in SAFE_METHODS else [{"session": []}]
    return doc


def _other_routes(app: web.Application):
    """Routes added without an Api (health, the settings page, other modules' route tables)."""
    for resource in app.router.resources():
        info = resource.get_info()
        path = info.get("path") or info.get("formatter")
        if not path:  # static files
            continue
        for route in resource:
            if route.method in ("GET", "POST", "PUT", "PATCH", "DELETE"):
                yield route.method, path, route.handler


def documented_statuses(**statuses: str):
    """Decorator for a route outside an Api: other statuses it answers (`not_found="..."` is 404),
    for its generic entry in the document."""
    codes = {"not_found": 404}

    def decorate(handler):
        handler.documented_statuses = {codes[name]: text for name, text in statuses.items()}
        return handler
    return decorate


def _generic_doc(method: str, path: str, handler=None) -> dict[str, Any]:
    doc: dict[str, Any] = {"summary": f"{method} {path}", "responses": {"200": {"description": "OK"}}}
    for status, text in getattr(handler, "documented_statuses", {}).items():
        doc["responses"][str(status)] = {"description": text}
    params = [{"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
              for name in _PATH_PARAM.findall(path)]
    if params:
        doc["parameters"] = params
    return doc


# --- the route serving it -----------------------------------------------------------------------

routes = web.RouteTableDef()


@routes.get("/api/openapi.json")
async def openapi_json(request: web.Request) -> web.Response:
    """This document (OpenAPI 3.1), generated from the models that validate the requests."""
    return web.json_response(openapi_document(request.app))
