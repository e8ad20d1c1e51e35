"""The admin API's bodies (`/admin/v1`): what it takes and answers.

The wire half of administration: the routes (`relay.ingress.admin`) parse requests into
these models, the operations (`relay.admin`) take plain values, and `relay.views` makes
the answers from store records (the CLI prints the same views).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Generic, Literal, Self, TypeVar

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    WithJsonSchema,
    model_validator,
)

from relay.payloads import TYPE_NAME_PATTERN
from relay.wire import ConversationItem, Timestamp
from relay.wire.contract import whole

T = TypeVar("T")
URL_PATTERN = r"^https?://[^/?#\s]+"  # what deliveries can use; the check does the rest
# `echo`, `http`, `botframework`, a `relay.bots` entry point's name, or `module:function`.
BOT_ADAPTER_PATTERN = r"^[A-Za-z_][\w.-]*(:[A-Za-z_]\w*)?$"
MAX_DELIVERY_RATE = 10_000.0  # responses per second: beyond any one endpoint
MAX_EXPIRY_SECONDS = 7 * 86400  # a response older than a week is dropped by its age anyway
MAX_EXPIRING_TYPES = 100


class Page(BaseModel, Generic[T]):
    """A page of a list; `nextCursor` (as `?cursor=`) gives the next, null at the end."""

    items: list[T]
    nextCursor: str | None


class BotView(BaseModel):
    """The bot an integration names, as shown: never its credentials, only which are set."""

    adapter: str
    url: str | None
    credentials: list[Literal["secret", "appId", "appPassword"]]


class IntegrationView(BaseModel):
    """An integration as the admin API lists and shows it: never its signing secret, which
    only its creation and a rotation answer, nor its bot's credentials."""

    id: str
    name: str
    webhookUrl: str
    responseUrl: str
    enabled: bool
    createdAt: Timestamp
    disabledAt: Timestamp | None
    bot: BotView | None  # null: the deployment's RELAY_BOT
    operationsUrl: str | None
    deliveryRate: float | None  # null: unpaced
    deliveryBurst: int | None
    expiringTypes: dict[str, float]


class IntegrationCreated(IntegrationView):
    """The answer of an integration's creation: its signing secret, this once."""

    signingSecret: str


class BotSpec(BaseModel):
    """An integration's bot as written: the adapter, its URL (`http`, `botframework`) and
    its credentials, which are never answered (`secret`: sent to an `http` bot as its
    bearer token; `appId`, `appPassword`: a Bot Framework bot's app registration)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    adapter: str = Field(min_length=1, max_length=200, pattern=BOT_ADAPTER_PATTERN)
    url: str | None = Field(default=None, min_length=1, max_length=2048, pattern=URL_PATTERN)
    secret: str | None = Field(default=None, min_length=1, max_length=1000, repr=False)
    appId: str | None = Field(default=None, min_length=1, max_length=200, repr=False)
    appPassword: str | None = Field(default=None, min_length=1, max_length=1000, repr=False)


# The schema pydantic would give (`patternProperties`) admits keys that match no pattern;
# this one says what the model checks: every key a type name, every value its seconds.
ExpiringTypes = Annotated[
    dict[
        Annotated[str, Field(pattern=TYPE_NAME_PATTERN)],
        Annotated[float, Field(gt=0, le=MAX_EXPIRY_SECONDS)],
    ],
    Field(max_length=MAX_EXPIRING_TYPES),
    WithJsonSchema(
        {
            "type": "object",
            "propertyNames": {"pattern": TYPE_NAME_PATTERN},
            "additionalProperties": {
                "type": "number",
                "exclusiveMinimum": 0,
                "maximum": MAX_EXPIRY_SECONDS,
            },
            "maxProperties": MAX_EXPIRING_TYPES,
        }
    ),
]


class DeliveryFields(BaseModel):
    """How responses are delivered, beyond where (in a create: absent is the default; in a
    patch: absent is unchanged, null is the default)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    operationsUrl: str | None = Field(
        default=None, min_length=1, max_length=2048, pattern=URL_PATTERN
    )
    deliveryRate: float | None = Field(default=None, gt=0, le=MAX_DELIVERY_RATE)
    deliveryBurst: (
        Annotated[int, Field(ge=1, le=int(MAX_DELIVERY_RATE)), BeforeValidator(whole)] | None
    ) = None
    expiringTypes: ExpiringTypes | None = None


class IntegrationCreate(DeliveryFields):
    """`POST /integrations`: the response endpoint is checked with a signed test event
    first, unless `verify` is false. No `bot`: the deployment's RELAY_BOT."""

    name: str = Field(min_length=1, max_length=200)
    responseUrl: str = Field(min_length=1, max_length=2048, pattern=URL_PATTERN)
    verify: bool = True
    bot: BotSpec | None = None


class IntegrationPatch(DeliveryFields):
    """`PATCH /integrations/{id}`: a new response URL (checked again), enabled, a bot (null:
    back to RELAY_BOT; the credentials a bot of the same adapter had are kept unless
    given), delivery options. Absent: unchanged (an empty patch changes nothing)."""

    responseUrl: str | None = Field(
        default=None, min_length=1, max_length=2048, pattern=URL_PATTERN
    )
    enabled: bool | None = None
    verify: bool = True
    bot: BotSpec | None = None


# How long a rotated-out signing secret still signs (as well as the new one), by default
# and at most (`relay integrations rotate-secret --grace`, `POST …/rotate-secret`).
ROTATION_GRACE_SECONDS = 24 * 3600
MAX_ROTATION_GRACE_SECONDS = 30 * 24 * 3600


class SecretRotation(BaseModel):
    """`POST /integrations/{id}/rotate-secret` (the body is optional): seconds the old
    secret still signs alongside the new one (0: from now on only the new one)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    grace: float = Field(default=ROTATION_GRACE_SECONDS, ge=0, le=MAX_ROTATION_GRACE_SECONDS)


class SecretRotated(BaseModel):
    """The answer of a rotation: the new signing secret, this once, and until when the
    previous one still signs deliveries too."""

    id: str
    signingSecret: str
    previousSecretValidUntil: Timestamp


class TokenCreate(BaseModel):
    """`POST /integrations/{id}/tokens`."""

    model_config = ConfigDict(extra="forbid", strict=True)

    kind: Literal["integration", "bot"] = "integration"


class TokenView(BaseModel):
    """A token's metadata (never the token, which only its creation answers)."""

    id: str
    integrationId: str | None
    kind: str
    prefix: str
    createdAt: Timestamp
    revokedAt: Timestamp | None


class TokenCreated(TokenView):
    """The answer of a token's creation: the token, this once."""

    token: str


class QueueView(BaseModel):
    """One relay queue: what waits in it and who consumes it."""

    name: str
    # inbound, outbound, or operations (the operations events' queue and its delay queues)
    stage: str
    kind: str  # partition, delay, dead, or operations (the operations events' own queue)
    ready: int | None
    unacked: int | None
    consumers: int | None
    leader: str | None
    members: list[str]
    online: list[str]
    # Seconds the oldest message has waited: partition queues by their workers' word,
    # dead-letter queues by their first letter; None when nobody knows (no consumer).
    oldestAgeSeconds: float | None = None


class AttemptView(BaseModel):
    """One delivery attempt, as `GET /attempts` lists it."""

    id: str
    webhookId: str
    attempt: int
    integrationId: str
    responseId: str  # the response's relay id (its botpressMessageId)
    conversationId: str | None  # the caller's
    botpressConversationId: str | None
    status: int | None
    latencyMs: float | None
    error: str | None
    nextAttemptAt: Timestamp | None
    responseBody: str | None
    createdAt: Timestamp


class DeadLetterView(BaseModel):
    """A dead message, as `GET /dead-letters` lists it."""

    id: str  # the message id (inbound) or webhook-id (outbound)
    stage: Literal["inbound", "outbound"]
    integrationId: str
    conversationId: str  # Relay's conversation id
    reason: str
    attempts: int
    lastStatus: int | None
    deadAt: Timestamp | None
    body: dict[str, Any]


class DeadLetterSelection(BaseModel):
    """What `POST /dead-letters/replay` and `/purge` act on: `ids` and/or a filter
    (`stage`, `integrationId`, `conversationId`: every letter matching all it names), or
    `all` (narrowed by `stage` alone). Nothing chosen is a 400, never "everything"."""

    model_config = ConfigDict(extra="forbid", strict=True)

    ids: list[str] | None = Field(default=None, min_length=1, max_length=1000)
    all: bool = False
    stage: Literal["inbound", "outbound"] | None = None
    integrationId: str | None = Field(default=None, min_length=1)
    conversationId: str | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _one_way(self) -> Self:
        narrowed = self.ids is not None or self.integrationId or self.conversationId
        if self.all and narrowed:
            raise ValueError("all: true takes no ids, integrationId or conversationId")
        if not (self.all or narrowed or self.stage):
            raise ValueError(
                "say which: ids, a filter (stage, integrationId, conversationId) or all: true"
            )
        return self


def _text_only(value: object) -> object:
    """A time in JSON is an ISO 8601 string (not a number of seconds, as lax parsing takes)."""
    if not isinstance(value, str):
        raise ValueError("must be an ISO 8601 time with its offset")
    return value


class Count(BaseModel):
    """How many an action took."""

    count: int


def _in_utc(value: datetime) -> datetime:
    """A time in UTC (ValueError near the calendar's ends, where it cannot be moved there)."""
    try:
        return value.astimezone(UTC)
    except OverflowError as error:
        raise ValueError("must be a time that can be expressed in UTC") from error


class Recovery(BaseModel):
    """`POST /integrations/{id}/recover`: replay what failed for good since then."""

    model_config = ConfigDict(extra="forbid")

    since: Annotated[AwareDatetime, BeforeValidator(_text_only), AfterValidator(_in_utc)]


class Resent(BaseModel):
    """`POST /responses/{webhookId}/resend`: the response is on its way again."""

    webhookId: str
    responseId: str


class Timeline(BaseModel):
    """`GET /integrations/{id}/conversations/{conversationId}`: the conversation's items
    (as its history shows them) and the delivery attempts of its responses, oldest first."""

    messages: list[ConversationItem]
    attempts: list[AttemptView]
    watermark: str


class PacedView(BaseModel):
    """A paced integration (`deliveryRate` set), as `GET /queues/paced` and `relay queues`
    show it: its pace, and how many of its responses wait (no attempt has finished with
    them: waiting for their turn, their endpoint, or a retry)."""

    integrationId: str
    name: str
    deliveryRate: float
    deliveryBurst: int  # as given, else one second's worth
    waiting: int
