"""`/openapi.json`: the ingress API, generated from the wire models so it cannot drift."""

from __future__ import annotations

from functools import cache
from typing import Any

from aiohttp import web
from pydantic.json_schema import models_json_schema

from relay.models import ErrorBody, InboundRequest, MessageBundle

_ERRORS = {
    "400": "The body is not a JSON object of the expected shape; `details` names each field.",
    "401": "Missing or wrong token.",
    "404": "Unknown integration.",
    "409": "The messageId was used before with a different body.",
    "413": "The body is larger than the limit.",
    "429": "Over the integration's rate limit; see `Retry-After`.",
    "503": "The broker cannot take the message now: nothing was accepted, send it again.",
}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


@cache
def openapi_document() -> dict[str, Any]:
    """The OpenAPI 3.1 document of the ingress."""
    _, schemas = models_json_schema(
        [(m, "validation") for m in (InboundRequest, MessageBundle, ErrorBody)],
        ref_template="#/components/schemas/{model}",
    )
    responses: dict[str, Any] = {
        "200": {
            "description": "The created objects, or the existing ones for a repeated "
            "messageId (nothing is queued twice).",
            "content": _json(_ref("MessageBundle")),
        },
    }
    for status, description in _ERRORS.items():
        responses[status] = {"description": description, "content": _json(_ref("ErrorBody"))}
    post = {
        "summary": "Send a user's message to the bot",
        "operationId": "postMessage",
        "security": [{"bearer": []}],
        "parameters": [
            {"name": "integrationId", "in": "path", "required": True, "schema": {"type": "string"}}
        ],
        "requestBody": {"required": True, "content": _json(_ref("InboundRequest"))},
        "responses": responses,
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "Relay ingress", "version": "1"},
        "paths": {"/webhooks/{integrationId}": {"post": post}},
        "components": {
            "schemas": schemas.get("$defs", {}),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }


async def openapi_handler(_: web.Request) -> web.Response:
    """Serve the OpenAPI document."""
    return web.json_response(openapi_document())
