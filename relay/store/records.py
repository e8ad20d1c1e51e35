"""The store's records: what its methods take and answer (`relay.store.protocols`)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from relay.broker.topology import StageName
from relay.store.secrets import SecretUnreadable
from relay.wire import MessageBundle
from relay.wire.tokens import ConversationScope

TokenKind = Literal["integration", "bot"]
# An integration's token kinds, and the operator's (of no integration).
AnyTokenKind = Literal["integration", "bot", "admin"]
MessageState = Literal["pending", "queued"]


class BotChoice(BaseModel):
    """The bot an integration names: an adapter (`echo`, `http`, `botframework`, or a
    Python plugin's `module:function`), its URL where it has one, and its credentials. The
    credentials are write-only: never in a view, a repr or a log line, and sealed at rest
    like the signing secret (`relay.store.secrets`)."""

    model_config = ConfigDict(frozen=True)

    adapter: str
    url: str | None = None
    secret: str | None = Field(default=None, repr=False)  # the `http` adapter's
    app_id: str | None = Field(default=None, repr=False)  # Bot Framework's
    app_password: str | None = Field(default=None, repr=False)

    def credentials(self) -> dict[str, str]:
        """The credentials given, by name (what the store seals as one value)."""
        found = {"secret": self.secret, "app_id": self.app_id, "app_password": self.app_password}
        return {name: value for name, value in found.items() if value is not None}


# The types dropped when undelivered past so many seconds, for an integration naming none.
DEFAULT_EXPIRING_TYPES: dict[str, float] = {"typing": 30.0}


class DeliveryOptions(BaseModel):
    """How an integration's responses are delivered, beyond where: the operations URL that
    hears of failures, the pace (responses per second to the response URL, with a burst;
    None: unpaced), and the seconds after which an undelivered response of a type is
    dropped rather than delivered late."""

    model_config = ConfigDict(frozen=True)

    operations_url: str | None = None
    delivery_rate: float | None = None
    delivery_burst: int | None = None
    expiring_types: dict[str, float] = Field(default_factory=lambda: dict(DEFAULT_EXPIRING_TYPES))

    def burst(self) -> int:
        """The burst of a paced integration: as given, else one second's worth."""
        if self.delivery_burst is not None:
            return self.delivery_burst
        return max(1, round(self.delivery_rate or 1))


class IntegrationRecord(BaseModel):
    """An integration: one back end with its response endpoint and signing secret (as the
    store read it: decrypted, `relay.store.secrets`)."""

    model_config = ConfigDict(frozen=True)

    id: str
    name: str
    response_url: str
    # Never in a repr: a record in a log line or a traceback must not show it.
    signing_secret: str = Field(repr=False)
    created_at: datetime
    disabled_at: datetime | None = None
    # During a rotation's grace period deliveries are signed with both secrets.
    previous_secret: str | None = Field(default=None, repr=False)
    previous_secret_until: datetime | None = None
    # Why the stored signing secret could not be decrypted (its key is not among
    # RELAY_SECRET_KEYS), naming the integration: `signing_secret` is empty then, and
    # `signing_secrets` raises. Nothing else about the integration is affected.
    secret_unreadable: str | None = None
    # The bot it names; None: the deployment's default (RELAY_BOT).
    bot: BotChoice | None = None
    # Why the bot's stored credentials could not be decrypted (as `secret_unreadable`): the
    # bot is named without them then.
    bot_unreadable: str | None = None
    delivery: DeliveryOptions = DeliveryOptions()

    def signing_secrets(self, now: datetime) -> list[str]:
        """The secrets to sign with now: the current one, and the previous during its grace;
        SecretUnreadable if the current one could not be decrypted."""
        if self.secret_unreadable is not None:
            raise SecretUnreadable(self.secret_unreadable)
        until = self.previous_secret_until
        if self.previous_secret and until is not None and now < until:
            return [self.signing_secret, self.previous_secret]
        return [self.signing_secret]


@dataclass(frozen=True)
class Taken:
    """What a shared token bucket gave (`take_tokens`): `granted` tokens (up to those
    wanted), and when none, the seconds until one is there."""

    granted: int
    wait: float


@dataclass(frozen=True)
class Resealed:
    """What sealing every stored secret again did (`relay secrets reencrypt`)."""

    count: int  # secrets sealed again with the first key
    # One line per secret no key opens, naming its integration (never the secret).
    unreadable: list[str]
    # Secrets that changed while it ran (a rotation): run it again.
    changed: int = 0


class TokenRecord(BaseModel):
    """A token's metadata; the token itself is never stored, only its hash."""

    model_config = ConfigDict(frozen=True)

    id: str
    integration_id: str | None  # None: an admin token
    kind: AnyTokenKind
    prefix: str
    created_at: datetime
    revoked_at: datetime | None = None


@dataclass(frozen=True)
class Accepted:
    """The outcome of recording an inbound message (or `Vanished`).

    `created` is true when this call wrote the message; otherwise the message existed and
    `fingerprint` tells whether the caller sent the same body. `state` is `pending` until the
    broker confirmed the publish.
    """

    bundle: MessageBundle
    text: str
    fingerprint: str
    state: MessageState
    created: bool
    lease_until: datetime | None
    # Whoever holds the lease publishes; only the holder may discard the message.
    lease_owner: str | None = None
    created_user: bool = False
    created_conversation: bool = False
    # The partition count it is published under (None: written before counts could change).
    partitions: int | None = None
    # Its number among its conversation's inbound messages (None: written before they were
    # numbered): see `relay.store.sql.new_messages`.
    sequence: int | None = None


@dataclass(frozen=True)
class Vanished:
    """The other outcome of recording an inbound message: what the attempt relied on was
    removed meanwhile by a concurrent discard (a failed first publish) — the row of its
    messageId, or a user or conversation it named. Nothing of the attempt stays; the caller
    makes it again (`relay.ingress.accept`)."""


@dataclass(frozen=True)
class PendingMessage:
    """An inbound message whose publish was never confirmed (the outbox)."""

    integration_id: str
    bundle: MessageBundle
    text: str
    request_id: str | None
    lease_owner: str
    partitions: int | None = None  # the partition count it is published under
    sequence: int | None = None  # its number in its conversation, as in `Accepted`


@dataclass(frozen=True)
class Unreadable:
    """A claimed row of the outbox that cannot be read back (a payload no parser takes): it
    is ended, not published (`relay.pipeline.unpublishable`)."""

    id: str
    integration_id: str
    conversation_id: str
    reason: str


class AttemptRecord(BaseModel):
    """One delivery attempt, as `relay deliveries show` prints it."""

    model_config = ConfigDict(frozen=True)

    delivery_id: str
    attempt: int
    integration_id: str
    message_id: str
    status: int | None
    latency_ms: float | None
    error: str | None
    next_attempt_at: datetime | None
    response_body: str | None
    created_at: datetime


class Unfinished(BaseModel):
    """A message not finished with: never tried, or tried and waiting for a retry."""

    model_config = ConfigDict(frozen=True)

    message_id: str
    # When it is tried again (None if it has not been tried).
    retry_at: datetime | None


class OutgoingRecord(BaseModel):
    """A bot response as stored: what the delivery worker will POST, and its state."""

    model_config = ConfigDict(frozen=True)

    id: str
    integration_id: str
    conversation_id: str
    conversation_external_id: str
    user_id: str
    type: str
    payload: dict[str, Any]
    sequence: int
    state: MessageState
    created_at: datetime
    partitions: int | None = None  # the partition count it is published under


class ConversationRecord(BaseModel):
    """A conversation with what the push API needs to answer in it."""

    model_config = ConfigDict(frozen=True)

    id: str
    integration_id: str
    external_id: str
    # The user of its latest incoming message: the one the bot is talking to.
    user_id: str


InboundState = Literal["missing", "pending", "queued", "handled"]


@dataclass(frozen=True, order=True)
class Watermark:
    """Where an item of a conversation's history sits (`relay.store.sql.history`); as text,
    the opaque watermark of the conversation API."""

    txid: int
    item: int

    ORIGIN: ClassVar[Watermark]

    def __str__(self) -> str:
        return f"{self.txid}.{self.item}"

    @classmethod
    def parse(cls, text: str) -> Watermark | None:
        """The watermark `text` stands for, or None if it is not one."""
        txid, dot, item = text.partition(".")
        if not (dot and _digits(txid) and _digits(item)):
            return None
        return cls(int(txid), int(item))


Watermark.ORIGIN = Watermark(0, 0)  # before every item


def _digits(text: str) -> bool:
    """1 to 18 ASCII digits: a stamp (below 2**63, as the databases keep them)."""
    return 0 < len(text) <= 18 and text.isascii() and text.isdigit()


class HistoryRow(BaseModel):
    """One item of a conversation's history: an incoming message or a response."""

    model_config = ConfigDict(frozen=True)

    id: str
    watermark: Watermark
    direction: Literal["incoming", "outgoing"]
    type: str
    payload: Any
    created_at: datetime
    conversation_id: str
    conversation_external_id: str
    external_id: str | None  # the caller's messageId (incoming only)
    sequence: int | None  # responses only
    attempts: int  # delivery attempts (responses)
    delivered: bool  # an attempt was answered 2xx
    dead: bool  # dead-lettered
    expired: bool = False  # dropped undelivered past its type's time to live


@dataclass(frozen=True)
class HistoryPage:
    """Items after a watermark, and where the next read starts."""

    items: list[HistoryRow]
    watermark: Watermark
    # Items exist that may still be joined by earlier ones (a transaction not finished):
    # read again shortly.
    held_back: bool = False
    # The page is full: read again at once.
    more: bool = False


@dataclass(frozen=True)
class TurnReplies:
    """A bot turn's replies to store: to `inbound_id`, in `conversation`, under the
    conversation's outbound partition count (`partitions` if it has none yet)."""

    conversation: ConversationRecord
    inbound_id: str
    replies: list[tuple[str, dict[str, Any]]]
    partitions: int


@dataclass(frozen=True)
class TurnRecord:
    """How far the bot turn of an incoming message got: its responses so far."""

    handled: bool  # the turn settled: its responses are all stored
    dead: bool  # the message was dead-lettered: no turn will answer it
    responses: list[OutgoingRecord]


@dataclass(frozen=True)
class SentResponse:
    """A response, and whether an attempt delivered it."""

    record: OutgoingRecord
    delivered: bool


StatusClass = Literal["2xx", "3xx", "4xx", "5xx", "error"]  # error: no answer
AttemptOutcome = Literal["delivered", "failed"]


@dataclass(frozen=True)
class AttemptQuery:
    """What attempts to find (`Attempts.search_attempts`); None: any."""

    integration_id: str | None = None
    conversation_id: str | None = None  # the relay's id, or the caller's
    delivery_id: str | None = None  # the webhook-id
    status_class: StatusClass | None = None
    outcome: AttemptOutcome | None = None
    since: datetime | None = None
    until: datetime | None = None
    # Newest first: only attempts older than this one (created_at, id).
    before: tuple[datetime, str] | None = None


class FoundAttempt(AttemptRecord):
    """An attempt with its id and its conversation."""

    id: str
    conversation_id: str | None
    conversation_external_id: str | None


# What retention deletes, in the order it goes: responses before the messages they answer,
# attempts once their response is gone, users and conversations once no message names them;
# conversation tokens expired or revoked before the cutoff.
PruneKind = Literal[
    "responses", "messages", "attempts", "conversations", "users", "conversation_tokens"
]
PRUNE_KINDS: tuple[PruneKind, ...] = (
    "responses",
    "messages",
    "attempts",
    "conversations",
    "users",
    "conversation_tokens",
)


@dataclass(frozen=True)
class Pruned:
    """Rows a prune deleted, by kind; not `complete` if it stopped early (its lease lost)."""

    counts: dict[PruneKind, int]
    complete: bool = True

    @property
    def total(self) -> int:
        """Rows deleted, of every kind."""
        return sum(self.counts.values())


@dataclass(frozen=True)
class DeadLetter:
    """A dead message as kept in the store (`relay.pipeline.dlq`), as `relay dlq list` and
    the admin API show it."""

    id: str
    stage: StageName
    integration_id: str
    conversation_id: str
    reason: str
    attempts: int
    last_status: int | None
    dead_at: int  # unix seconds
    body: dict[str, Any]
    deaths: int = 1  # how many times it died (a replayed letter may die again)

    def view(self) -> dict[str, Any]:
        """JSON for `--json`."""
        return {
            "id": self.id,
            "stage": self.stage,
            "integrationId": self.integration_id,
            "conversationId": self.conversation_id,
            "reason": self.reason,
            "attempts": self.attempts,
            "lastStatus": self.last_status,
            "deadAt": self.dead_at,
            "body": self.body,
        }


# Where a listing of dead letters is: (dead_at, stage, id) of the last letter seen.
DeadPosition = tuple[int, str, str]


@dataclass(frozen=True)
class DeadLetterFilter:
    """Which dead letters (None: any)."""

    stage: StageName | None = None
    integration_id: str | None = None
    conversation_id: str | None = None
    ids: frozenset[str] | None = None

    def __contains__(self, letter: DeadLetter) -> bool:
        return (
            (self.stage is None or letter.stage == self.stage)
            and (self.integration_id is None or letter.integration_id == self.integration_id)
            and (self.conversation_id is None or letter.conversation_id == self.conversation_id)
            and (self.ids is None or letter.id in self.ids)
        )


@dataclass(frozen=True)
class ConversationGrant:
    """What a conversation token lets its holder do: read one conversation of one
    integration (the caller's ids) and, with `converse`, post `user_id`'s messages to it,
    until `expires_at`."""

    integration_id: str
    conversation_id: str
    user_id: str
    scope: ConversationScope
    expires_at: datetime


@dataclass(frozen=True)
class ConversationTokenRecord:
    """A conversation token's metadata; the token itself is never stored, only its hash."""

    id: str
    grant: ConversationGrant
    prefix: str
    created_at: datetime
    revoked_at: datetime | None = None

    def live(self, now: datetime) -> bool:
        """Neither revoked nor expired at `now`."""
        return self.revoked_at is None and now < self.grant.expires_at
