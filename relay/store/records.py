"""The store's records: what its methods take and answer (`relay.store.protocols`)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from relay.wire import MessageBundle

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
