"""Partition counts on a running system: which count each conversation is published under,
moved to a publisher's count only once the conversation has nothing unfinished in its
stage, and the counts in use (see `relay.pipeline.generations`).

A conversation's count per stage is the column `inbound_partitions` or
`outbound_partitions` of its row. The hot path reads it in the statement that writes the
message, from the row it updates (its per-conversation counter): on PostgreSQL under that
row's lock, so a move waits for the write and the write for a move. `settle` moves it,
holding the row exclusively while it looks for unfinished messages, so that no message is
written under the old count once the move is decided, and none written before it is missed.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Literal

from relay.store.driver import Conn, Driver
from relay.store.sql.common import as_datetime
from relay.wire import utcnow

Stage = Literal["inbound", "outbound"]

# How far back a message may still be unfinished: older ones were dead-lettered, or given
# up by their worker long ago (the retry schedules and the delivery age limit are shorter).
UNFINISHED_LOOKBACK = timedelta(days=2)

# What "not finished with" means for a message row `m` of each stage. An inbound message is
# finished once handled or dead-lettered; a response by a final attempt (delivered, or given
# up: next_attempt_at NULL) or by being dead-lettered.
_UNFINISHED_WHERE: dict[Stage, str] = {
    "inbound": "m.direction = 'incoming' AND m.handled_at IS NULL AND m.dead_at IS NULL",
    "outbound": (
        "m.direction = 'outgoing' AND m.dead_at IS NULL AND NOT EXISTS (SELECT 1 FROM"
        " delivery_attempts a WHERE a.message_id = m.id AND a.next_attempt_at IS NULL)"
    ),
}
# The count of a conversation's latest unfinished message: its next message goes behind it.
_UNFINISHED = {
    stage: "SELECT m.partitions AS n FROM messages m WHERE m.conversation_id = ?"
    f" AND m.created_at >= ? AND {where} ORDER BY m.created_at DESC LIMIT 1"
    for stage, where in _UNFINISHED_WHERE.items()
}
# An inbound turn is over only once its replies are on the broker too (marked queued): until
# then the next turn, in another count's queue and so on another worker, could publish its
# replies first.
_UNPUBLISHED_REPLIES = (
    "SELECT 1 AS found FROM messages WHERE conversation_id = ? AND created_at >= ?"
    " AND direction = 'outgoing' AND state = 'pending' LIMIT 1"
)
_COLUMN = {"inbound": "inbound_partitions", "outbound": "outbound_partitions"}


async def settle_in(
    conn: Conn, dialect: str, conversation_id: str, stage: Stage, count: int
) -> int:
    """Within a transaction: move the conversation to `count` in `stage` unless it has an
    unfinished message there; the count it is published under now."""
    column = _COLUMN[stage]
    lock = " FOR UPDATE" if dialect == "postgresql" else ""
    row = await conn.fetchone(
        f"SELECT {column} AS n FROM conversations WHERE id = ?{lock}", conversation_id
    )
    if row is None or row["n"] == count:
        return count
    # A fresh look (a statement of its own): it sees every message written before the lock.
    since = utcnow() - UNFINISHED_LOOKBACK
    unfinished = await conn.fetchone(_UNFINISHED[stage], conversation_id, since)
    busy = unfinished is not None or (
        stage == "inbound"
        and await conn.fetchone(_UNPUBLISHED_REPLIES, conversation_id, since) is not None
    )
    if busy and row["n"] is not None:
        return int(row["n"])
    # Drained: the caller's count. Or not drained but never noted on the conversation: the
    # count its latest unfinished message went under (the caller's for one written by a
    # Relay that did not note counts).
    settled = count if unfinished is None or unfinished["n"] is None else int(unfinished["n"])
    await conn.execute(
        f"UPDATE conversations SET {column} = ? WHERE id = ?", settled, conversation_id
    )
    return settled


class GenerationsSql:
    """The counts in use, and moving conversations between them."""

    _driver: Driver

    async def settle_partitions(self, conversation_id: str, stage: Stage, count: int) -> int:
        """Move the conversation to `count` in `stage` once nothing of it is unfinished
        there; the count its next message goes under."""
        async with self._driver.transaction() as conn:
            return await settle_in(conn, self._driver.dialect, conversation_id, stage, count)

    async def register_partitions(self, count: int, now: datetime) -> None:
        """Note that a service runs with `count` partitions (as of `now`)."""
        async with self._driver.connection() as conn:
            await conn.execute(
                "INSERT INTO partition_counts (partitions, seen_at) VALUES (?, ?)"
                " ON CONFLICT (partitions) DO UPDATE SET seen_at = excluded.seen_at",
                count,
                now,
            )

    async def partition_counts(self) -> dict[int, datetime]:
        """Every count registered, with when a service last said it runs with it."""
        async with self._driver.connection() as conn:
            rows = await conn.fetchall("SELECT partitions, seen_at FROM partition_counts")
        return {int(row["partitions"]): as_datetime(row["seen_at"]) for row in rows}

    async def unfinished_under(self, count: int) -> dict[Stage, int]:
        """Messages published under `count` that are not finished with, per stage."""
        since = utcnow() - UNFINISHED_LOOKBACK
        found: dict[Stage, int] = {}
        async with self._driver.connection() as conn:
            for stage, where in _UNFINISHED_WHERE.items():
                row = await conn.fetchone(
                    "SELECT count(*) AS n FROM messages m WHERE m.partitions = ?"
                    f" AND m.created_at >= ? AND {where}",
                    count,
                    since,
                )
                found[stage] = int((row or {}).get("n") or 0)
        return found

    async def forget_partitions(self, count: int) -> bool:
        """Remove a count from the registry (its queues are gone); False if it was not there."""
        async with self._driver.connection() as conn:
            return bool(
                await conn.execute("DELETE FROM partition_counts WHERE partitions = ?", count)
            )
