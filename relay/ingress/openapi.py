"""`/openapi.json`: every route of the ingress, generated from the wire models so it cannot drift.

The schemas say what the server really accepts, so a client (or a fuzzer) that follows them
is never refused: every request body keeps the input contract (`relay.ingress.openapi_contract`),
a pushed message's payload has the shape of its type (`relay.payloads`), URLs are http(s)
URLs. And tools can read them: the document validates (openapi-spec-validator), a client
generated from it works (openapi-python-client: no schema it cannot read, no two classes of
one name), an event stream's schema is that of one event, as schemathesis reads it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from functools import cache
from typing import Any

from aiohttp import web
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from relay.ingress.connector import CONNECTOR_PREFIX
from relay.ingress.conversations import MAX_LIMIT
from relay.ingress.openapi_contract import CONTRACT, apply_contract
from relay.ingress.push import IDEMPOTENCY_KEY, IDEMPOTENCY_KEY_MAX
from relay.ingress.waiting import MAX_WAIT
from relay.payloads import PAYLOAD_MODELS, TYPE_NAME_PATTERN
from relay.wire import (
    LAST_EVENT_ID_HEADER,
    ErrorBody,
    HistoryAnswer,
    InboundRequest,
    MessageBundle,
    PushAnswer,
    WaitedAnswer,
    WebhookResponse,
)
from relay.wire.admin import (
    AttemptView,
    Count,
    DeadLetterSelection,
    DeadLetterView,
    IntegrationCreate,
    IntegrationCreated,
    IntegrationPatch,
    IntegrationView,
    PacedView,
    Page,
    QueueView,
    Recovery,
    Resent,
    SecretRotated,
    SecretRotation,
    Timeline,
    TokenCreate,
    TokenCreated,
    TokenView,
)
from relay.wire.botframework import Activity, ResourceResponse
from relay.wire.operations import (
    CircuitClosedEvent,
    CircuitOpenedEvent,
    IntegrationDisabledEvent,
    ResponseDeadEvent,
)
from relay.wire.tokens import ConversationTokenAnswer, ConversationTokenRequest

REF_TEMPLATE = "#/components/schemas/{model}"

_WEBHOOK_ERRORS = {
    "400": "The body is not a JSON object of the expected shape (`details` names each field),"
    " or `wait` is out of range.",
    "401": "Missing or wrong token: an integration token, or a `converse` conversation token "
    "for a message of its own conversation and user.",
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
_READ_ERRORS = {
    "400": "A query parameter is not valid (`after`, `limit`, `Last-Event-ID`).",
    "401": "Missing or wrong token: an integration token, or a conversation token of this "
    "conversation.",
    "404": "Unknown integration, or a conversation the integration does not have.",
    "429": "Over the integration's rate limit; see `Retry-After`.",
}
_MODELS: list[type[BaseModel]] = [
    WebhookResponse,
    ResponseDeadEvent,
    CircuitOpenedEvent,
    CircuitClosedEvent,
    IntegrationDisabledEvent,
    InboundRequest,
    MessageBundle,
    WaitedAnswer,
    HistoryAnswer,
    ConversationTokenRequest,
    ConversationTokenAnswer,
    ErrorBody,
    PushAnswer,
    Activity,
    ResourceResponse,
    IntegrationCreate,
    IntegrationCreated,
    IntegrationPatch,
    IntegrationView,
    SecretRotation,
    SecretRotated,
    TokenCreate,
    TokenCreated,
    Page[IntegrationView],
    Page[TokenView],
    Page[QueueView],
    Page[PacedView],
    Page[AttemptView],
    Page[DeadLetterView],
    DeadLetterSelection,
    Count,
    Recovery,
    Resent,
    Timeline,
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
    schemas = distinct_names(generated.get("$defs", {}))
    schemas["BotMessage"] = message_schema(PAYLOAD_MODELS)
    # The model says `{type, payload: object}`; `validate_outgoing` checks each item as a
    # message of its own type, any but `bloc`.
    schemas["BlocItem"] = message_schema({k: v for k, v in PAYLOAD_MODELS.items() if k != "bloc"})
    schemas["ConversationEvent"] = event_schema()
    return schemas


def distinct_names(schemas: dict[str, Any]) -> dict[str, Any]:
    """`schemas` with each model's name its own: pydantic tells two models of one name apart by
    their modules (`relay__payloads__CardAction`) but leaves both titled `CardAction`, and a
    client generator names its classes by title. Such a model becomes `PayloadsCardAction`."""
    renamed = {
        name: name.rsplit("__", 2)[-2].title() + name.rsplit("__", 1)[-1]
        for name in schemas
        if "__" in name
    }
    text = json.dumps(schemas)
    for old, new in renamed.items():
        # A reference is a whole JSON string: replacing it as one touches nothing else.
        before, after = (json.dumps(REF_TEMPLATE.format(model=name)) for name in (old, new))
        text = text.replace(before, after)
    named: dict[str, Any] = json.loads(text)
    for old, new in renamed.items():
        named[new] = {**named.pop(old), "title": new}
    return named


def _query(name: str, description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "description": description,
        "schema": schema,
    }


def _post_message() -> dict[str, Any]:
    wait = _query(
        "wait",
        "Seconds to wait for the message's bot turn: the answer then holds its responses "
        "(each webhook body with its webhook-id as `id`) and `complete`.",
        {"type": "number", "exclusiveMinimum": 0, "maximum": MAX_WAIT},
    )
    return {
        "summary": "Send a user's message to the bot",
        "operationId": "postMessage",
        "security": [{"bearer": []}],
        "parameters": [_path_id("integrationId", "The integration's id."), wait],
        "requestBody": {"required": True, "content": _json(schema_ref("InboundRequest"))},
        "responses": _responses(
            {
                "200": {
                    "description": "The created objects, or the existing ones for a repeated "
                    "messageId (nothing is queued twice); with `wait`, also the responses.",
                    "content": _json(
                        {"anyOf": [schema_ref("WaitedAnswer"), schema_ref("MessageBundle")]}
                    ),
                    "headers": {
                        "Relay-Wait-Limited": {
                            "description": "With `wait`: this ingress waits for as many "
                            "messages as it may (the limit named), so the answer did not wait; "
                            "the responses come by webhook as always.",
                            "required": False,
                            "schema": {"enum": ["wait_limit", "wait_limit_per_integration"]},
                        }
                    },
                }
            },
            _WEBHOOK_ERRORS,
        ),
    }


_WATERMARK = {"type": "string", "pattern": r"^[0-9]{1,18}\.[0-9]{1,18}$"}
_EXAMPLE_ITEM = (
    '{"id": "1043.2205", "direction": "incoming", "type": "text", "payload": {"text": "hello"}, '
    '"createdAt": "2026-11-26T12:51:07.735Z", "conversationId": "conv-1", '
    '"botpressConversationId": "e750…", "messageId": "msg-42", "botpressMessageId": "6b77…"}'
)
_EVENTS = {
    "200": {
        "description": "Server-Sent Events, each one item of the conversation's history as it is "
        "stored: `event: message`, `id:` the item's watermark, `data:` the item (a "
        "ConversationItem, JSON). The stream starts with `retry: 1000` and sends a comment line "
        "at least every 15 s; it ends only when the reader leaves or the ingress stops. The "
        "schema describes one event (as a 3.2 `itemSchema` would):\n\n"
        "```\nretry: 1000\n\nid: 1043.2205\nevent: message\ndata: "
        f"{_EXAMPLE_ITEM}\n\n: keep-alive\n\n```",
        "content": {"text/event-stream": {"schema": schema_ref("ConversationEvent")}},
    }
}


def event_schema() -> dict[str, Any]:
    """One event of a conversation's stream, as an SSE parser reads it (`event`, `id`, `data`)."""
    return {
        "type": "object",
        "description": "One Server-Sent Event: an item of a conversation's history.",
        "required": ["event", "id", "data"],
        "properties": {
            "event": {"const": "message"},
            "id": {
                **_WATERMARK,
                "description": "The item's watermark: resume after it with `Last-Event-ID`.",
            },
            "data": {
                "type": "string",
                "description": "The item, as JSON.",
                "contentMediaType": "application/json",
                "contentSchema": schema_ref("ConversationItem"),
            },
        },
        "examples": [{"event": "message", "id": "1043.2205", "data": _EXAMPLE_ITEM}],
    }


def _conversation_routes() -> dict[str, Any]:
    integration = _path_id("integrationId", "The integration's id.")
    conversation = _path_id("conversationId", "The caller's id of the conversation.")
    after = _query("after", "Only items after this watermark.", _WATERMARK)
    token = _query(
        "token", "A conversation token of this conversation (for browsers).", {"type": "string"}
    )
    resume = {
        "name": LAST_EVENT_ID_HEADER,
        "in": "header",
        "required": False,
        "description": "Resume after this item, a watermark this relay gave out (an event's "
        "`id`, which a reconnecting EventSource sends back); it wins over `after`.",
        "schema": _WATERMARK,
    }
    readers: list[dict[str, list[str]]] = [{"bearer": []}, {"readToken": []}]
    full = {
        **_READ_ERRORS,
        "503": "This ingress serves as many streams as it may, in all, for this integration "
        "or for this token (`details.limit` names the limit): try again after `Retry-After`.",
    }
    base = "/webhooks/{integrationId}"
    history = {
        "200": {
            "description": "Items, oldest first.",
            "content": _json(schema_ref("HistoryAnswer")),
        }
    }
    limit = _query(
        "limit", "Items at most.", {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT}
    )
    return {
        f"{base}/conversations/{{conversationId}}/messages": {
            "get": {
                "summary": "A conversation's history after a watermark",
                "operationId": "conversationHistory",
                "security": readers,
                "parameters": [integration, conversation, after, limit, token],
                "responses": _responses(history, _READ_ERRORS),
            }
        },
        f"{base}/conversations/{{conversationId}}/events": {
            "get": {
                "summary": "A conversation's items as they come (from its first, by default)",
                "operationId": "conversationEvents",
                "security": readers,
                "parameters": [integration, conversation, after, token, resume],
                "responses": _responses(_EVENTS, full),
            }
        },
        f"{base}/events": {
            "get": {
                "summary": "Every conversation's items as they come (from now, by default)",
                "operationId": "integrationEvents",
                "security": [{"bearer": []}],
                "parameters": [integration, after, resume],
                "responses": _responses(_EVENTS, full),
            }
        },
    }


_TOKEN_ERRORS = {
    "400": "The body is not valid; `details` names each field.",
    "401": "Missing or wrong token: an integration token (a conversation token never mints "
    "or revokes).",
    "404": "Unknown integration; a `read` token for a conversation with no message yet.",
    "429": "Over the integration's rate limit; see `Retry-After`.",
}


def _token_routes() -> dict[str, Any]:
    """Conversation tokens (`relay.ingress.conversation_tokens`): minted and revoked with an
    integration token."""
    integration = _path_id("integrationId", "The integration's id.")
    conversation = _path_id("conversationId", "The caller's id of the conversation.")
    token_id = _path_id("tokenId", "The token's id (the `id` of its mint's answer).")
    created = {
        "description": "The token (in this answer only), its id and its expiry.",
        "content": _json(schema_ref("ConversationTokenAnswer")),
    }
    revoked = {"204": {"description": "Revoked."}}
    unauthorized = {"401": _TOKEN_ERRORS["401"], "429": _TOKEN_ERRORS["429"]}
    tokens = "/webhooks/{integrationId}/conversations/{conversationId}/tokens"
    return {
        tokens: {
            "post": {
                "summary": "A token a browser may hold, for one user of one conversation",
                "operationId": "createConversationToken",
                "security": [{"bearer": []}],
                "parameters": [integration, conversation],
                "requestBody": {
                    "required": True,
                    "content": _json(schema_ref("ConversationTokenRequest")),
                },
                "responses": _responses({"201": created}, _TOKEN_ERRORS),
            },
            "delete": {
                "summary": "Revoke every token of the conversation",
                "operationId": "revokeConversationTokens",
                "security": [{"bearer": []}],
                "parameters": [integration, conversation],
                "responses": _responses(revoked, {**unauthorized, "404": "Unknown integration."}),
            },
        },
        f"{tokens}/{{tokenId}}": {
            "delete": {
                "summary": "Revoke one token of the conversation",
                "operationId": "revokeConversationToken",
                "security": [{"bearer": []}],
                "parameters": [integration, conversation, token_id],
                "responses": _responses(
                    revoked,
                    {
                        **unauthorized,
                        "404": "Unknown integration, or no such live token of this conversation.",
                    },
                ),
            }
        },
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
                },
                "401": {
                    "description": "RELAY_METRICS_TOKEN is set and the bearer is not it.",
                    "content": _json(schema_ref("ErrorBody")),
                },
            },
        ),
        "/openapi.json": get(
            "openapi", {"200": {"description": "This document.", "content": _json({})}}
        ),
    }


# Answered by any route (`relay.ingress.clients`) but the orchestrator's probes.
_PROBES = frozenset({"/healthz", "/readyz"})
_FAILED_AUTHENTICATION = "too many requests from this address failed authentication"
_BODY_TOO_SLOW = (
    "the body did not arrive within RELAY_BODY_READ_TIMEOUT (then the connection closes)"
)
_RETRY_AFTER = {
    "Retry-After": {
        "description": "Seconds to wait before trying again.",
        "required": True,
        "schema": {"type": "string", "pattern": "^[1-9][0-9]*$"},
    }
}
_ADMIN_ERRORS = {
    "400": "A body or query parameter that is not valid; `details` names each field.",
    "401": "Missing or wrong token: an admin token (`relay tokens create --kind admin`).",
    "404": "Unknown integration or token.",
    "409": "That response was not delivered yet (it is being retried, or it is dead); or "
    "the integration's signing secret cannot be decrypted to sign a test event.",
    "422": "The response endpoint failed its check (a signed test event), or is refused.",
    "503": "The broker cannot be reached now; try again.",
}


_PAGE = _query("limit", "Items at most.", {"type": "integer", "minimum": 1, "maximum": 1000})
_CURSOR = _query(
    "cursor", "The `nextCursor` of the page before.", {"type": "string", "minLength": 1}
)


def _admin_operation(
    operation_id: str,
    summary: str,
    answer: tuple[str, str | None],
    body: str | None = None,
    *,
    path_ids: tuple[str, ...] = (),
    errors: tuple[str, ...] = ("401",),
    optional_body: bool = False,
) -> dict[str, Any]:
    """An admin route's operation: bearer admin token, JSON in and out (a body whose every
    field has a default may be left out: `optional_body`)."""
    status, schema = answer
    success: dict[str, Any] = {"description": summary}
    if schema is not None:
        success["content"] = _json(schema_ref(schema))
    found: dict[str, Any] = {
        "summary": summary,
        "operationId": operation_id,
        "security": [{"bearer": []}],
        "parameters": [_path_id(name, "The id.") for name in path_ids],
        "responses": _responses(
            {status: success}, {code: _ADMIN_ERRORS.get(code, "") for code in errors}
        ),
    }
    if body is not None:
        found["requestBody"] = {"required": not optional_body, "content": _json(schema_ref(body))}
    return found


def _admin_routes() -> dict[str, Any]:
    operation = _admin_operation
    invalid = ("400", "401", "404", "422")
    page, cursor = _PAGE, _CURSOR
    listing = operation(
        "adminListIntegrations",
        "Integrations, oldest first",
        ("200", "Page_IntegrationView_"),
        errors=("400", "401"),
    )
    listing["parameters"] = [page, cursor]
    base = "/admin/v1"
    searched = operation(
        "adminSearchAttempts",
        "Delivery attempts, newest first",
        ("200", "Page_AttemptView_"),
        errors=("400", "401"),
    )
    text = {"type": "string", "minLength": 1}
    time = {"type": "string", "format": "date-time"}
    searched["parameters"] = [
        _query("integrationId", "Only this integration's.", text),
        _query("conversationId", "Only this conversation's (the relay's id or yours).", text),
        _query("webhookId", "Only this response's (its webhook-id).", text),
        _query(
            "statusClass",
            "By the answer's status (`error`: no answer).",
            {"enum": ["2xx", "3xx", "4xx", "5xx", "error"]},
        ),
        _query("outcome", "Delivered (2xx) or failed.", {"enum": ["delivered", "failed"]}),
        _query("since", "Made at or after.", time),
        _query("until", "Made before.", time),
        page,
        cursor,
    ]
    return {
        f"{base}/attempts": {"get": searched},
        f"{base}/integrations": {
            "get": listing,
            "post": operation(
                "adminCreateIntegration",
                "Create an integration (its endpoint checked first); the only answer that "
                "holds its signing secret",
                ("201", "IntegrationCreated"),
                "IntegrationCreate",
                errors=("400", "401", "422"),
            ),
        },
        f"{base}/integrations/{{id}}": {
            "get": operation(
                "adminShowIntegration",
                "One integration",
                ("200", "IntegrationView"),
                path_ids=("id",),
                errors=("401", "404"),
            ),
            "patch": operation(
                "adminChangeIntegration",
                "Change the response URL (checked again), enable or disable",
                ("200", "IntegrationView"),
                "IntegrationPatch",
                path_ids=("id",),
                errors=(*invalid, "409"),
            ),
            "delete": operation(
                "adminDeleteIntegration",
                "Delete an integration with everything it holds",
                ("204", None),
                path_ids=("id",),
                errors=("401", "404"),
            ),
        },
        f"{base}/integrations/{{id}}/rotate-secret": {
            "post": operation(
                "adminRotateSecret",
                "A new signing secret (in this answer only); the old one signs too during "
                "the grace period",
                ("200", "SecretRotated"),
                "SecretRotation",
                path_ids=("id",),
                errors=("400", "401", "404"),
                optional_body=True,  # the grace has a default
            )
        },
        f"{base}/integrations/{{id}}/tokens": {
            "get": operation(
                "adminListTokens",
                "An integration's tokens",
                ("200", "Page_TokenView_"),
                path_ids=("id",),
                errors=("401", "404"),
            ),
            "post": operation(
                "adminCreateToken",
                "A new token (in this answer only)",
                ("201", "TokenCreated"),
                "TokenCreate",
                path_ids=("id",),
                errors=("400", "401", "404"),
                optional_body=True,  # a token's kind has a default
            ),
        },
        f"{base}/tokens/{{tokenId}}": {
            "delete": operation(
                "adminRevokeToken",
                "Revoke a token",
                ("204", None),
                path_ids=("tokenId",),
                errors=("401", "404"),
            )
        },
        f"{base}/queues": {
            "get": operation(
                "adminQueues", "Every relay queue", ("200", "Page_QueueView_"), errors=("401",)
            )
        },
        f"{base}/queues/paced": {
            "get": operation(
                "adminPacedIntegrations",
                "The paced integrations (deliveryRate set) and how many responses of each wait",
                ("200", "Page_PacedView_"),
                errors=("401",),
            )
        },
    }


def _admin_recovery_routes() -> dict[str, Any]:
    base, operation = "/admin/v1", _admin_operation
    text = {"type": "string", "minLength": 1}
    letters = operation(
        "adminListDeadLetters",
        "Dead letters: inbound first, then outbound, each in the order they died",
        ("200", "Page_DeadLetterView_"),
        errors=("400", "401", "503"),
    )
    letters["parameters"] = [
        _query("stage", "Only this stage's.", {"enum": ["inbound", "outbound"]}),
        _query("integrationId", "Only this integration's.", text),
        _query("conversationId", "Only this conversation's (the relay's id).", text),
        _PAGE,
        _CURSOR,
    ]
    timeline = operation(
        "adminConversationTimeline",
        "A conversation's messages and responses (as its history) with their attempts",
        ("200", "Timeline"),
        path_ids=("id", "conversationId"),
        errors=("400", "401", "404"),
    )
    timeline["parameters"] += [
        _query("after", "Only items after this watermark.", _WATERMARK),
        _query("limit", "Items at most.", {"type": "integer", "minimum": 1, "maximum": 1000}),
    ]
    settle = ("200", "Count")
    return {
        f"{base}/dead-letters": {"get": letters},
        f"{base}/dead-letters/replay": {
            "post": operation(
                "adminReplayDeadLetters",
                "Send the selected dead letters back to their stage",
                settle,
                "DeadLetterSelection",
                errors=("400", "401", "503"),
            )
        },
        f"{base}/dead-letters/purge": {
            "post": operation(
                "adminPurgeDeadLetters",
                "Delete the selected dead letters",
                settle,
                "DeadLetterSelection",
                errors=("400", "401", "503"),
            )
        },
        f"{base}/responses/{{webhookId}}/resend": {
            "post": operation(
                "adminResendResponse",
                "Send a delivered response again, under its webhook-id",
                ("202", "Resent"),
                path_ids=("webhookId",),
                errors=("401", "404", "409", "503"),
            )
        },
        f"{base}/integrations/{{id}}/recover": {
            "post": operation(
                "adminRecoverIntegration",
                "Send again every response given up on since a time",
                settle,
                "Recovery",
                path_ids=("id",),
                errors=("400", "401", "404", "503"),
            )
        },
        f"{base}/integrations/{{id}}/conversations/{{conversationId}}": {"get": timeline},
    }


_SIGNATURE_HEADERS = [
    {
        "name": name,
        "in": "header",
        "required": True,
        "description": description,
        "schema": {"type": "string"},
    }
    for name, description in (
        ("webhook-id", "The same on every attempt of one response or event: deduplicate on it."),
        ("webhook-timestamp", "Unix seconds when this attempt was signed."),
        (
            "webhook-signature",
            "`v1,<base64 HMAC-SHA256>` with the integration's signing secret"
            " (two during a rotation's grace period), per Standard Webhooks.",
        ),
    )
]


def _webhook(operation_id: str, summary: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {
        "post": {
            "operationId": operation_id,
            "summary": summary,
            "parameters": _SIGNATURE_HEADERS,
            "requestBody": {"required": True, "content": _json(schema)},
            "responses": {
                "200": {
                    "description": "Taken: any 2xx. Another status is retried (a 410"
                    " disables the integration)."
                }
            },
        }
    }


def _webhooks() -> dict[str, Any]:
    """What Relay POSTs to a back end: each response to its `responseUrl`, and operations
    events to its `operationsUrl`, signed alike."""
    events = [
        schema_ref(name)
        for name in (
            "ResponseDeadEvent",
            "CircuitOpenedEvent",
            "CircuitClosedEvent",
            "IntegrationDisabledEvent",
        )
    ]
    return {
        "response": _webhook(
            "responseWebhook",
            "A bot response, to the integration's responseUrl",
            schema_ref("WebhookResponse"),
        ),
        "operationsEvent": _webhook(
            "operationsEventWebhook",
            "An operations event (a response given up on, a circuit opened or closed, the"
            " integration disabled), to the integration's operationsUrl",
            {"oneOf": events},
        ),
    }


@cache
def openapi_document() -> dict[str, Any]:
    """The OpenAPI 3.1 document of the ingress."""
    document = {
        "openapi": "3.1.0",
        "info": {"title": "Relay ingress", "version": "1", "description": CONTRACT},
        "paths": {
            "/webhooks/{integrationId}": {"post": _post_message()},
            **_conversation_routes(),
            **_token_routes(),
            "/bot/conversations/{conversationId}/messages": {"post": _push_message()},
            **_connector_routes(),
            **_service_routes(),
            **_admin_routes(),
            **_admin_recovery_routes(),
        },
        "webhooks": _webhooks(),
        "components": {
            "schemas": _schemas(),
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "readToken": {"type": "apiKey", "in": "query", "name": "token"},
            },
        },
    }
    apply_contract(document)
    _answer_everywhere(document, "429", _FAILED_AUTHENTICATION, headers=_RETRY_AFTER)
    _answer_everywhere(document, "408", _BODY_TOO_SLOW, headers={}, with_body=True)
    return document


def _answer_everywhere(
    document: dict[str, Any],
    status: str,
    description: str,
    headers: dict[str, Any],
    with_body: bool = False,
) -> None:
    """Add an answer that any route may give (bar the probes; `with_body`: any route that
    takes a body) to every operation; a route that gives the same status for a reason of its
    own keeps both reasons."""
    for path, item in document["paths"].items():
        if path in _PROBES:
            continue
        for operation in item.values():
            if with_body and "requestBody" not in operation:
                continue
            answer = operation["responses"].setdefault(
                status, {"description": "", "content": _json(schema_ref("ErrorBody"))}
            )
            given = answer["description"].rstrip(".")
            either = f"{given}; or {description}" if given else description.capitalize()
            answer["description"] = f"{either}."
            answer["headers"] = headers


async def openapi_handler(_: web.Request) -> web.Response:
    """Serve the OpenAPI document."""
    return web.json_response(openapi_document())
