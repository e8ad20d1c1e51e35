"""The store's logic and SQL, shared by both dialects through the `Driver` interface."""

from __future__ import annotations

import json
import secrets
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

from relay.store.base import (
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
from relay.store.driver import (
    Conn,
    Driver,
    IntegrityViolation,
    Row,
    StoreError,
    StoreUnavailable,
)
from relay.wire import (
    Conversation,
    InboundRequest,
    Message,
    MessageBundle,
    Tags,
    User,
    utcnow,
)

_BUNDLE_SELECT = """
SELECT m.id, m.external_id, m.type, m.text, m.payload, m.direction, m.fingerprint, m.state,
       m.lease_until, m.created_at, m.updated_at, m.integration_id, m.request_id,
       u.id AS u_id, u.external_id AS u_ext, u.created_at AS u_created, u.updated_at AS u_updated,
       c.id AS c_id, c.external_id AS c_ext, c.created_at AS c_created, c.updated_at AS c_updated
FROM messages m
JOIN users u ON u.id = m.user_id
JOIN conversations c ON c.id = m.conversation_id
"""


_ATTEMPTS = 5
# Bound values per statement: SQLite before 3.32 allows 999 (PostgreSQL 32767).
MAX_PARAMETERS = 999
T = TypeVar("T")
# The columns of delivery_attempts besides its id: the record's fields, by name.
_ATTEMPT_FIELDS = tuple(AttemptRecord.model_fields)


class _Exists(Exception):
    """The messageId was recorded already (perhaps by a concurrent transaction)."""


class _Vanished(Exception):
    """A row seen a moment ago was removed by a concurrent discard."""


def new_id() -> str:
    """A relay id."""
    return str(uuid.uuid4())


def _bundle(row: Row) -> MessageBundle:
    return MessageBundle(
        user=User(
            id=row["u_id"],
            createdAt=row["u_created"],
            updatedAt=row["u_updated"],
            tags=Tags(id=row["u_ext"]),
        ),
        conversation=Conversation(
            id=row["c_id"],
            createdAt=row["c_created"],
            updatedAt=row["c_updated"],
            tags=Tags(id=row["c_ext"]),
        ),
        message=Message(
            id=row["id"],
            createdAt=row["created_at"],
            updatedAt=row["updated_at"],
            tags=Tags(id=row["external_id"] or row["id"]),
            type=row["type"],
            payload=json.loads(row["payload"]),
            direction=row["direction"],
            conversationId=row["c_id"],
            userId=row["u_id"],
        ),
    )


def _accepted(row: Row) -> Accepted:
    """An inbound message found in the store (so not created by this call)."""
    lease = row["lease_until"]
    return Accepted(
        bundle=_bundle(row),
        text=row["text"],
        fingerprint=row["fingerprint"],
        state=row["state"],
        created=False,
        lease_until=datetime.fromisoformat(lease) if isinstance(lease, str) else lease,
    )


_OUTGOING_SELECT = """
SELECT m.id, m.integration_id, m.conversation_id, c.external_id AS conversation_external_id,
       m.user_id, m.type, m.payload, m.sequence, m.state, m.created_at
FROM messages m JOIN conversations c ON c.id = m.conversation_id
"""


def _outgoing(row: Row) -> OutgoingRecord:
    return OutgoingRecord.model_validate({**row, "payload": json.loads(row["payload"])})


class RepliesMixin:
    """Bot replies: numbered per conversation, stored once per inbound message."""

    _driver: Driver

    async def inbound_state(self, message_id: str) -> InboundState:
        async with self._driver.connection() as conn:
            row = await conn.fetchone(
                "SELECT state, handled_at FROM messages WHERE id = ? AND direction = 'incoming'",
                message_id,
            )
        if row is None:
            return "missing"
        if row["handled_at"] is not None:
            return "handled"
        state: InboundState = row["state"]
        return state

    async def record_replies(
        self, inbound_id: str, replies: list[tuple[str, dict[str, Any]]]
    ) -> list[OutgoingRecord]:
        async with self._driver.transaction() as conn:
            inbound = await conn.fetchone(
                "SELECT integration_id, conversation_id, user_id, handled_at FROM messages"
                " WHERE id = ?",
                inbound_id,
            )
            if inbound is None:
                raise StoreError(f"no inbound message {inbound_id}")
            if inbound["handled_at"] is None:
                await _insert_outgoing(conn, inbound, replies, reply_to=inbound_id, key=None)
                await conn.execute(
                    "UPDATE messages SET handled_at = ? WHERE id = ?", utcnow(), inbound_id
                )
            rows = await conn.fetchall(
                _OUTGOING_SELECT + " WHERE m.reply_to = ? ORDER BY m.sequence", inbound_id
            )
        return [_outgoing(row) for row in rows]

    async def record_pushed(
        self,
        conversation: ConversationRecord,
        type_: str,
        payload: dict[str, Any],
        idempotency_key: str | None,
    ) -> tuple[OutgoingRecord, bool]:
        target = {
            "integration_id": conversation.integration_id,
            "conversation_id": conversation.id,
            "user_id": conversation.user_id,
        }
        try:
            async with self._driver.transaction() as conn:
                [new_id_] = await _insert_outgoing(
                    conn, target, [(type_, payload)], reply_to=None, key=idempotency_key
                )
                row = await conn.fetchone(_OUTGOING_SELECT + " WHERE m.id = ?", new_id_)
        except IntegrityViolation:
            # The idempotency key was used in this conversation: answer what it created.
            async with self._driver.connection() as conn:
                row = await conn.fetchone(
                    _OUTGOING_SELECT + " WHERE m.conversation_id = ? AND m.idempotency_key = ?",
                    conversation.id,
                    idempotency_key,
                )
            if row is None:
                raise
            return _outgoing(row), False
        if row is None:
            raise StoreError("a stored message could not be read back")
        return _outgoing(row), True

    async def claim_stale_outgoing(
        self, before: datetime, now: datetime, lease_until: datetime, limit: int
    ) -> list[OutgoingRecord]:
        async with self._driver.connection() as conn:
            rows = await conn.fetchall(
                _OUTGOING_SELECT + " WHERE m.direction = 'outgoing' AND m.state = 'pending'"
                " AND m.created_at < ? AND (m.lease_until IS NULL OR m.lease_until < ?)"
                " ORDER BY m.conversation_id, m.sequence LIMIT ?",
                before,
                now,
                limit,
            )
        claimed = []
        for row in rows:
            # A conditional update per row: one sweeper per lease publishes it.
            async with self._driver.connection() as conn:
                won = await conn.execute(
                    "UPDATE messages SET lease_until = ? WHERE id = ? AND state = 'pending'"
                    " AND (lease_until IS NULL OR lease_until < ?)",
                    lease_until,
                    row["id"],
                    now,
                )
            if won == 1:
                claimed.append(_outgoing(row))
        return claimed

    async def get_conversation(self, conversation_id: str) -> ConversationRecord | None:
        async with self._driver.connection() as conn:
            row = await conn.fetchone(
                "SELECT c.id, c.integration_id, c.external_id, m.user_id FROM conversations c"
                " JOIN messages m ON m.conversation_id = c.id AND m.direction = 'incoming'"
                " WHERE c.id = ? ORDER BY m.created_at DESC LIMIT 1",
                conversation_id,
            )
        return ConversationRecord.model_validate(row) if row else None

    async def bot_secret(self, integration_id: str) -> str:
        select = "SELECT bot_secret FROM integrations WHERE id = ?"
        async with self._driver.connection() as conn:
            row = await conn.fetchone(select, integration_id)
            if row is not None and row["bot_secret"] is None:
                # Made on first use; whoever writes first wins, everyone reads the winner's.
                await conn.execute(
                    "UPDATE integrations SET bot_secret = ? WHERE id = ? AND bot_secret IS NULL",
                    secrets.token_urlsafe(32),
                    integration_id,
                )
                row = await conn.fetchone(select, integration_id)
        if row is None:
            raise StoreError(f"no integration {integration_id}")
        return str(row["bot_secret"])


async def _insert_outgoing(
    conn: Conn,
    target: Row,
    replies: list[tuple[str, dict[str, Any]]],
    reply_to: str | None,
    key: str | None,
) -> list[str]:
    """Insert outgoing messages with the next sequence numbers of their conversation."""
    if not replies:
        return []
    counter = await conn.fetchone(
        "UPDATE conversations SET next_sequence = next_sequence + ? WHERE id = ?"
        " RETURNING next_sequence",
        len(replies),
        target["conversation_id"],
    )
    if counter is None:
        raise StoreError(f"no conversation {target['conversation_id']}")
    first = int(counter["next_sequence"]) - len(replies) + 1
    now, ids = utcnow(), []
    for offset, (type_, payload) in enumerate(replies):
        ids.append(new_id())
        await conn.execute(
            "INSERT INTO messages (id, integration_id, conversation_id, user_id, direction,"
            " type, text, payload, fingerprint, state, sequence, reply_to, idempotency_key,"
            " created_at, updated_at)"
            " VALUES (?, ?, ?, ?, 'outgoing', ?, ?, ?, '', 'pending', ?, ?, ?, ?, ?)",
            ids[-1],
            target["integration_id"],
            target["conversation_id"],
            target["user_id"],
            type_,
            str(payload.get("text", "")),
            json.dumps(payload),
            first + offset,
            reply_to,
            key,
            now,
            now,
        )
    return ids


class SqlStore(RepliesMixin):
    """`Store` over a `Driver`; every statement here runs on SQLite and PostgreSQL."""

    def __init__(self, driver: Driver) -> None:
        self._driver = driver

    @property
    def driver(self) -> Driver:
        """The driver, for tools and tests that inspect the tables directly."""
        return self._driver

    @property
    def dialect(self) -> str:
        """`sqlite` or `postgresql`."""
        return self._driver.dialect

    async def ping(self) -> None:
        async with self._driver.connection() as conn:
            await conn.fetchone("SELECT 1 AS ok")

    async def close(self) -> None:
        await self._driver.close()

    # -- integrations and tokens ------------------------------------------------------------

    async def create_integration(
        self, name: str, response_url: str, signing_secret: str
    ) -> IntegrationRecord:
        record = IntegrationRecord(
            id=new_id(),
            name=name,
            response_url=response_url,
            signing_secret=signing_secret,
            created_at=utcnow(),
        )
        async with self._driver.transaction() as conn:
            await conn.execute(
                "INSERT INTO integrations (id, name, response_url, signing_secret, created_at)"
                " VALUES (?, ?, ?, ?, ?)",
                record.id,
                record.name,
                record.response_url,
                record.signing_secret,
                record.created_at,
            )
        return record

    async def get_integration(self, integration_id: str) -> IntegrationRecord | None:
        async with self._driver.connection() as conn:
            row = await conn.fetchone("SELECT * FROM integrations WHERE id = ?", integration_id)
        return IntegrationRecord.model_validate(row) if row else None

    async def list_integrations(self) -> list[IntegrationRecord]:
        async with self._driver.connection() as conn:
            rows = await conn.fetchall("SELECT * FROM integrations ORDER BY created_at, id")
        return [IntegrationRecord.model_validate(row) for row in rows]

    async def rotate_secret(
        self, integration_id: str, secret: str, previous_until: datetime
    ) -> IntegrationRecord | None:
        async with self._driver.transaction() as conn:
            await conn.execute(
                "UPDATE integrations SET previous_secret = signing_secret,"
                " previous_secret_until = ?, signing_secret = ? WHERE id = ?",
                previous_until,
                secret,
                integration_id,
            )
            row = await conn.fetchone("SELECT * FROM integrations WHERE id = ?", integration_id)
        return IntegrationRecord.model_validate(row) if row else None

    async def set_disabled(self, integration_id: str, disabled_at: datetime | None) -> bool:
        async with self._driver.connection() as conn:
            changed = await conn.execute(
                "UPDATE integrations SET disabled_at = ? WHERE id = ?", disabled_at, integration_id
            )
        return changed == 1

    async def record_attempts(self, attempts: Sequence[AttemptRecord]) -> None:
        for chunk in _chunks(attempts, MAX_PARAMETERS // (len(_ATTEMPT_FIELDS) + 1)):
            await self._insert_attempts(chunk)

    async def _insert_attempts(self, attempts: Sequence[AttemptRecord]) -> None:
        row = "(" + ", ".join(["?"] * (len(_ATTEMPT_FIELDS) + 1)) + ")"
        values = [
            value
            for attempt in attempts
            for value in (new_id(), *(getattr(attempt, name) for name in _ATTEMPT_FIELDS))
        ]
        async with self._driver.connection() as conn:
            # One statement: atomic on its own, and one commit for the whole batch.
            await conn.execute(
                f"INSERT INTO delivery_attempts (id, {', '.join(_ATTEMPT_FIELDS)})"
                f" VALUES {', '.join([row] * len(attempts))}",
                *values,
            )

    async def undelivered(self, conversation_id: str, since: datetime) -> list[Unfinished]:
        async with self._driver.connection() as conn:
            rows = await conn.fetchall(
                "SELECT m.id AS message_id,"
                " (SELECT count(*) FROM delivery_attempts a WHERE a.message_id = m.id)"
                " AS attempts,"
                " (SELECT a.next_attempt_at FROM delivery_attempts a WHERE a.message_id = m.id"
                " ORDER BY a.created_at DESC LIMIT 1) AS next_attempt_at"
                " FROM messages m WHERE m.conversation_id = ? AND m.direction = 'outgoing'"
                " AND m.dead_at IS NULL AND m.created_at >= ? ORDER BY m.sequence",
                conversation_id,
                since,
            )
        return [
            Unfinished(message_id=row["message_id"], retry_at=row["next_attempt_at"])
            for row in rows
            if row["attempts"] == 0 or row["next_attempt_at"] is not None
        ]

    async def unhandled(self, conversation_id: str, since: datetime) -> list[Unfinished]:
        async with self._driver.connection() as conn:
            rows = await conn.fetchall(
                "SELECT m.id AS message_id, m.retry_at FROM messages m"
                " WHERE m.conversation_id = ? AND m.direction = 'incoming'"
                " AND m.state = 'queued' AND m.handled_at IS NULL AND m.dead_at IS NULL"
                " AND m.created_at >= ? ORDER BY m.created_at, m.id",
                conversation_id,
                since,
            )
        return [Unfinished.model_validate(row) for row in rows]

    async def mark_retrying(self, message_id: str, retry_at: datetime) -> None:
        async with self._driver.connection() as conn:
            await conn.execute(
                "UPDATE messages SET retry_at = ?, dead_at = NULL WHERE id = ?",
                retry_at,
                message_id,
            )

    async def mark_dead(self, message_id: str, dead_at: datetime) -> None:
        async with self._driver.connection() as conn:
            await conn.execute(
                "UPDATE messages SET retry_at = NULL, dead_at = ? WHERE id = ?",
                dead_at,
                message_id,
            )

    async def list_attempts(self, delivery_id: str) -> list[AttemptRecord]:
        async with self._driver.connection() as conn:
            rows = await conn.fetchall(
                "SELECT * FROM delivery_attempts WHERE delivery_id = ? ORDER BY created_at",
                delivery_id,
            )
        return [AttemptRecord.model_validate(row) for row in rows]

    async def create_token(
        self, integration_id: str, kind: TokenKind, token_hash: str, prefix: str
    ) -> TokenRecord:
        record = TokenRecord(
            id="tok_" + uuid.uuid4().hex[:16],
            integration_id=integration_id,
            kind=kind,
            prefix=prefix,
            created_at=utcnow(),
        )
        async with self._driver.transaction() as conn:
            await conn.execute(
                "INSERT INTO tokens (id, integration_id, kind, token_hash, prefix, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                record.id,
                integration_id,
                kind,
                token_hash,
                prefix,
                record.created_at,
            )
        return record

    async def active_token_hashes(self, integration_id: str, kind: TokenKind) -> list[str]:
        async with self._driver.connection() as conn:
            rows = await conn.fetchall(
                "SELECT token_hash FROM tokens"
                " WHERE integration_id = ? AND kind = ? AND revoked_at IS NULL",
                integration_id,
                kind,
            )
        return [row["token_hash"] for row in rows]

    async def list_tokens(self, integration_id: str) -> list[TokenRecord]:
        async with self._driver.connection() as conn:
            rows = await conn.fetchall(
                "SELECT * FROM tokens WHERE integration_id = ? ORDER BY created_at, id",
                integration_id,
            )
        return [TokenRecord.model_validate(row) for row in rows]

    async def revoke_token(self, token_id: str) -> bool:
        async with self._driver.transaction() as conn:
            changed = await conn.execute(
                "UPDATE tokens SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
                utcnow(),
                token_id,
            )
        return changed == 1

    # -- inbound messages -------------------------------------------------------------------

    async def accept_incoming(
        self,
        integration_id: str,
        request: InboundRequest,
        lease_until: datetime,
        request_id: str | None,
    ) -> Accepted:
        # No look-up first: the unique key finds a repeated messageId, and new messages
        # (the common case) save a round trip.
        for _ in range(_ATTEMPTS):
            try:
                async with self._driver.transaction() as conn:
                    return await self._insert_incoming(
                        conn, integration_id, request, lease_until, request_id
                    )
            except _Exists:
                found = await self.find_incoming(integration_id, request.messageId)
                if found is not None:
                    return found
                # The first writer's publish failed and it discarded the row: try again.
            except (_Vanished, IntegrityViolation):
                # A user or conversation was removed by a concurrent discard: try again.
                continue
        raise StoreUnavailable("could not record the message under contention; retry")

    async def _insert_incoming(
        self,
        conn: Conn,
        integration_id: str,
        request: InboundRequest,
        lease_until: datetime,
        request_id: str | None,
    ) -> Accepted:
        now = utcnow()
        user = await _get_or_create(conn, "users", integration_id, request.userId, now)
        conv = await _get_or_create(
            conn, "conversations", integration_id, request.conversationId, now
        )
        message = Message(
            id=new_id(),
            createdAt=now,
            updatedAt=now,
            tags=Tags(id=request.messageId),
            type=request.type,
            payload=request.normalized_payload(),
            direction="incoming",
            conversationId=conv.id,
            userId=user.id,
        )
        fingerprint, owner = request.fingerprint(), new_id()
        inserted = await conn.execute(
            "INSERT INTO messages (id, integration_id, external_id, conversation_id, user_id,"
            " direction, type, text, payload, fingerprint, state, lease_until, lease_owner,"
            " request_id, created_at, updated_at)"
            " VALUES (?, ?, ?, ?, ?, 'incoming', ?, ?, ?, ?, 'pending', ?, ?, ?, ?, ?)"
            " ON CONFLICT (integration_id, external_id) DO NOTHING",
            message.id,
            integration_id,
            request.messageId,
            conv.id,
            user.id,
            request.type,
            request.text,
            json.dumps(message.payload),
            fingerprint,
            lease_until,
            owner,
            request_id,
            now,
            now,
        )
        if inserted != 1:
            raise _Exists
        return Accepted(
            bundle=MessageBundle(
                user=User(**user.entity()),
                conversation=Conversation(**conv.entity()),
                message=message,
            ),
            text=request.text,
            fingerprint=fingerprint,
            state="pending",
            created=True,
            lease_until=lease_until,
            lease_owner=owner,
            created_user=user.created,
            created_conversation=conv.created,
        )

    async def find_incoming(self, integration_id: str, message_id: str) -> Accepted | None:
        async with self._driver.connection() as conn:
            row = await conn.fetchone(
                _BUNDLE_SELECT + " WHERE m.integration_id = ? AND m.external_id = ?",
                integration_id,
                message_id,
            )
        return _accepted(row) if row else None

    async def mark_queued(self, message_ids: Sequence[str]) -> None:
        # One statement per chunk: autocommit, no transaction round trips on the hot path.
        for chunk in _chunks(message_ids, MAX_PARAMETERS):
            async with self._driver.connection() as conn:
                await conn.execute(
                    "UPDATE messages SET state = 'queued', lease_until = NULL, lease_owner = NULL"
                    f" WHERE id IN ({', '.join(['?'] * len(chunk))})",
                    *chunk,
                )

    async def discard_pending(self, accepted: Accepted) -> bool:
        bundle = accepted.bundle
        async with self._driver.connection() as conn:
            deleted = await conn.execute(
                "DELETE FROM messages WHERE id = ? AND state = 'pending' AND lease_owner = ?",
                bundle.message.id,
                accepted.lease_owner,
            )
        if deleted != 1:
            return False
        # Best effort, one statement each: a message that came to use them since (even one
        # not yet committed) makes the foreign key refuse, and then they stay.
        if accepted.created_conversation:
            await self._delete_unused("conversations", "conversation_id", bundle.conversation.id)
        if accepted.created_user:
            await self._delete_unused("users", "user_id", bundle.user.id)
        return True

    async def _delete_unused(self, table: str, column: str, row_id: str) -> None:
        try:
            async with self._driver.connection() as conn:
                await conn.execute(
                    f"DELETE FROM {table} WHERE id = ? AND NOT EXISTS"
                    f" (SELECT 1 FROM messages WHERE {column} = ?)",
                    row_id,
                    row_id,
                )
        except IntegrityViolation:
            pass

    async def claim_pending(
        self, message_id: str, now: datetime, lease_until: datetime
    ) -> str | None:
        owner = new_id()
        async with self._driver.connection() as conn:
            changed = await conn.execute(
                "UPDATE messages SET lease_until = ?, lease_owner = ?"
                " WHERE id = ? AND direction = 'incoming' AND state = 'pending'"
                " AND lease_until < ?",
                lease_until,
                owner,
                message_id,
                now,
            )
        return owner if changed == 1 else None

    async def claim_stale_pending(
        self, now: datetime, lease_until: datetime, limit: int
    ) -> list[PendingMessage]:
        async with self._driver.connection() as conn:
            rows = await conn.fetchall(
                # Responses are pending too until published; they have an outbox of their own.
                _BUNDLE_SELECT + " WHERE m.direction = 'incoming' AND m.state = 'pending'"
                " AND m.lease_until < ?"
                " ORDER BY m.created_at LIMIT ?",
                now,
                limit,
            )
        claimed = []
        for row in rows:
            # A conditional update per row: whichever ingress wins it publishes it.
            owner = await self.claim_pending(row["id"], now, lease_until)
            if owner is not None:
                claimed.append(
                    PendingMessage(
                        integration_id=row["integration_id"],
                        bundle=_bundle(row),
                        text=row["text"],
                        request_id=row["request_id"],
                        lease_owner=owner,
                    )
                )
        return claimed


@dataclass(frozen=True)
class _Row:
    id: str
    external_id: str
    created_at: Any
    updated_at: Any
    created: bool

    def entity(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "createdAt": self.created_at,
            "updatedAt": self.updated_at,
            "tags": Tags(id=self.external_id),
        }


async def _get_or_create(
    conn: Conn, table: str, integration_id: str, external_id: str, now: datetime
) -> _Row:
    """The user/conversation with that caller id, created if missing."""
    select = (
        f"SELECT id, created_at, updated_at FROM {table}"
        " WHERE integration_id = ? AND external_id = ?"
    )
    row = await conn.fetchone(select, integration_id, external_id)
    if row is None:
        new = new_id()
        inserted = await conn.execute(
            f"INSERT INTO {table} (id, integration_id, external_id, created_at, updated_at)"
            " VALUES (?, ?, ?, ?, ?) ON CONFLICT (integration_id, external_id) DO NOTHING",
            new,
            integration_id,
            external_id,
            now,
            now,
        )
        if inserted == 1:
            return _Row(new, external_id, now, now, created=True)
        row = await conn.fetchone(select, integration_id, external_id)
        if row is None:  # the conflicting row was committed, then discarded
            raise _Vanished
    return _Row(row["id"], external_id, row["created_at"], row["updated_at"], created=False)


def _chunks(items: Sequence[T], size: int) -> list[Sequence[T]]:
    """`items` in slices of at most `size`."""
    return [items[start : start + size] for start in range(0, len(items), size)]
