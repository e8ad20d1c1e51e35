"""`/openapi.json`: every route of the ingress, generated from the wire models so it cannot drift.

The schemas say what the server really accepts, so a client (or a fuzzer) that follows them
is never refused: strings hold no NUL (`relay.wire.NO_NUL_PATTERN`), a pushed message's
payload has the shape of its type (`relay.payloads`), URLs are http(s) URLs.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import cache
from typing import Any

from aiohttp import web
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from relay.ingress.connector import CONNECTOR_PREFIX
from relay.ingress.push import IDEMPOTENCY_KEY, IDEMPOTENCY_KEY_MAX
from relay.payloads import PAYLOAD_MODELS, TYPE_NAME_PATTERN
from relay.wire import ErrorBody, InboundRequest, MessageBundle, PushAnswer
from relay.wire.botframework import Activity, ResourceResponse

REF_TEMPLATE = "#/components/schemas/{model}"

_WEBHOOK_ERRORS = {
    "400": "The body is not a JSON object of the expected shape; `details` names each field.",
    "401": "Missing or wrong token.",
    "404": "Unknown integration.",
    "409": "The messageId was used before with a different body.",
    "413": "The body is larger than the limit.",
    "429": "Over the integration's rate limit; see `Retry-After`.",
    "503": "The broker cannot take the message now: nothing was accepted, send it again.",
}
_CONNECTOR_ERRORS = {
    "400": "Not an Activity, or a message that is not valid: nothing was stored.",
    "401": "The reply token is not valid for this conversation.",
    "404": "Unknown conversation.",
    "413": "The body is larger than the limit.",
    "503": "The store or the broker cannot take the message now: send it again.",
}
_PUSH_ERRORS = {
    "400": "The body (or Idempotency-Key) is not valid; `details` names each field.",
    "401": "Missing or wrong token: a bot token of the integration, or the conversation's "
    "reply token.",
    "404": "Unknown conversation.",
    "413": "The body is larger than the limit.",
    "429": "Over the integration's rate limit; see `Retry-After`.",
    "503": "The store or the broker cannot take the message now: send it again.",
}
_MODELS: list[type[BaseModel]] = [
    InboundRequest,
    MessageBundle,
    ErrorBody,
    PushAnswer,
    Activity,
    ResourceResponse,
    *PAYLOAD_MODELS.values(),
]


def schema_ref(name: str) -> dict[str, str]:
    """A reference to one of the document's named schemas."""
    return {"$ref": REF_TEMPLATE.format(model=name)}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def _responses(success: dict[str, Any], errors: dict[str, str]) -> dict[str, Any]:
    responses = dict(success)
    for status, description in errors.items():
        responses[status] = {"description": description, "content": _json(schema_ref("ErrorBody"))}
    return responses


def _path_id(name: str, description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "path",
        "required": True,
        "description": description,
        "schema": {"type": "string"},
    }


def message_schema(types: Mapping[str, type[BaseModel]]) -> dict[str, Any]:
    """A bot message `{type, payload}`: a known type's payload has its shape; any other type
    name (`relay.payloads._TYPE_NAME`) takes any storable JSON object."""
    branches: list[dict[str, Any]] = [
        _message_branch({"const": name}, schema_ref(model.__name__))
        for name, model in types.items()
    ]
    other = {"type": "string", "pattern": TYPE_NAME_PATTERN, "not": {"enum": sorted(types)}}
    branches.append(_message_branch(other, schema_ref("StorableObject")))
    return {"oneOf": branches}


def _message_branch(type_: dict[str, Any], payload: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["type", "payload"],
        "properties": {"type": type_, "payload": payload},
    }


def _schemas() -> dict[str, Any]:
    _, generated = models_json_schema(
        [(model, "validation") for model in _MODELS], ref_template=REF_TEMPLATE
    )
    schemas: dict[str, Any] = generated.get("$defs", {})
    schemas["BotMessage"] = message_schema(PAYLOAD_MODELS)
    # The model says `{type, payload: object}`; `validate_outgoing` checks each item as a
    # message of its own type, any but `bloc`.
    schemas["BlocItem"] = message_schema({k: v for k, v in PAYLOAD_MODELS.items() if k != "bloc"})
    return schemas


def _post_message() -> dict[str, Any]:
    return {
        "summary": "Send a user's message to the bot",
        "operationId": "postMessage",
        "security": [{"bearer": []}],
        "parameters": [_path_id("integrationId", "The integration's id.")],
        "requestBody": {"required": True, "content": _json(schema_ref("InboundRequest"))},
        "responses": _responses(
            {
                "200": {
                    "description": "The created objects, or the existing ones for a repeated "
                    "messageId (nothing is queued twice).",
                    "content": _json(schema_ref("MessageBundle")),
                }
            },
            _WEBHOOK_ERRORS,
        ),
    }


def _push_message() -> dict[str, Any]:
    key = {
        "name": "Idempotency-Key",
        "in": "header",
        "required": False,
        "description": "A retried POST with the same key answers the message it created.",
        "schema": {
            "type": "string",
            "pattern": f"^{IDEMPOTENCY_KEY.pattern}$",
            "maxLength": IDEMPOTENCY_KEY_MAX,
        },
    }
    created = {
        "description": "The stored message (for a repeated Idempotency-Key, the one it "
        "created, with `Idempotent-Replayed: true`).",
        "content": _json(schema_ref("PushAnswer")),
    }
    return {
        "summary": "A bot sends a message into a conversation",
        "operationId": "pushMessage",
        "security": [{"bearer": []}],
        "parameters": [
            _path_id("conversationId", "The relay's id of the conversation."),
            key,
        ],
        "requestBody": {"required": True, "content": _json(schema_ref("BotMessage"))},
        "responses": _responses({"201": created}, _PUSH_ERRORS),
    }


def _connector_routes() -> dict[str, Any]:
    def operation(operation_id: str, *extra: dict[str, Any]) -> dict[str, Any]:
        return {
            "summary": "Bot Framework Connector API: a bot sends an Activity",
            "operationId": operation_id,
            "parameters": [
                _path_id("token", "The reply token of the activity's serviceUrl."),
                _path_id("conversationId", "The relay's id of the conversation."),
                *extra,
            ],
            "requestBody": {"required": True, "content": _json(schema_ref("Activity"))},
            "responses": _responses(
                {
                    "200": {
                        "description": "The id of the first message stored.",
                        "content": _json(schema_ref("ResourceResponse")),
                    }
                },
                _CONNECTOR_ERRORS,
            ),
        }

    activity_id = _path_id("activityId", "The activity replied to, or updated.")
    return {
        CONNECTOR_PREFIX: {"post": operation("sendToConversation")},
        CONNECTOR_PREFIX + "/{activityId}": {
            "post": operation("replyToActivity", activity_id),
            "put": operation("updateActivity", activity_id),
        },
    }


def _service_routes() -> dict[str, Any]:
    status = {
        "type": "object",
        "required": ["status"],
        "properties": {"status": {"type": "string"}},
    }
    ready = {
        "type": "object",
        "required": ["status"],
        "properties": {
            "status": {"type": "string"},
            "failures": {"type": "object", "additionalProperties": {"type": "string"}},
        },
    }

    def get(operation_id: str, responses: dict[str, Any]) -> dict[str, Any]:
        return {"get": {"operationId": operation_id, "responses": responses}}

    return {
        "/healthz": get("healthz", {"200": {"description": "Alive.", "content": _json(status)}}),
        "/readyz": get(
            "readyz",
            {
                "200": {"description": "Every dependency answers.", "content": _json(ready)},
                "503": {"description": "Failing dependencies.", "content": _json(ready)},
            },
        ),
        "/metrics": get(
            "metrics",
            {
                "200": {
                    "description": "Prometheus exposition.",
                    "content": {"text/plain": {"schema": {"type": "string"}}},
                }
            },
        ),
        "/openapi.json": get(
            "openapi", {"200": {"description": "This document.", "content": _json({})}}
        ),
    }


@cache
def openapi_document() -> dict[str, Any]:
    """The OpenAPI 3.1 document of the ingress."""
    return {
        "openapi": "3.1.0",
        "info": {"title": "Relay ingress", "version": "1"},
        "paths": {
            "/webhooks/{integrationId}": {"post": _post_message()},
            "/bot/conversations/{conversationId}/messages": {"post": _push_message()},
            **_connector_routes(),
            **_service_routes(),
        },
        "components": {
            "schemas": _schemas(),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }


async def openapi_handler(_: web.Request) -> web.Response:
    """Serve the OpenAPI document."""
    return web.json_response(openapi_document())
