"""Inbound messages: accepted once per messageId in `pending` state with a lease, marked
queued once the broker confirmed them, discarded or claimed again when not.

Each message is numbered in its conversation by the statement that writes it: the
conversation's counter (`conversations.inbound_sequence`, the last number given) grows by
the messages of it that the statement writes, which take the new numbers in the order they
came. The counter's row lock orders concurrent writers of one conversation, so numbers are
never shared and follow the order of the writes; they only grow, so a message discarded (its
publish failed) or a messageId found there already leaves a gap. The bot stage's order check
(`workers.bot.worker`) asks the store on a skipped number, so a gap costs one look-up.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from functools import lru_cache
from typing import Any

from relay.broker.topology import BASE_PARTITIONS
from relay.lru import Lru
from relay.store.batching import GroupCommit
from relay.store.driver import Conn, Driver, IntegrityViolation, Row, StoreUnavailable
from relay.store.records import Accepted, PendingMessage, Unreadable
from relay.store.sql.common import MAX_PARAMETERS, as_datetime, chunks, delete_unused, new_id
from relay.store.sql.generations import settle_in
from relay.store.sql.stamps import stamp_set
from relay.wire import Conversation, InboundRequest, Message, MessageBundle, Tags, User, utcnow

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


_ATTEMPTS = 5


class _Exists(Exception):
    """The messageId was recorded already (perhaps by a concurrent transaction)."""


class _Vanished(Exception):
    """A row seen a moment ago was removed by a concurrent discard."""


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
    _new_messages: GroupCommit[_NewMessage]

    async def accept_incoming(
        self,
        integration_id: str,
        request: InboundRequest,
        lease_until: datetime,
        request_id: str | None,
        partitions: int = BASE_PARTITIONS,
    ) -> Accepted:
        # No look-up first: the unique key finds a repeated messageId, and new messages
        # (the common case) save a round trip. A user and conversation seen before are
        # taken from memory: the message is then one row of a batch written by one
        # statement with the messages of concurrent requests (one commit for all). So is
        # the partition count the conversation is published under, while it is the
        # caller's; otherwise the conversation is moved to it first, if it can be.
        user_key = ("users", integration_id, request.userId)
        conv_key = ("conversations", integration_id, request.conversationId)
        for _ in range(_ATTEMPTS):
            user, conv = self._known.get(user_key), self._known.get(conv_key)
            try:
                if user is not None and conv is not None and conv.partitions == partitions:
                    new = _NewMessage(
                        integration_id, request, (user, conv), lease_until, request_id, partitions
                    )
                    await self._new_messages.add(new)
                    accepted = new.accepted()
                else:
                    async with self._driver.transaction() as conn:
                        user, conv = await _users_and_conversation(conn, integration_id, request)
                        conv = replace(
                            conv,
                            partitions=await settle_in(
                                conn, self._driver.dialect, conv.id, "inbound", partitions
                            ),
                        )
                        new = _NewMessage(
                            integration_id,
                            request,
                            (user, conv),
                            lease_until,
                            request_id,
                            partitions,
                        )
                        new.written(await _write_numbered(conn, self._driver.dialect, [new]))
                        # Raises _Exists inside: what this transaction created is rolled back.
                        accepted = new.accepted()
                    self._known.put(user_key, user)
                self._known.put(conv_key, replace(conv, partitions=accepted.partitions))
                return accepted
            except _Exists:
                found = await self.find_incoming(integration_id, request.messageId)
                if found is not None:
                    return found
                # The first writer's publish failed and it discarded the row: try again.
            except (_Vanished, IntegrityViolation):
                # A user or conversation was removed by a concurrent discard (perhaps one
                # remembered here): look them up again.
                self._known.forget(user_key)
                self._known.forget(conv_key)
        raise StoreUnavailable("could not record the message under contention; retry")

    async def _write_new_messages(self, batch: Sequence[_NewMessage]) -> None:
        """Write a batch of new inbound messages in one statement (on SQLite, two in one
        transaction); each learns whether it was inserted (or its messageId was there
        already), and its number. A batch refused as a whole (a user or conversation gone) is
        written again one by one by the group commit."""
        dialect = self._driver.dialect
        # PostgreSQL numbers and writes in one statement: autocommit, one round trip.
        writing = self._driver.connection if dialect == "postgresql" else self._driver.transaction
        per_row = len(batch[0].values) + _NUMBERING_PARAMETERS
        for chunk in chunks(batch, MAX_PARAMETERS // per_row):
            async with writing() as conn:
                rows = await _write_numbered(conn, dialect, chunk)
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
        for chunk in chunks(message_ids, MAX_PARAMETERS):
            async with self._driver.connection() as conn:
                await conn.execute(
                    "UPDATE messages SET state = 'queued', lease_until = NULL, lease_owner = NULL,"
                    f" {stamp_set(self._driver.dialect)}"
                    f" WHERE id IN ({', '.join(['?'] * len(chunk))})",
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
        # Best effort, one statement each: a message that came to use them since (even one
        # not yet committed) makes the foreign key refuse, and then they stay.
        if accepted.created_conversation:
            await delete_unused(self._driver, "conversations", [bundle.conversation.id])
        if accepted.created_user:
            await delete_unused(self._driver, "users", [bundle.user.id])
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


async def _users_and_conversation(
    conn: Conn, integration_id: str, request: InboundRequest
) -> tuple[_Row, _Row]:
    now = utcnow()
    user = await _get_or_create(conn, "users", integration_id, request.userId, now)
    conv = await _get_or_create(conn, "conversations", integration_id, request.conversationId, now)
    return user, conv


class KnownRows:
    """Users and conversations this process has seen, by (table, integration, caller id).

    They are never changed once made; one may be removed (a discarded first message), and
    then the message insert that names it fails on the foreign key and is tried again
    without it. Bounded: the least recently used go first.
    """

    def __init__(self, limit: int = 50_000) -> None:
        self._rows: Lru[tuple[str, str, str], _Row] = Lru(limit)

    def get(self, key: tuple[str, str, str]) -> _Row | None:
        return self._rows.get(key)

    def put(self, key: tuple[str, str, str], row: _Row) -> None:
        # As seen by later messages: not created by them.
        self._rows.put(key, replace(row, created=False))

    def forget(self, key: tuple[str, str, str]) -> None:
        self._rows.pop(key)


async def _write_numbered(conn: Conn, dialect: str, news: Sequence[_NewMessage]) -> list[Row]:
    """Write new inbound messages, numbered: their conversations' counters grow by how many
    of them each has, and they take the new numbers in order. PostgreSQL does both in one
    statement (the counter's row lock orders concurrent writers of a conversation, and a
    move of its partition count waits for the write, as the write for a move); SQLite, whose
    writers take turns, in two within the caller's transaction. The rows written: id,
    partitions and number of each (a messageId there already is skipped)."""
    count, shares = len(news), Counter(new.conv.id for new in news)
    reserve = [value for new in news for value in (new.conv.id, shares[new.conv.id])]
    reserve += [new.conv.id for new in news]
    insert = [
        value
        for new, offset in zip(news, _offsets(news), strict=True)
        for value in (*new.values, offset)
    ]
    if dialect == "postgresql":
        return await conn.fetchall(_reserve_and_insert(count), *reserve, *insert)
    await conn.fetchall(_reserve(count), *reserve)
    return await conn.fetchall(_insert_messages(count, "conversations"), *insert)


# Bound values per message besides its row's: its number's offset, three for the counter.
_NUMBERING_PARAMETERS = 4


@lru_cache(maxsize=256)
def _reserve(count: int) -> str:
    """Grow the counter of each conversation of `count` new messages by how many of them
    are its (the values: each message's conversation and that share, then each message's
    conversation again); answering its last number now, and the partition count it is
    published under."""
    shares = " ".join(["WHEN ? THEN CAST(? AS INTEGER)"] * count)
    return (
        f"UPDATE conversations SET inbound_sequence = inbound_sequence + CASE id {shares} END"
        f" WHERE id IN ({', '.join(['?'] * count)})"
        " RETURNING id, inbound_sequence, inbound_partitions"
    )


@lru_cache(maxsize=256)
def _insert_messages(count: int, counters: str) -> str:
    """An insert of `count` new inbound messages, answering the ids it wrote (a messageId
    there already is skipped), the partition count each is published under (its
    conversation's, or the caller's if the conversation has none) and its number: its
    conversation's last number after `_reserve`, read from `counters`, plus its offset."""
    partitions = f"COALESCE((SELECT inbound_partitions FROM {counters} WHERE id = ?), ?)"
    number = f"(SELECT inbound_sequence FROM {counters} WHERE id = ?) + ?"
    values = "?, ?, ?, ?, ?, 'incoming', ?, ?, ?, ?, 'pending', ?, ?, ?, ?, ?"
    row = f"({values}, {partitions}, {number})"
    return (
        "INSERT INTO messages (id, integration_id, external_id, conversation_id, user_id,"
        " direction, type, text, payload, fingerprint, state, lease_until, lease_owner,"
        " request_id, created_at, updated_at, partitions, inbound_sequence)"
        f" VALUES {', '.join([row] * count)}"
        " ON CONFLICT (integration_id, external_id) DO NOTHING"
        " RETURNING id, partitions, inbound_sequence"
    )


@lru_cache(maxsize=256)
def _reserve_and_insert(count: int) -> str:
    """`_reserve` and `_insert_messages` in one statement (PostgreSQL's data-modifying WITH:
    the insert reads the counters as the update left them)."""
    return f"WITH numbered AS ({_reserve(count)}) {_insert_messages(count, 'numbered')}"


def _offsets(news: Sequence[_NewMessage]) -> list[int]:
    """Each message's number as an offset from its conversation's last number once grown:
    the last of the conversation's messages here gets that number (0), each before it one
    less."""
    left = Counter(new.conv.id for new in news)
    offsets = []
    for new in news:
        left[new.conv.id] -= 1
        offsets.append(-left[new.conv.id])
    return offsets


class _NewMessage:
    """An inbound message about to be written: its row's values, then whether it was."""

    def __init__(
        self,
        integration_id: str,
        request: InboundRequest,
        rows: tuple[_Row, _Row],
        lease_until: datetime,
        request_id: str | None,
        partitions: int,
    ) -> None:
        now = utcnow()
        self.user, self.conv = rows
        self.partitions = partitions
        self.request, self.lease_until = request, lease_until
        self.message = Message(
            id=new_id(),
            createdAt=now,
            updatedAt=now,
            tags=Tags(id=request.messageId),
            type=request.type,
            payload=request.normalized_payload(),
            direction="incoming",
            conversationId=self.conv.id,
            userId=self.user.id,
        )
        self.fingerprint, self.owner = request.fingerprint(), new_id()
        self.values = (
            self.message.id,
            integration_id,
            request.messageId,
            self.conv.id,
            self.user.id,
            request.type,
            request.text,
            json.dumps(self.message.payload),
            self.fingerprint,
            lease_until,
            self.owner,
            request_id,
            now,
            now,
            self.conv.id,
            partitions,
            self.conv.id,
        )
        self.inserted = False
        self.sequence: int | None = None

    def written(self, rows: Sequence[Row]) -> None:
        """Learn from an insert's answer whether this message was written, under which
        partition count, and its number."""
        for row in rows:
            if row["id"] == self.message.id:
                self.inserted, self.partitions = True, int(row["partitions"])
                self.sequence = row["inbound_sequence"]
                return

    def accepted(self) -> Accepted:
        """What the caller gets for a message it wrote (_Exists if it was there before)."""
        if not self.inserted:
            raise _Exists
        return Accepted(
            bundle=MessageBundle(
                user=User(**self.user.entity()),
                conversation=Conversation(**self.conv.entity()),
                message=self.message,
            ),
            text=self.request.text,
            fingerprint=self.fingerprint,
            state="pending",
            created=True,
            lease_until=self.lease_until,
            lease_owner=self.owner,
            created_user=self.user.created,
            created_conversation=self.conv.created,
            partitions=self.partitions,
            sequence=self.sequence,
        )


@dataclass(frozen=True)
class _Row:
    id: str
    external_id: str
    created_at: Any
    updated_at: Any
    created: bool
    # A conversation's inbound partition count as last seen (None: not known here).
    partitions: int | None = None

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
