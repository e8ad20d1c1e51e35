"""Writing new inbound messages: numbered per conversation, many in one statement.

Each message is numbered in its conversation by the statement that writes it: the
conversation's counter (`conversations.inbound_sequence`, the last number given) grows by
the messages of it that the statement writes, which take the new numbers in the order they
came. The counter's row lock orders concurrent writers of one conversation, so numbers are
never shared and follow the order of the writes; they only grow, so a message discarded (its
publish failed) or a messageId found there already leaves a gap. The bot stage's order check
(`workers.bot.worker`) asks the store on a skipped number, so a gap costs one look-up.

The user and conversation a message names are found or made first (`found_or_made`) and
then remembered (`KnownRows`), so the message itself is one row of a batch
(`relay.store.sql.inbound`).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from functools import lru_cache
from typing import Any

from relay.lru import Lru
from relay.store.driver import Conn, Row
from relay.store.records import Accepted
from relay.store.sql.common import new_id
from relay.wire import Conversation, InboundRequest, Message, MessageBundle, Tags, User, utcnow

# Bound values per message besides its row's: its number's offset, three for the counter.
NUMBERING_PARAMETERS = 4


@dataclass(frozen=True)
class SeenRow:
    """A user or conversation as this process saw it."""

    id: str
    external_id: str
    created_at: Any
    updated_at: Any
    created: bool  # made by the attempt that saw it
    # A conversation's inbound partition count as last seen (None: not known here).
    partitions: int | None = None

    def entity(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "createdAt": self.created_at,
            "updatedAt": self.updated_at,
            "tags": Tags(id=self.external_id),
        }


class KnownRows:
    """Users and conversations this process has seen, by (table, integration, caller id).

    They are never changed once made; one may be removed (a discarded first message), and
    then the message insert that names it fails on the foreign key: the attempt ends
    `Vanished` and forgets them. Bounded: the least recently used go first.
    """

    def __init__(self, limit: int = 50_000) -> None:
        self._rows: Lru[tuple[str, str, str], SeenRow] = Lru(limit)

    def rows_of(
        self, integration_id: str, request: InboundRequest, partitions: int
    ) -> tuple[SeenRow, SeenRow] | None:
        """The request's user and conversation if both are known, the conversation under
        `partitions`."""
        user = self._rows.get(("users", integration_id, request.userId))
        conv = self._rows.get(("conversations", integration_id, request.conversationId))
        if user is None or conv is None or conv.partitions != partitions:
            return None
        return user, conv

    def remember(
        self, integration_id: str, request: InboundRequest, user: SeenRow, conv: SeenRow
    ) -> None:
        # As seen by later messages: not created by them.
        self._rows.put(("users", integration_id, request.userId), replace(user, created=False))
        key = ("conversations", integration_id, request.conversationId)
        self._rows.put(key, replace(conv, created=False))

    def forget(self, integration_id: str, request: InboundRequest) -> None:
        self._rows.pop(("users", integration_id, request.userId))
        self._rows.pop(("conversations", integration_id, request.conversationId))


class NewMessage:
    """An inbound message about to be written: its row's values, then whether it was."""

    def __init__(
        self,
        integration_id: str,
        request: InboundRequest,
        rows: tuple[SeenRow, SeenRow],
        lease_until: datetime,
        request_id: str | None,
        partitions: int,
    ) -> None:
        """`partitions`: the caller's count, for a conversation that has none yet."""
        now = utcnow()
        self.user, self.conv = rows
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
        self.inserted, self.partitions = False, partitions
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
        """What the caller gets for the message it wrote."""
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


async def found_or_made(
    conn: Conn, integration_id: str, request: InboundRequest
) -> tuple[SeenRow, SeenRow] | None:
    """The request's user and conversation, each made if missing; None if one was removed
    while this looked (a concurrent discard), and then nothing made here stays."""
    now = utcnow()
    user = await _get_or_create(conn, "users", integration_id, request.userId, now)
    if user is None:
        return None
    conv = await _get_or_create(conn, "conversations", integration_id, request.conversationId, now)
    if conv is not None:
        return user, conv
    if user.created:
        await conn.execute("DELETE FROM users WHERE id = ?", user.id)
    return None


async def _get_or_create(
    conn: Conn, table: str, integration_id: str, external_id: str, now: datetime
) -> SeenRow | None:
    """The user/conversation with that caller id, created if missing; None if the row that
    kept it from being created was removed before it could be read."""
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
            return SeenRow(new, external_id, now, now, created=True)
        row = await conn.fetchone(select, integration_id, external_id)
        if row is None:
            return None
    return SeenRow(row["id"], external_id, row["created_at"], row["updated_at"], created=False)


async def write_numbered(conn: Conn, dialect: str, news: Sequence[NewMessage]) -> list[Row]:
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


def _offsets(news: Sequence[NewMessage]) -> list[int]:
    """Each message's number as an offset from its conversation's last number once grown:
    the last of the conversation's messages here gets that number (0), each before it one
    less."""
    left = Counter(new.conv.id for new in news)
    offsets = []
    for new in news:
        left[new.conv.id] -= 1
        offsets.append(-left[new.conv.id])
    return offsets
