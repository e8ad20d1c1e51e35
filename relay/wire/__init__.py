"""Every wire format and queue envelope, and every header a queue message carries, in one place.

Field names here are the wire names (camelCase), because these models *are* the contract
of DESIGN.md; they are reused by the ingress, the workers, the CLI and the tests. The Bot
Framework's own objects (the Activity) are in `relay.wire.botframework`.
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    StringConstraints,
)
from typing_extensions import TypeAliasType

from relay.wire.contract import MAX_DEPTH, check_json, storable_text

__all__ = ["storable_text"]  # re-exported: models outside this package use it too

# The headers of the relay's queue messages (AMQP), by what they say.
ATTEMPT_HEADER = "x-relay-attempt"  # the attempt a message is on (0 for the first)
DUE_HEADER = "x-relay-due"  # unix milliseconds before which a response waits
REASON_HEADER = "x-relay-reason"  # why a message was dead-lettered
DEAD_AT_HEADER = "x-relay-dead-at"  # when it was, in unix seconds
LAST_STATUS_HEADER = "x-relay-last-status"  # a dead response's last HTTP status (0: none)
ATTEMPTS_HEADER = "x-relay-attempts"  # the attempts a dead response was given
# On an ingress's first publish of an inbound message (not on a retry's, the outbox's or a
# delay queue's): no bot turn can have handled it, so the bot worker need not look.
FIRST_COPY_HEADER = "x-relay-first-copy"
REQUEST_ID_HEADER = "x-request-id"  # the ingress request that accepted an inbound message
LAST_EVENT_ID_HEADER = "Last-Event-ID"  # where a reconnecting event stream resumes
# W3C Trace Context (`relay.tracing`), under the same names in HTTP and AMQP headers: the
# back end's POST, the queue messages between services, and each webhook POST.
TRACEPARENT_HEADER = "traceparent"
TRACESTATE_HEADER = "tracestate"


def _iso_millis(value: datetime) -> str:
    if value.utcoffset():
        value = value.astimezone(UTC)
    return value.replace(tzinfo=None).isoformat(timespec="milliseconds") + "Z"


Timestamp = Annotated[datetime, PlainSerializer(_iso_millis, return_type=str)]
Direction = Literal["incoming", "outgoing"]


def storable_json(value: Any) -> Any:
    """A JSON value inside a body (a payload): the input contract with one level fewer."""
    return check_json(value, depth=MAX_DEPTH - 1)


# The JSON Schema side of the rules above, for /openapi.json. An unpaired surrogate cannot be
# written in a JSON Schema pattern; a NUL can, so every schema-valid string is a storable one.
NO_NUL_PATTERN = "^[^\\u0000]*$"
NO_NUL = Field(json_schema_extra={"pattern": NO_NUL_PATTERN})
StorableString = TypeAliasType("StorableString", Annotated[str, NO_NUL])
# What `storable_json` accepts. Named aliases, so the schema can refer to itself (and keys are
# described by `propertyNames`, not by `patternProperties`, which would let any key through).
StorableValue = TypeAliasType(
    "StorableValue",
    "StorableString | int | float | bool | list[StorableValue] | StorableObject | None",
)
StorableObject = TypeAliasType("StorableObject", "dict[StorableString, StorableValue]")


def _as_is(value: Any) -> Any:
    return value


Text = Annotated[str, StringConstraints(min_length=1), AfterValidator(storable_text), NO_NUL]
CallerId = Annotated[
    str, StringConstraints(min_length=1, max_length=256), AfterValidator(storable_text), NO_NUL
]
MessageType = CallerId
JsonObject = Annotated[
    dict[str, Any],
    # Validation is `dict` and `storable_json`; the do-nothing validator only declares the
    # JSON Schema of what they accept.
    BeforeValidator(_as_is, json_schema_input_type=StorableObject),
    AfterValidator(storable_json),
]


def utcnow() -> datetime:
    """The current time, timezone-aware UTC."""
    return datetime.now(UTC)


class InboundRequest(BaseModel):
    """Body of `POST /webhooks/{integrationId}`: a user's message from the back end."""

    # strict: a number is not silently turned into a string id.
    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)

    userId: CallerId
    messageId: CallerId
    conversationId: CallerId
    type: MessageType
    text: Text
    payload: JsonObject | None = None

    def normalized_payload(self) -> dict[str, Any]:
        """The payload as stored: missing becomes `{"text": text}`; `text` added if absent."""
        payload = dict(self.payload or {})
        payload.setdefault("text", self.text)
        return payload

    def fingerprint(self) -> str:
        """A digest of what defines the message: tells a retry from a conflicting reuse."""
        canonical = json.dumps(
            {
                "userId": self.userId,
                "conversationId": self.conversationId,
                "type": self.type,
                "text": self.text,
                "payload": self.normalized_payload(),
            },
            sort_keys=True,
            separators=(",", ":"),
            ensure_ascii=False,
        )
        return hashlib.sha256(canonical.encode()).hexdigest()


class Tags(BaseModel):
    """The caller's own id of an object."""

    id: str


class _Entity(BaseModel):
    id: str
    createdAt: Timestamp
    updatedAt: Timestamp
    tags: Tags


class User(_Entity):
    """A user as answered by the ingress."""


class Conversation(_Entity):
    """A conversation as answered by the ingress."""


class Message(_Entity):
    """A message as answered by the ingress; `conversationId`/`userId` are relay ids."""

    type: str
    payload: dict[str, Any]
    direction: Direction
    conversationId: str
    userId: str


class MessageBundle(BaseModel):
    """The `200` answer of the ingress: the created (or existing) objects."""

    user: User
    conversation: Conversation
    message: Message


class ErrorDetail(BaseModel):
    """The inner object of every error answer."""

    code: str
    message: str
    details: Any = None


class ErrorBody(BaseModel):
    """Every 4xx/5xx answer: `{"error": {"code", "message", "details"}}`."""

    error: ErrorDetail


class InboundEnvelope(BaseModel):
    """What the ingress puts on the inbound stage for the bot worker (versioned)."""

    model_config = ConfigDict(frozen=True)

    kind: Literal["inbound.message"] = "inbound.message"
    version: Literal[1] = 1
    integrationId: str
    text: str
    bundle: MessageBundle
    acceptedAt: Timestamp
    requestId: str | None = None
    # The message's number among its conversation's inbound messages: increasing in the order
    # the store accepted them, with gaps (a message discarded). None in an envelope from
    # before they were numbered, or for a message stored before.
    sequence: int | None = Field(default=None, ge=0)


class WebhookResponse(BaseModel):
    """Body POSTed to the back end's response endpoint, one bot response per call."""

    type: str
    payload: Any
    conversationId: str
    botpressUserId: str
    botpressMessageId: str
    botpressConversationId: str
    sequence: int = Field(ge=0)


def dump_json(model: BaseModel) -> bytes:
    """Compact JSON bytes of a wire model."""
    return model.model_dump_json().encode()


class OutboundEnvelope(BaseModel):
    """What the bot side puts on the outbound stage for the delivery worker (versioned)."""

    model_config = ConfigDict(frozen=True)

    kind: Literal["outbound.response"] = "outbound.response"
    version: Literal[1] = 1
    integrationId: str
    # Becomes `webhook-id`: the same for every retry of this response.
    deliveryId: str
    attempt: int = Field(default=0, ge=0)
    body: WebhookResponse
    createdAt: Timestamp
    # When the ingress accepted the user's message this answers (None for pushed replies).
    acceptedAt: Timestamp | None = None


class BotReply(BaseModel):
    """One message from the bot: a synchronous reply, or a body of the bot push API."""

    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)

    type: MessageType
    payload: JsonObject


class OutgoingMessage(BaseModel):
    """A message from the bot, as the push API answers it."""

    id: str
    createdAt: Timestamp
    updatedAt: Timestamp
    type: str
    payload: dict[str, Any]
    direction: Literal["outgoing"]
    conversationId: str
    userId: str
    sequence: int
    tags: dict[str, str] = Field(default_factory=dict)


class PushAnswer(BaseModel):
    """The `201` answer of the bot push API: the stored message."""

    message: OutgoingMessage


class WaitedResponse(WebhookResponse):
    """A webhook body as the `?wait` answer holds it: with its `webhook-id`."""

    id: str


class WaitedAnswer(MessageBundle):
    """The answer of `POST /webhooks/{integrationId}?wait=S`: the usual one, plus the
    responses to the message so far and whether its bot turn settled in time."""

    responses: list[WaitedResponse]
    complete: bool


class ItemDelivery(BaseModel):
    """How far a response's delivery got."""

    # expired: dropped undelivered past its type's time to live (`expiringTypes`).
    state: Literal["pending", "delivered", "failed", "dead", "expired"]
    attempts: int


class ConversationItem(BaseModel):
    """One item of a conversation's history: an incoming message or a response (an item of
    `GET .../messages`, the data of a stream's event). `id` is its watermark."""

    id: str
    direction: Literal["incoming", "outgoing"]
    type: str
    payload: Any
    createdAt: Timestamp
    conversationId: str
    botpressConversationId: str
    # Incoming: the caller's messageId; outgoing: the response's relay id.
    messageId: str
    botpressMessageId: str
    # Responses only.
    sequence: int | None = None
    webhookId: str | None = None
    delivery: ItemDelivery | None = None


class HistoryAnswer(BaseModel):
    """The answer of `GET .../conversations/{conversationId}/messages`."""

    messages: list[ConversationItem]
    watermark: str
