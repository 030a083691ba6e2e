"""Errors of the JSON API: always `{"error": code, "message": ..., "fields": [...]}` (see ErrorResponse)."""

from __future__ import annotations

from collections.abc import Iterable

from aiohttp import web
from pydantic import ValidationError

from .models import ErrorField, ErrorResponse


class ApiError(Exception):
    """Raised by handlers; the error middleware answers it as JSON."""

    def __init__(self, status: int, code: str, message: str, fields: Iterable[ErrorField] = (),
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.fields = list(fields)
        self.headers = headers or {}

    def response(self) -> web.Response:
        return error_response(self.status, self.code, self.message, self.fields, self.headers)


def error_response(status: int, code: str, message: str, fields: Iterable[ErrorField] = (),
                   headers: dict[str, str] | None = None) -> web.Response:
    body = ErrorResponse(error=code, message=message, fields=list(fields))
    return web.json_response(body.model_dump(mode="json"), status=status, headers=headers)


def validation_error(exc: ValidationError, location: str) -> ApiError:
    """A pydantic error as a 400 that names each field (never echoing the rejected value)."""
    fields = []
    for problem in exc.errors(include_input=False, include_url=False):
        path = ".".join(str(part) for part in problem["loc"]) or location
        fields.append(ErrorField(field=path, location=location, message=problem["msg"]))
    summary = "; ".join(f"{f.field}: {f.message}" for f in fields[:5])
    return ApiError(400, "validation_error", f"invalid {location}: {summary}", fields)


def unauthenticated() -> ApiError:
    return ApiError(401, "unauthenticated", "sign in first: no valid session")


def forbidden(message: str = "you are not allowed to do this") -> ApiError:
    return ApiError(403, "forbidden", message)


def upstream_failed(name: str) -> ApiError:
    return ApiError(502, "upstream_unavailable", f"{name} did not answer as expected; try again later")
