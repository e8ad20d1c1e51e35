"""The one error type of the HTTP API, rendered as `{"error": {...}}` in one place."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from aiohttp import web
from pydantic import ValidationError

from relay.wire import ErrorBody, ErrorDetail


class ApiError(Exception):
    """An answer other than success, with its status, code and details."""

    status = 400
    code = "bad_request"

    def __init__(self, message: str, details: Any = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.details = details
        self.headers = headers or {}

    def response(self) -> web.Response:
        """The JSON response for this error."""
        return error_response(self.status, self.code, self.message, self.details, self.headers)


class InvalidBody(ApiError):
    """The body is not a JSON object of the expected shape."""

    status, code = 400, "invalid_body"


class InvalidQuery(ApiError):
    """A query parameter out of its range or not of its form."""

    status, code = 400, "invalid_query"


class Unauthorized(ApiError):
    """Missing or wrong token (one answer for both)."""

    status, code = 401, "unauthorized"


class NotFound(ApiError):
    """The integration (or another addressed object) does not exist."""

    status, code = 404, "not_found"


class Unprocessable(ApiError):
    """Well formed, but refused: an endpoint that fails its check."""

    status, code = 422, "unprocessable"


class Conflict(ApiError):
    """A messageId reused with a different body."""

    status, code = 409, "conflict"


class RateLimited(ApiError):
    """Over the integration's rate limit."""

    status, code = 429, "rate_limited"


class Unavailable(ApiError):
    """The broker cannot take the message now; nothing was accepted, send it again."""

    status, code = 503, "unavailable"


def error_response(
    status: int,
    code: str,
    message: str,
    details: Any = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    """A JSON error answer."""
    body = ErrorBody(error=ErrorDetail(code=code, message=message, details=details))
    return web.Response(
        status=status,
        body=body.model_dump_json(),
        content_type="application/json",
        headers=headers,
    )


def invalid_fields(error: ValidationError, message: str, prefix: Sequence[str] = ()) -> InvalidBody:
    """A 400 naming each field the validation found bad, as a dotted path (`payload.items.2`)
    after `prefix`; `body` for the body as a whole."""
    fields = [
        {
            "field": ".".join([*prefix, *(str(part) for part in item["loc"])]) or "body",
            "message": item["msg"],
        }
        for item in error.errors(include_url=False)
    ]
    return InvalidBody(message, details=fields)
