"""Inbound messages: accepted once per messageId in `pending` state with a lease, marked
queued once the broker confirmed them, discarded or claimed again when not.

Recording one is a single attempt with an outcome as a value (`accept_incoming`): created,
found there already, or `Vanished` — what the attempt relied on was removed by a concurrent
discard, and the acceptor (`relay.ingress.accept`) tries again. Every new message, of a
known conversation or of one just made, is one row of a batch written by one statement
(`relay.store.sql.new_messages`, numbered per conversation there).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime

from relay.broker.topology import BASE_PARTITIONS
from relay.store.batching import GroupCommit
from relay.store.driver import Driver, IntegrityViolation, Row, StoreError
from relay.store.records import Accepted, PendingMessage, Unreadable, Vanished
from relay.store.sql.common import MAX_PARAMETERS, as_datetime, chunks, delete_unused, new_id
from relay.store.sql.generations import settle_in
from relay.store.sql.new_messages import (
    NUMBERING_PARAMETERS,
    KnownRows,
    NewMessage,
    SeenRow,
    found_or_made,
    write_numbered,
)
from relay.store.sql.stamps import stamp_set
from relay.wire import Conversation, InboundRequest, Message, MessageBundle, Tags, User

_BUNDLE_SELECT = """
SELECT m.id, m.external_id, m.type, m.text, m.payload, m.direction, m.fingerprint, m.state,
       m.lease_until, m.created_at, m.updated_at, m.integration_id, m.request_id, m.partitions,
       m.inbound_sequence,
       u.id AS u_id, u.external_id AS u_ext, u.created_at AS u_created, u.updated_at AS u_updated,
       c.id AS c_id, c.external_id AS c_ext, c.created_at AS c_created, c.updated_at AS c_updated
FROM messages m
JOIN users u ON u.id = m.user_id
JOIN conversations c ON c.id = m.conversation_id
"""


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
        lease_until=as_datetime(lease) if lease is not None else None,
        partitions=row["partitions"],
        sequence=row["inbound_sequence"],
    )


class InboundSql:
    """`Inbound` over a `Driver`: every statement runs on SQLite and PostgreSQL."""

    _driver: Driver
    _known: KnownRows
    _new_messages: GroupCommit[NewMessage]

    async def accept_incoming(
        self,
        integration_id: str,
        request: InboundRequest,
        lease_until: datetime,
        request_id: str | None,
        partitions: int = BASE_PARTITIONS,
    ) -> Accepted | Vanished:
        # One attempt, never retried here: the acceptor retries the whole of it (see there).
        # No look-up first: the unique key finds a repeated messageId, and new messages
        # (the common case) save a round trip.
        rows = await self._rows_for(integration_id, request, partitions)
        if rows is None:
            return Vanished()
        new = NewMessage(integration_id, request, rows, lease_until, request_id, partitions)
        try:
            await self._new_messages.add(new)
        except StoreError as error:
            # Not written: nor is what was made for it kept (as by a rolled-back transaction).
            with contextlib.suppress(StoreError):
                await self._release(new)
            if not isinstance(error, IntegrityViolation):
                raise
            # A user or conversation it named was removed by a concurrent discard (perhaps
            # one remembered here): the next attempt looks them up again.
            self._known.forget(integration_id, request)
            return Vanished()
        if not new.inserted:
            await self._release(new)
            found = await self.find_incoming(integration_id, request.messageId)
            # None: the first writer's publish failed and it discarded the row.
            return found if found is not None else Vanished()
        accepted = new.accepted()
        conv = replace(new.conv, partitions=accepted.partitions)
        self._known.remember(integration_id, request, new.user, conv)
        return accepted

    async def _rows_for(
        self, integration_id: str, request: InboundRequest, partitions: int
    ) -> tuple[SeenRow, SeenRow] | None:
        """The message's user and conversation: as remembered here, the conversation under
        the caller's partition count; otherwise found or made in a transaction of their own,
        the conversation moved to that count first if it can be (a message written later
        still goes under the count its conversation has then: see `write_numbered`)."""
        known = self._known.rows_of(integration_id, request, partitions)
        if known is not None:
            return known
        dialect = self._driver.dialect
        async with self._driver.transaction() as conn:
            rows = await found_or_made(conn, integration_id, request)
            if rows is None:
                return None
            user, conv = rows
            settled = await settle_in(conn, dialect, conv.id, "inbound", partitions)
        return user, replace(conv, partitions=settled)

    async def _release(self, new: NewMessage) -> None:
        """Remove the user and conversation made for a message that was not written, unless
        another message uses them by now."""
        await self._delete_made(
            new.conv.id if new.conv.created else None, new.user.id if new.user.created else None
        )

    async def _delete_made(self, conversation_id: str | None, user_id: str | None) -> None:
        """Delete the conversation and user an attempt made (those not None). Best effort, one
        statement each: a message that came to use them since (even one not yet committed)
        makes the foreign key refuse, and then they stay."""
        if conversation_id is not None:
            await delete_unused(self._driver, "conversations", [conversation_id])
        if user_id is not None:
            await delete_unused(self._driver, "users", [user_id])

    async def _write_new_messages(self, batch: Sequence[NewMessage]) -> None:
        """Write a batch of new inbound messages in one statement (on SQLite, two in one
        transaction); each learns whether it was inserted (or its messageId was there
        already), and its number. A batch refused as a whole (a user or conversation gone) is
        written again one by one by the group commit."""
        dialect = self._driver.dialect
        # PostgreSQL numbers and writes in one statement: autocommit, one round trip.
        writing = self._driver.connection if dialect == "postgresql" else self._driver.transaction
        per_row = len(batch[0].values) + NUMBERING_PARAMETERS
        for chunk in chunks(batch, MAX_PARAMETERS // per_row):
            async with writing() as conn:
                rows = await write_numbered(conn, dialect, chunk)
            for new in chunk:
                new.written(rows)

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
        # On PostgreSQL the rows are taken in id order, as a batch of bot turns takes them.
        dialect = self._driver.dialect
        for chunk in chunks(sorted(message_ids), MAX_PARAMETERS):
            marks = ", ".join(["?"] * len(chunk))
            rows = (
                f"SELECT id FROM messages WHERE id IN ({marks}) ORDER BY id FOR UPDATE"
                if dialect == "postgresql"
                else marks
            )
            async with self._driver.connection() as conn:
                # A response a delivery worker already dropped as expired stays so.
                await conn.execute(
                    "UPDATE messages SET state = CASE WHEN state = 'expired' THEN state"
                    " ELSE 'queued' END, lease_until = NULL, lease_owner = NULL,"
                    f" {stamp_set(dialect)} WHERE id IN ({rows})",
                    *chunk,
                )

    async def end_unpublished(self, message_id: str, dead_at: datetime) -> None:
        # 'queued': the state of a row no outbox publishes; `dead_at` says it died. An
        # incoming message is stamped (visible in the history) as a queued one is.
        async with self._driver.connection() as conn:
            await conn.execute(
                "UPDATE messages SET state = 'queued', dead_at = ?, retry_at = NULL,"
                f" lease_until = NULL, lease_owner = NULL, {stamp_set(self._driver.dialect)}"
                " WHERE id = ? AND state = 'pending'",
                dead_at,
                message_id,
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
        await self._delete_made(
            bundle.conversation.id if accepted.created_conversation else None,
            bundle.user.id if accepted.created_user else None,
        )
        return True

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
    ) -> list[PendingMessage | Unreadable]:
        async with self._driver.connection() as conn:
            rows = await conn.fetchall(
                # Responses are pending too until published; they have an outbox of their own.
                _BUNDLE_SELECT + " WHERE m.direction = 'incoming' AND m.state = 'pending'"
                " AND m.lease_until < ?"
                " ORDER BY m.created_at LIMIT ?",
                now,
                limit,
            )
        claimed: list[PendingMessage | Unreadable] = []
        for row in rows:
            # A conditional update per row: whichever ingress wins it publishes it.
            owner = await self.claim_pending(row["id"], now, lease_until)
            if owner is not None:
                claimed.append(_pending(row, owner))
        return claimed


def _pending(row: Row, owner: str) -> PendingMessage | Unreadable:
    """A claimed row as the outbox publishes it, or Unreadable if it cannot be read back."""
    try:
        bundle = _bundle(row)
    except (ValueError, RecursionError) as error:
        reason = f"the stored message cannot be read: {type(error).__name__}"
        return Unreadable(row["id"], row["integration_id"], row["c_id"], reason)
    return PendingMessage(
        integration_id=row["integration_id"],
        bundle=bundle,
        text=row["text"],
        request_id=row["request_id"],
        lease_owner=owner,
        partitions=row["partitions"],
        sequence=row["inbound_sequence"],
    )
