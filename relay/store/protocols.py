"""The store's interface: one narrow protocol per role, and `Store`, all of them at once.

Each consumer depends on the narrowest protocol it needs (the directory on
`IntegrationLookup`, the acceptor on `Inbound`...); `SqlStore` implements every one. SQL
lives in `relay.store.sql`.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any, Protocol

from relay.store.records import (
    Accepted,
    AttemptRecord,
    ConversationRecord,
    InboundState,
    IntegrationRecord,
    OutgoingRecord,
    PendingMessage,
    TokenKind,
    TokenRecord,
    Unfinished,
)
from relay.wire import InboundRequest


class StoreHandle(Protocol):
    """The store as a service holds it: checked for readiness, closed at stop."""

    async def ping(self) -> None:
        """Raise if the database cannot be reached."""

    async def close(self) -> None:
        """Release connections."""


class IntegrationLookup(Protocol):
    """An integration and its token hashes: what authenticating a request needs
    (`relay.store.directory`), and the delivery worker to find an endpoint."""

    async def get_integration(self, integration_id: str) -> IntegrationRecord | None:
        """One integration, or None."""

    async def active_token_hashes(self, integration_id: str, kind: TokenKind) -> list[str]:
        """Hashes of the integration's tokens of that kind that are not revoked."""


class Integrations(IntegrationLookup, Protocol):
    """Integrations and their tokens, as the admin commands manage them."""

    async def create_integration(
        self, name: str, response_url: str, signing_secret: str
    ) -> IntegrationRecord:
        """Create an integration."""

    async def list_integrations(self) -> list[IntegrationRecord]:
        """All integrations, oldest first."""

    async def rotate_secret(
        self, integration_id: str, secret: str, previous_until: datetime
    ) -> IntegrationRecord | None:
        """Make `secret` current; the old one stays valid for signing until `previous_until`."""

    async def create_token(
        self, integration_id: str, kind: TokenKind, token_hash: str, prefix: str
    ) -> TokenRecord:
        """Record a token by its hash."""

    async def list_tokens(self, integration_id: str) -> list[TokenRecord]:
        """Every token of an integration, revoked ones included."""

    async def revoke_token(self, token_id: str) -> bool:
        """Revoke a token; False if there is no such active token."""


class Queued(Protocol):
    """A message's publish confirmed: what every publisher marks."""

    async def mark_queued(self, message_ids: Sequence[str]) -> None:
        """The broker confirmed the messages: they are accepted for good."""


class Inbound(Queued, Protocol):
    """Inbound messages accepted exactly once (`relay.ingress.accept`), and their outbox."""

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


class Outgoing(Queued, Protocol):
    """Bot responses stored, then published (`relay.pipeline.replies`), and their outbox."""

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


class Conversations(Protocol):
    """What a bot's own calls into a conversation need (push API, connector, reply tokens)."""

    async def get_conversation(self, conversation_id: str) -> ConversationRecord | None:
        """A conversation by its relay id."""

    async def bot_secret(self, integration_id: str) -> str:
        """The integration's secret for conversation-scoped reply tokens (made on first use)."""


class Turns(Protocol):
    """A bot turn: whether its message was accepted, and its replies stored once."""

    async def inbound_state(self, message_id: str) -> InboundState:
        """Whether an inbound message was accepted, and whether the bot's replies are stored."""

    async def record_replies(
        self,
        conversation: ConversationRecord,
        inbound_id: str,
        replies: list[tuple[str, dict[str, Any]]],
    ) -> list[OutgoingRecord]:
        """Store the bot's replies to an inbound message of `conversation`, once: numbered,
        in one transaction that also marks the message handled (and queued: a handled
        message was taken off the broker, so its ingress must neither discard nor republish
        it).

        If they were stored before (a redelivered message), those are returned instead.
        """


class ParkingQueries(Protocol):
    """What a worker meeting a conversation asks (its messages not finished with), and the
    marks that answer it: a retry planned, a message dead-lettered."""

    async def unhandled(self, conversation_id: str, since: datetime) -> list[Unfinished]:
        """The conversation's queued incoming messages accepted since `since` that no bot
        turn has handled and that are not dead-lettered, oldest first."""

    async def undelivered(self, conversation_id: str, since: datetime) -> list[Unfinished]:
        """The conversation's responses created since `since` that no attempt has finished
        with and that were not dead-lettered, by sequence."""

    async def mark_retrying(self, message_id: str, retry_at: datetime) -> None:
        """An incoming message's failed turn is tried again at `retry_at`."""

    async def mark_dead(self, message_id: str, dead_at: datetime) -> None:
        """A message (incoming, or a response) was dead-lettered: nothing more is to come
        for it, and nothing waits behind it."""


class Attempts(Protocol):
    """Delivery attempts, and an endpoint disabled by a `410 Gone`."""

    async def record_attempts(self, attempts: Sequence[AttemptRecord]) -> None:
        """Log delivery attempts, in one transaction."""

    async def list_attempts(self, delivery_id: str) -> list[AttemptRecord]:
        """Every attempt of a delivery, oldest first."""

    async def set_disabled(self, integration_id: str, disabled_at: datetime | None) -> bool:
        """Disable the integration's endpoint (410 Gone), or enable it again with None."""


class Store(
    StoreHandle,
    Integrations,
    Inbound,
    Outgoing,
    Conversations,
    Turns,
    ParkingQueries,
    Attempts,
    Protocol,
):
    """Persistent state of the relay, every role at once. Implemented for SQLite and PostgreSQL."""
