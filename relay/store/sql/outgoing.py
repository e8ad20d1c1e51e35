"""Bot responses: numbered per conversation, stored once per inbound message, claimed by
the outbox when never confirmed; the conversation and bot secret a bot's own calls need."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from relay.broker.topology import BASE_PARTITIONS
from relay.store.driver import Conn, Driver, IntegrityViolation, Row, StoreError
from relay.store.records import (
    ConversationRecord,
    InboundState,
    OutgoingRecord,
    TurnReplies,
    Unreadable,
)
from relay.store.sql.common import MAX_PARAMETERS, chunks, new_id
from relay.store.sql.stamps import stamp_set, stamp_values
from relay.wire import utcnow

OUTGOING_SELECT = """
SELECT m.id, m.integration_id, m.conversation_id, c.external_id AS conversation_external_id,
       m.user_id, m.type, m.payload, m.sequence, m.state, m.created_at, m.partitions
FROM messages m JOIN conversations c ON c.id = m.conversation_id
"""


def outgoing_record(row: Row) -> OutgoingRecord:
    return OutgoingRecord.model_validate({**row, "payload": json.loads(row["payload"])})


def read_record(row: Row) -> OutgoingRecord | Unreadable:
    """A stored response as a record, or Unreadable if its payload cannot be read back (a
    row written by an older Relay, or by hand)."""
    try:
        return outgoing_record(row)
    except (ValueError, RecursionError) as error:
        reason = f"the stored response cannot be read: {type(error).__name__}"
        return Unreadable(row["id"], row["integration_id"], row["conversation_id"], reason)


def _mark_handled(dialect: str) -> str:
    return (
        "UPDATE messages SET handled_at = ?, state = 'queued', lease_until = NULL,"
        f" lease_owner = NULL, {stamp_set(dialect)}"
        " WHERE id = ? AND direction = 'incoming' AND handled_at IS NULL"
    )


# PostgreSQL only: turns of different conversations (a batch's rows locked in id order
# first) marked, numbered and inserted in one statement (every part runs, or none): each
# message marked handled, its conversation's counter moved past its replies, the replies
# inserted. A row per turn: whether it was handled now, and where its replies start.
# The replies are stamped no earlier than the message they answer: its ingress may have
# stamped it (marking it queued) in a transaction that took its id after this one did, and
# this statement then waited for that one's row lock; the replies would sort before it.
_RECORD_TURNS_AT_ONCE = """
WITH turn AS (
    SELECT * FROM unnest($2::text[], $3::text[], $4::int[], $5::int[])
        AS t(inbound_id, conversation_id, replies, partitions)
), handled AS (
    UPDATE messages m SET handled_at = $1, state = 'queued', lease_until = NULL,
        lease_owner = NULL, {stamp}
    FROM turn
    WHERE m.id = turn.inbound_id AND m.direction = 'incoming' AND m.handled_at IS NULL
    RETURNING m.id, m.txid, turn.conversation_id, turn.replies, turn.partitions
), counter AS (
    UPDATE conversations c SET next_sequence = c.next_sequence + h.replies,
        outbound_partitions = COALESCE(c.outbound_partitions, h.partitions)
    FROM handled h
    WHERE c.id = h.conversation_id AND h.replies > 0
    RETURNING h.id AS inbound_id, h.txid, h.replies, c.next_sequence,
        c.outbound_partitions AS partitions
), inserted AS (
    INSERT INTO messages (id, integration_id, conversation_id, user_id, direction, type, text,
        payload, fingerprint, state, sequence, reply_to, idempotency_key, created_at,
        updated_at, partitions, {stamp_columns})
    SELECT r.id, r.integration_id, r.conversation_id, r.user_id, 'outgoing', r.type, r.text,
        r.payload, '', 'pending', k.next_sequence - k.replies + r.n, r.inbound_id, NULL, $1, $1,
        k.partitions, GREATEST(pg_current_xact_id()::text::bigint, k.txid),
        nextval('message_items')
    FROM unnest($6::text[], $7::text[], $8::text[], $9::text[], $10::text[], $11::text[],
            $12::text[], $13::text[], $14::int[])
        WITH ORDINALITY AS r(id, inbound_id, integration_id, conversation_id, user_id, type,
            text, payload, n, place)
    JOIN counter k ON k.inbound_id = r.inbound_id
    ORDER BY r.place
    RETURNING reply_to
)
SELECT turn.inbound_id, h.id IS NOT NULL AS handled, k.next_sequence, k.partitions,
    (SELECT count(*) FROM inserted WHERE reply_to = turn.inbound_id) AS inserted
FROM turn
LEFT JOIN handled h ON h.id = turn.inbound_id
LEFT JOIN counter k ON k.inbound_id = turn.inbound_id
""".format(
    stamp=stamp_set("postgresql"),
    stamp_columns=stamp_values("postgresql")[0],
)


@dataclass(frozen=True)
class Turn:
    """A turn's replies about to be stored, with the ids and time they get."""

    conversation: ConversationRecord
    inbound_id: str
    replies: list[tuple[str, dict[str, Any]]]
    ids: list[str]
    now: datetime
    partitions: int  # the caller's count, for a conversation published under none yet


@dataclass(frozen=True)
class _Numbered:
    """Where a turn's or a push's responses start, and the partition count they go under."""

    first: int
    partitions: int


class OutgoingSql:
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
        self,
        conversation: ConversationRecord,
        inbound_id: str,
        replies: list[tuple[str, dict[str, Any]]],
        partitions: int = BASE_PARTITIONS,
    ) -> list[OutgoingRecord]:
        turn = TurnReplies(conversation, inbound_id, replies, partitions)
        [records] = await self.record_turns([turn])
        return records

    async def record_turns(self, turns: Sequence[TurnReplies]) -> list[list[OutgoingRecord]]:
        # The hot path of every turn: the mark goes first and tells whether this turn is the
        # first (no read), the records come from what is known already. One transaction for
        # the lot: the commit is most of a turn's cost in the store.
        now = utcnow()
        prepared = [_prepared(turn, now) for turn in turns]
        numbered: dict[int, _Numbered | None] = {}
        if self._driver.dialect == "postgresql" and _one_per_conversation(prepared):
            # One statement. A turn alone: its own transaction, without a BEGIN and a COMMIT
            # round trip (its rows alone, no order to keep).
            alone = len(prepared) == 1
            async with (self._driver.connection if alone else self._driver.transaction)() as conn:
                if not alone:
                    await _lock_in_order(conn, prepared)
                numbered = await record_turns_at_once(conn, prepared)
        else:
            async with self._driver.transaction() as conn:
                if self._driver.dialect == "postgresql":
                    await _lock_in_order(conn, prepared)
                for index, turn in enumerate(prepared):
                    numbered[index] = await self._number(conn, turn)
        return [await self._records(turn, numbered[index]) for index, turn in enumerate(prepared)]

    async def _number(self, conn: Conn, turn: Turn) -> _Numbered | None:
        """Mark the turn's message handled, number and insert its replies: where they start,
        or None if the message was handled before (or is not there)."""
        if self._driver.dialect == "postgresql":
            return (await record_turns_at_once(conn, [turn]))[0]
        if not await conn.execute(_mark_handled(self._driver.dialect), turn.now, turn.inbound_id):
            return None
        return await _insert_outgoing(
            conn,
            self._driver.dialect,
            turn.conversation,
            turn.replies,
            reply_to=turn.inbound_id,
            key=None,
            ids=turn.ids,
            now=turn.now,
            partitions=turn.partitions,
        )

    async def _records(self, turn: Turn, numbered: _Numbered | None) -> list[OutgoingRecord]:
        """The turn's records: made from what was written, or read back if nothing was (the
        message was handled before: its replies are those stored then)."""
        if numbered is not None:
            return _new_records(turn, numbered)
        async with self._driver.connection() as conn:
            if await conn.fetchone("SELECT id FROM messages WHERE id = ?", turn.inbound_id) is None:
                raise StoreError(f"no inbound message {turn.inbound_id}")
            rows = await conn.fetchall(
                OUTGOING_SELECT + " WHERE m.reply_to = ? ORDER BY m.sequence", turn.inbound_id
            )
        return [outgoing_record(row) for row in rows]

    async def record_pushed(
        self,
        conversation: ConversationRecord,
        type_: str,
        payload: dict[str, Any],
        idempotency_key: str | None,
        partitions: int = BASE_PARTITIONS,
    ) -> tuple[OutgoingRecord, bool]:
        try:
            async with self._driver.transaction() as conn:
                new_id_ = new_id()
                await _insert_outgoing(
                    conn,
                    self._driver.dialect,
                    conversation,
                    [(type_, payload)],
                    reply_to=None,
                    key=idempotency_key,
                    ids=[new_id_],
                    now=utcnow(),
                    partitions=partitions,
                )
                row = await conn.fetchone(OUTGOING_SELECT + " WHERE m.id = ?", new_id_)
        except IntegrityViolation:
            # The idempotency key was used in this conversation: answer what it created.
            async with self._driver.connection() as conn:
                row = await conn.fetchone(
                    OUTGOING_SELECT + " WHERE m.conversation_id = ? AND m.idempotency_key = ?",
                    conversation.id,
                    idempotency_key,
                )
            if row is None:
                raise
            return outgoing_record(row), False
        if row is None:
            raise StoreError("a stored message could not be read back")
        return outgoing_record(row), True

    async def claim_stale_outgoing(
        self, before: datetime, now: datetime, lease_until: datetime, limit: int
    ) -> list[OutgoingRecord | Unreadable]:
        async with self._driver.connection() as conn:
            rows = await conn.fetchall(
                OUTGOING_SELECT + " WHERE m.direction = 'outgoing' AND m.state = 'pending'"
                " AND m.created_at < ? AND (m.lease_until IS NULL OR m.lease_until < ?)"
                " ORDER BY m.conversation_id, m.sequence LIMIT ?",
                before,
                now,
                limit,
            )
        claimed: list[OutgoingRecord | Unreadable] = []
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
                claimed.append(read_record(row))
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


async def _lock_in_order(conn: Conn, turns: Sequence[Turn]) -> None:
    """Take the rows a batch of turns writes, conversations then messages, each in id order:
    the order every writer of several of them takes them in (the ingress's inserts its
    conversations', the queued marks their messages'), so two never wait on each other
    crosswise (a deadlock PostgreSQL would end by failing one)."""
    for table, ids in (
        ("conversations", sorted({turn.conversation.id for turn in turns})),
        ("messages", sorted(turn.inbound_id for turn in turns)),
    ):
        marks = ", ".join(["?"] * len(ids))
        await conn.fetchall(
            f"SELECT id FROM {table} WHERE id IN ({marks}) ORDER BY id FOR UPDATE", *ids
        )


def _one_per_conversation(turns: Sequence[Turn]) -> bool:
    """Whether no two turns share a conversation or a message (a lane runs one turn of its
    conversation at a time; a batch that breaks this is written turn by turn)."""
    return (
        len({t.conversation.id for t in turns}) == len({t.inbound_id for t in turns}) == len(turns)
    )


async def record_turns_at_once(conn: Conn, turns: Sequence[Turn]) -> dict[int, _Numbered | None]:
    """`_RECORD_TURNS_AT_ONCE` for a batch: where each turn's replies start (by its place in
    the batch), None for a message handled before."""
    replies = [(turn, n, reply) for turn in turns for n, reply in enumerate(turn.replies, 1)]
    rows = await conn.fetchall(
        _RECORD_TURNS_AT_ONCE,
        turns[0].now,
        [turn.inbound_id for turn in turns],
        [turn.conversation.id for turn in turns],
        [len(turn.replies) for turn in turns],
        [turn.partitions for turn in turns],
        [turn.ids[n - 1] for turn, n, _ in replies],
        [turn.inbound_id for turn, _, _ in replies],
        [turn.conversation.integration_id for turn, _, _ in replies],
        [turn.conversation.id for turn, _, _ in replies],
        [turn.conversation.user_id for turn, _, _ in replies],
        [type_ for _, _, (type_, _) in replies],
        [str(payload.get("text", "")) for _, _, (_, payload) in replies],
        [json.dumps(payload) for _, _, (_, payload) in replies],
        [n for _, n, _ in replies],
    )
    by_id = {row["inbound_id"]: row for row in rows}
    return {index: _numbered(turn, by_id.get(turn.inbound_id)) for index, turn in enumerate(turns)}


def _prepared(turn: TurnReplies, now: datetime) -> Turn:
    ids = [new_id() for _ in turn.replies]
    return Turn(turn.conversation, turn.inbound_id, turn.replies, ids, now, turn.partitions)


def _new_records(turn: Turn, numbered: _Numbered) -> list[OutgoingRecord]:
    conversation = turn.conversation
    return [
        OutgoingRecord(
            id=id_,
            integration_id=conversation.integration_id,
            conversation_id=conversation.id,
            conversation_external_id=conversation.external_id,
            user_id=conversation.user_id,
            type=type_,
            payload=payload,
            sequence=numbered.first + offset,
            state="pending",
            created_at=turn.now,
            partitions=numbered.partitions,
        )
        for offset, (id_, (type_, payload)) in enumerate(zip(turn.ids, turn.replies, strict=True))
    ]


def _numbered(turn: Turn, row: Row | None) -> _Numbered | None:
    """Where a turn's replies start, from its row of `_RECORD_TURNS_AT_ONCE` (None: its
    message was handled before, or is not there)."""
    replies = turn.replies
    if row is None or not row["handled"]:
        return None
    if not replies:
        return _Numbered(0, turn.partitions)
    if row["next_sequence"] is None or row["inserted"] != len(replies):
        # Cannot be: the message's own conversation (a foreign key) is not there.
        raise StoreError(f"the replies to {turn.inbound_id} could not be numbered")
    return _Numbered(int(row["next_sequence"]) - len(replies) + 1, int(row["partitions"]))


async def _insert_outgoing(
    conn: Conn,
    dialect: str,
    conversation: ConversationRecord,
    replies: list[tuple[str, dict[str, Any]]],
    reply_to: str | None,
    key: str | None,
    ids: list[str],
    now: datetime,
    partitions: int,
) -> _Numbered:
    """Insert outgoing messages (with these ids) with the next sequence numbers of their
    conversation, under the partition count it is published under (`partitions` if none);
    where they start."""
    if not replies:
        return _Numbered(0, partitions)
    counter = await conn.fetchone(
        "UPDATE conversations SET next_sequence = next_sequence + ?,"
        " outbound_partitions = COALESCE(outbound_partitions, ?) WHERE id = ?"
        " RETURNING next_sequence, outbound_partitions AS partitions",
        len(replies),
        partitions,
        conversation.id,
    )
    if counter is None:
        raise StoreError(f"no conversation {conversation.id}")
    first = int(counter["next_sequence"]) - len(replies) + 1
    count = int(counter["partitions"])
    rows = [
        (
            id_,
            conversation.integration_id,
            conversation.id,
            conversation.user_id,
            type_,
            str(payload.get("text", "")),
            json.dumps(payload),
            first + offset,
            reply_to,
            key,
            now,
            now,
            count,
        )
        for offset, (id_, (type_, payload)) in enumerate(zip(ids, replies, strict=True))
    ]
    columns, values = stamp_values(dialect)
    placeholders = f"(?, ?, ?, ?, 'outgoing', ?, ?, ?, '', 'pending', ?, ?, ?, ?, ?, ?, {values})"
    for chunk in chunks(rows, MAX_PARAMETERS // len(rows[0])):
        await conn.execute(
            "INSERT INTO messages (id, integration_id, conversation_id, user_id, direction,"
            " type, text, payload, fingerprint, state, sequence, reply_to, idempotency_key,"
            f" created_at, updated_at, partitions, {columns})"
            f" VALUES {', '.join([placeholders] * len(chunk))}",
            *[value for row in chunk for value in row],
        )
    return _Numbered(first, count)
