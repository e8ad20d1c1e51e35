"""The store's interface: one narrow protocol per role, and `Store`, all of them at once.

Each consumer depends on the narrowest protocol it needs (the directory on
`IntegrationLookup`, the acceptor on `Inbound`...); `SqlStore` implements every one. SQL
lives in `relay.store.sql`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from typing import Any, Literal, Protocol

from relay.broker.topology import BASE_PARTITIONS, StageName
from relay.store.records import (
    Accepted,
    AttemptQuery,
    AttemptRecord,
    BotChoice,
    ConversationGrant,
    ConversationRecord,
    ConversationTokenRecord,
    DeadLetter,
    DeadLetterFilter,
    DeadPosition,
    DeliveryOptions,
    FoundAttempt,
    HistoryPage,
    InboundState,
    IntegrationRecord,
    OutgoingRecord,
    PendingMessage,
    Pruned,
    Resealed,
    SentResponse,
    Taken,
    TokenKind,
    TokenRecord,
    TurnRecord,
    TurnReplies,
    Unfinished,
    Unreadable,
    Vanished,
    Watermark,
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
        self,
        name: str,
        response_url: str,
        signing_secret: str,
        bot: BotChoice | None = None,
        delivery: DeliveryOptions | None = None,
    ) -> IntegrationRecord:
        """Create an integration (naming its bot, or with the deployment's default; with
        its delivery options, or the defaults)."""

    async def set_bot(self, integration_id: str, bot: BotChoice | None) -> bool:
        """Name the integration's bot (None: the deployment's default, RELAY_BOT); its
        credentials are stored sealed when the store has keys. False if there is no such
        integration."""

    async def set_delivery(self, integration_id: str, delivery: DeliveryOptions) -> bool:
        """Replace the integration's delivery options; False if there is no such one."""

    async def list_integrations(
        self, after: str | None = None, limit: int | None = None
    ) -> list[IntegrationRecord]:
        """Integrations, oldest first: every one, or a page of `limit` after the one with
        the id `after`."""

    async def set_response_url(self, integration_id: str, response_url: str) -> bool:
        """Change an integration's response endpoint; False if there is no such one."""

    async def delete_integration(self, integration_id: str) -> bool:
        """Delete an integration with its tokens, users, conversations, messages and
        attempts; False if there is no such one."""

    async def rotate_secret(
        self, integration_id: str, secret: str, previous_until: datetime
    ) -> IntegrationRecord | None:
        """Make `secret` current; the old one stays valid for signing until `previous_until`.
        Secrets are given and answered in plain text, and stored sealed when the store has
        keys (`relay.store.secrets`)."""

    async def create_token(
        self, integration_id: str, kind: TokenKind, token_hash: str, prefix: str
    ) -> TokenRecord:
        """Record a token by its hash."""

    async def list_tokens(self, integration_id: str) -> list[TokenRecord]:
        """Every token of an integration, revoked ones included."""

    async def revoke_token(self, token_id: str) -> bool:
        """Revoke a token (an integration's or an admin token); False if there is no such
        active token."""

    async def create_admin_token(self, token_hash: str, prefix: str) -> TokenRecord:
        """Record an admin token (the admin API's) by its hash."""

    async def admin_token_active(self, token_hash: str) -> bool:
        """Whether an admin token with this hash exists and is not revoked (one indexed
        row, looked up at every admin request)."""

    async def reseal_secrets(self) -> Resealed:
        """Seal every stored secret (signing, previous signing and bot secrets) again with
        the first key, a plain one for the first time (`relay secrets reencrypt`); those no
        key opens are left as they are and named in the answer."""

    async def list_admin_tokens(self) -> list[TokenRecord]:
        """Every admin token, revoked ones included."""


class Queued(Protocol):
    """A message's publish confirmed, or never possible: what every publisher marks."""

    async def mark_queued(self, message_ids: Sequence[str]) -> None:
        """The broker confirmed the messages: they are accepted for good."""

    async def end_unpublished(self, message_id: str, dead_at: datetime) -> None:
        """A pending message that can never be published: dead, no longer pending (so no
        outbox takes it again and no conversation waits behind it)."""


class Inbound(Queued, Protocol):
    """Inbound messages accepted exactly once (`relay.ingress.accept`), and their outbox."""

    async def accept_incoming(
        self,
        integration_id: str,
        request: InboundRequest,
        lease_until: datetime,
        request_id: str | None,
        partitions: int = BASE_PARTITIONS,
    ) -> Accepted | Vanished:
        """Record an inbound message once per (integration, messageId), in `pending` state:
        one attempt, whose outcome is a value.

        `Accepted` with `created` if it wrote the message (and the user and conversation
        it made for it), without if the messageId exists already (the existing objects;
        nothing else written stays). `Vanished` if what it relied on was removed by a
        concurrent discard: nothing written stays, and the caller tries again. The message
        goes under its conversation's partition count, moved to `partitions` first if
        nothing of it is unfinished (`Accepted.partitions` says which).
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
    ) -> list[PendingMessage | Unreadable]:
        """Claim pending messages whose lease expired (a crash between commit and publish);
        a claimed row that cannot be read back comes as `Unreadable`."""


class Outgoing(Queued, Protocol):
    """Bot responses stored, then published (`relay.pipeline.replies`), and their outbox."""

    async def record_pushed(
        self,
        conversation: ConversationRecord,
        type_: str,
        payload: dict[str, Any],
        idempotency_key: str | None,
        partitions: int = BASE_PARTITIONS,
    ) -> tuple[OutgoingRecord, bool]:
        """Store one message the bot sent on its own; (record, created). A repeated key
        answers the message it created."""

    async def settle_partitions(
        self, conversation_id: str, stage: Literal["inbound", "outbound"], count: int
    ) -> int:
        """Move the conversation to the partition count `count` in `stage` unless it has an
        unfinished message there; the count its next message goes under."""

    async def claim_stale_outgoing(
        self, before: datetime, now: datetime, lease_until: datetime, limit: int
    ) -> list[OutgoingRecord | Unreadable]:
        """Claim responses stored before `before` and never confirmed by the broker; a
        claimed row that cannot be read back comes as `Unreadable`."""


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
        partitions: int = BASE_PARTITIONS,
    ) -> list[OutgoingRecord]:
        """Store the bot's replies to an inbound message of `conversation`, once: numbered,
        in one transaction that also marks the message handled (and queued: a handled
        message was taken off the broker, so its ingress must neither discard nor republish
        it).

        If they were stored before (a redelivered message), those are returned instead.
        They go under the conversation's outbound partition count (`partitions` if it has
        none yet): see `Generations.settle_partitions`.
        """

    async def record_turns(self, turns: Sequence[TurnReplies]) -> list[list[OutgoingRecord]]:
        """`record_replies` of several turns, each of its own conversation, in one
        transaction (one commit): the records of each, in the order of `turns`. Raises if
        a turn cannot be stored (none is then) or its message is not there (the others are
        stored: asked again, they are answered as stored)."""


class ParkingQueries(Protocol):
    """What a worker meeting a conversation asks (its messages not finished with), and the
    marks that answer it: a retry planned, a message dead-lettered."""

    async def unhandled(self, conversation_id: str, since: datetime) -> list[Unfinished]:
        """The conversation's queued incoming messages accepted since `since` that no bot
        turn has handled and that are not dead-lettered, oldest first."""

    async def undelivered(self, conversation_id: str, since: datetime) -> list[Unfinished]:
        """The conversation's responses created since `since` that no attempt has finished
        with and that were not dead-lettered or expired, by sequence."""

    async def mark_retrying(self, message_id: str, retry_at: datetime) -> None:
        """An incoming message's failed turn is tried again at `retry_at`."""

    async def mark_dead(self, message_id: str, dead_at: datetime) -> None:
        """A message (incoming, or a response) was dead-lettered: nothing more is to come
        for it, and nothing waits behind it."""

    async def mark_expired(self, message_id: str, expired_at: datetime) -> None:
        """A response was dropped undelivered past its type's time to live (state `expired`):
        nothing more is to come for it, and nothing waits behind it."""

    async def waiting_responses(
        self, integration_ids: list[str], since: datetime
    ) -> dict[str, int]:
        """How many responses of each integration created since `since` no attempt has
        finished with (not delivered, dead-lettered or expired yet)."""


class Attempts(Protocol):
    """Delivery attempts, and an endpoint disabled by a `410 Gone`."""

    async def record_attempts(self, attempts: Sequence[AttemptRecord]) -> None:
        """Log delivery attempts, in one transaction."""

    async def list_attempts(self, delivery_id: str) -> list[AttemptRecord]:
        """Every attempt of a delivery, oldest first."""

    async def search_attempts(self, query: AttemptQuery, limit: int) -> list[FoundAttempt]:
        """Up to `limit` attempts matching `query`, newest first."""

    async def set_disabled(self, integration_id: str, disabled_at: datetime | None) -> bool:
        """Disable the integration's endpoint (410 Gone), or enable it again with None."""

    async def disable(self, integration_id: str, disabled_at: datetime) -> bool:
        """Disable the integration's endpoint unless it is disabled already: True only for
        the call that disabled it (whoever tells of it, tells once)."""


class Generations(Protocol):
    """The partition counts services run with (`relay.pipeline.generations`)."""

    async def register_partitions(self, count: int, now: datetime) -> None:
        """Note that a service runs with `count` partitions (as of `now`)."""

    async def partition_counts(self) -> dict[int, datetime]:
        """Every count registered, with when a service last said it runs with it."""

    async def unfinished_under(self, count: int) -> dict[Literal["inbound", "outbound"], int]:
        """Messages published under `count` not finished with yet, per stage."""

    async def forget_partitions(self, count: int) -> bool:
        """Remove a count from the registry; False if it was not there."""


class History(Protocol):
    """A conversation's history as the conversation API reads it (`relay.store.sql.history`)."""

    async def find_conversation(self, integration_id: str, external_id: str) -> str | None:
        """The relay id of the integration's conversation with the caller's id, or None."""

    async def history(
        self,
        scope: Literal["conversation", "integration"],
        scope_id: str,
        after: Watermark | None,
        limit: int,
        max_bytes: int | None = None,
    ) -> HistoryPage:
        """Up to `limit` items of a conversation (or of every conversation of an
        integration) after `after` (None: from the first), in the order they became
        visible; with `max_bytes`, only as many as come to about that many bytes of
        payload (the first always), the rest never read out of the database."""

    async def latest_watermark(self, integration_id: str) -> Watermark:
        """The watermark of the integration's latest item (where a stream from now starts)."""

    async def turn(self, message_id: str) -> TurnRecord:
        """The bot turn of an incoming message: settled or not, its responses so far."""


class Recovery(Protocol):
    """Responses to send again (the admin API's resend and recover)."""

    async def find_response(self, message_id: str) -> SentResponse | None:
        """A response by its relay id (None: no such response)."""

    async def given_up_since(self, integration_id: str, since: datetime) -> list[OutgoingRecord]:
        """The integration's responses given up on since then (dead-lettered, or failed with
        no retry planned) that no attempt delivered, in each conversation's order."""


class Retention(Protocol):
    """Leases, so that one process at a time does a job, and the prune they guard
    (`relay.store.sql.retention` says what goes)."""

    async def take_lease(self, name: str, holder: str, until: datetime, now: datetime) -> bool:
        """Hold the lease `name` until `until` if it is free, expired (at `now`) or held by
        `holder` already (which renews it); whether it is `holder`'s now."""

    async def release_lease(self, name: str, holder: str) -> None:
        """Let the lease go, if `holder` holds it."""

    async def prune(
        self, cutoff: datetime, batch: int, renew: Callable[[], Awaitable[bool]]
    ) -> Pruned:
        """Delete what is settled and older than `cutoff`, `batch` rows per statement,
        calling `renew` before each and stopping if it answers False."""

    async def reclaim_space(self, full_vacuum_limit: int | None) -> int:
        """SQLite: give the file's free pages back to the file system, switching an older
        file to incremental vacuum first (one whole VACUUM) if it is no larger than
        `full_vacuum_limit` bytes (None: any size); the bytes given back. PostgreSQL: 0
        (its autovacuum reuses the space)."""


class DeadLetterStore(Protocol):
    """Dead letters, kept here once the keeper took them off a dead-letter queue
    (`relay.pipeline.dlq`)."""

    async def keep_dead_letter(self, letter: DeadLetter) -> None:
        """Keep the letter (one that died again replaces its earlier death, counted)."""

    async def dead_letters(
        self, selection: DeadLetterFilter, after: DeadPosition | None, limit: int
    ) -> list[DeadLetter]:
        """The first `limit` selected letters after `after`, in the order they died (then
        by stage and id)."""

    async def forget_dead_letters(self, letters: Sequence[DeadLetter]) -> int:
        """Delete these letters, each unless it died again since it was read; how many."""

    async def dead_letter_summary(self) -> dict[StageName, tuple[int, int | None]]:
        """How many letters each stage keeps, and when the oldest died (unix seconds)."""


class RateBuckets(Protocol):
    """Token buckets shared by every process on the store (`relay.rates`)."""

    async def take_tokens(
        self, key: str, rate: float, burst: float, wanted: int, now: float
    ) -> Taken:
        """Take up to `wanted` tokens from the bucket `key` (refilled at `rate` per second up
        to `burst` since its last take, by the Unix time `now`; new buckets start full)."""


class ConversationTokens(Protocol):
    """Conversation tokens a browser holds (`relay.ingress.conversation_tokens`), by hash."""

    async def create_conversation_token(
        self, grant: ConversationGrant, token_hash: str, prefix: str
    ) -> ConversationTokenRecord:
        """Record a token of `grant` by its hash."""

    async def find_conversation_token(self, token_hash: str) -> ConversationTokenRecord | None:
        """The token with this hash, revoked or expired too (None: no such token)."""

    async def revoke_conversation_tokens(
        self, integration_id: str, conversation_id: str, token_id: str | None = None
    ) -> int:
        """Revoke the tokens of the integration's conversation (the caller's id) not revoked
        yet: every one, or only the one with the id `token_id`; how many."""


class Store(
    StoreHandle,
    Integrations,
    Inbound,
    Outgoing,
    Conversations,
    Turns,
    ParkingQueries,
    Attempts,
    Generations,
    History,
    Recovery,
    Retention,
    DeadLetterStore,
    RateBuckets,
    ConversationTokens,
    Protocol,
):
    """Persistent state of the relay, every role at once. Implemented for SQLite and PostgreSQL."""
