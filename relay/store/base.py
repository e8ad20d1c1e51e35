"""The store's interface and its records; SQL lives in the implementations beside this file."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict

from relay.wire import InboundRequest, MessageBundle

TokenKind = Literal["integration", "bot"]
MessageState = Literal["pending", "queued"]


class IntegrationRecord(BaseModel):
    """An integration: one back end with its response endpoint and signing secret."""

    model_config = ConfigDict(frozen=True)

    id: str
    name: str
    response_url: str
    signing_secret: str
    created_at: datetime
    disabled_at: datetime | None = None
    # During a rotation's grace period deliveries are signed with both secrets.
    previous_secret: str | None = None
    previous_secret_until: datetime | None = None

    def signing_secrets(self, now: datetime) -> list[str]:
        """The secrets to sign with now: the current one, and the previous during its grace."""
        until = self.previous_secret_until
        if self.previous_secret and until is not None and now < until:
            return [self.signing_secret, self.previous_secret]
        return [self.signing_secret]


class TokenRecord(BaseModel):
    """A token's metadata; the token itself is never stored, only its hash."""

    model_config = ConfigDict(frozen=True)

    id: str
    integration_id: str
    kind: TokenKind
    prefix: str
    created_at: datetime
    revoked_at: datetime | None = None


@dataclass(frozen=True)
class Accepted:
    """The outcome of recording an inbound message.

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


@dataclass(frozen=True)
class PendingMessage:
    """An inbound message whose publish was never confirmed (the outbox)."""

    integration_id: str
    bundle: MessageBundle
    text: str
    request_id: str | None
    lease_owner: str


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


class ConversationRecord(BaseModel):
    """A conversation with what the push API needs to answer in it."""

    model_config = ConfigDict(frozen=True)

    id: str
    integration_id: str
    external_id: str
    # The user of its latest incoming message: the one the bot is talking to.
    user_id: str


InboundState = Literal["missing", "pending", "queued", "handled"]


class Store(Protocol):
    """Persistent state of the relay. Implemented for SQLite and PostgreSQL."""

    async def ping(self) -> None:
        """Raise if the database cannot be reached."""

    async def close(self) -> None:
        """Release connections."""

    async def create_integration(
        self, name: str, response_url: str, signing_secret: str
    ) -> IntegrationRecord:
        """Create an integration."""

    async def get_integration(self, integration_id: str) -> IntegrationRecord | None:
        """One integration, or None."""

    async def list_integrations(self) -> list[IntegrationRecord]:
        """All integrations, oldest first."""

    async def create_token(
        self, integration_id: str, kind: TokenKind, token_hash: str, prefix: str
    ) -> TokenRecord:
        """Record a token by its hash."""

    async def active_token_hashes(self, integration_id: str, kind: TokenKind) -> list[str]:
        """Hashes of the integration's tokens of that kind that are not revoked."""

    async def list_tokens(self, integration_id: str) -> list[TokenRecord]:
        """Every token of an integration, revoked ones included."""

    async def revoke_token(self, token_id: str) -> bool:
        """Revoke a token; False if there is no such active token."""

    async def accept_incoming(
        self,
        integration_id: str,
        request: InboundRequest,
        lease_until: datetime,
        request_id: str | None,
    ) -> Accepted:
        """Record an inbound message once per (integration, messageId), in `pending` state.

        Writes user, conversation and message in one transaction, or nothing when the
        messageId exists already (then the existing objects are returned).
        """

    async def find_incoming(self, integration_id: str, message_id: str) -> Accepted | None:
        """The inbound message with that caller messageId, or None."""

    async def mark_queued(self, message_ids: Sequence[str]) -> None:
        """The broker confirmed the messages: they are accepted for good."""

    async def discard_pending(self, accepted: Accepted) -> bool:
        """Undo `accept_incoming` after a failed publish, if the caller still holds the lease.

        Removes the message, and the user and conversation the call created unless another
        message uses them by now. False if the lease had passed to someone else.
        """

    async def claim_pending(
        self, message_id: str, now: datetime, lease_until: datetime
    ) -> str | None:
        """Take over a pending message whose lease expired; the new lease owner, or None."""

    async def claim_stale_pending(
        self, now: datetime, lease_until: datetime, limit: int
    ) -> list[PendingMessage]:
        """Claim pending messages whose lease expired (a crash between commit and publish)."""

    async def inbound_state(self, message_id: str) -> InboundState:
        """Whether an inbound message was accepted, and whether the bot's replies are stored."""

    async def record_replies(
        self, inbound_id: str, replies: list[tuple[str, dict[str, Any]]]
    ) -> list[OutgoingRecord]:
        """Store the bot's replies to an inbound message, once: numbered, in one transaction.

        If they were stored before (a redelivered message), those are returned instead.
        """

    async def record_pushed(
        self,
        conversation: ConversationRecord,
        type_: str,
        payload: dict[str, Any],
        idempotency_key: str | None,
    ) -> tuple[OutgoingRecord, bool]:
        """Store one message the bot sent on its own; (record, created). A repeated key
        answers the message it created."""

    async def claim_stale_outgoing(
        self, before: datetime, now: datetime, lease_until: datetime, limit: int
    ) -> list[OutgoingRecord]:
        """Claim responses stored before `before` and never confirmed by the broker."""

    async def get_conversation(self, conversation_id: str) -> ConversationRecord | None:
        """A conversation by its relay id."""

    async def rotate_secret(
        self, integration_id: str, secret: str, previous_until: datetime
    ) -> IntegrationRecord | None:
        """Make `secret` current; the old one stays valid for signing until `previous_until`."""

    async def set_disabled(self, integration_id: str, disabled_at: datetime | None) -> bool:
        """Disable the integration's endpoint (410 Gone), or enable it again with None."""

    async def record_attempts(self, attempts: Sequence[AttemptRecord]) -> None:
        """Log delivery attempts, in one transaction."""

    async def undelivered(self, conversation_id: str, since: datetime) -> list[Unfinished]:
        """The conversation's responses created since `since` that no attempt has finished
        with and that were not dead-lettered, by sequence."""

    async def unhandled(self, conversation_id: str, since: datetime) -> list[Unfinished]:
        """The conversation's queued incoming messages accepted since `since` that no bot
        turn has handled and that are not dead-lettered, oldest first."""

    async def mark_retrying(self, message_id: str, retry_at: datetime) -> None:
        """An incoming message's failed turn is tried again at `retry_at`."""

    async def mark_dead(self, message_id: str, dead_at: datetime) -> None:
        """A message (incoming, or a response) was dead-lettered: nothing more is to come
        for it, and nothing waits behind it."""

    async def list_attempts(self, delivery_id: str) -> list[AttemptRecord]:
        """Every attempt of a delivery, oldest first."""

    async def bot_secret(self, integration_id: str) -> str:
        """The integration's secret for conversation-scoped reply tokens (made on first use)."""
