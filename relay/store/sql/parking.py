"""The parking queries: a conversation's messages no turn or attempt has finished with,
and the marks that answer them (a retry planned, a message dead-lettered, a response
expired); how many responses of each integration wait."""

from __future__ import annotations

from datetime import datetime

from relay.store.driver import Driver
from relay.store.records import Unfinished
from relay.store.sql.common import MAX_PARAMETERS, chunks

# A response no attempt has finished with (none final: delivered, or given up with no retry
# planned) and not dead-lettered or expired (both set `dead_at`).
_RESPONSE_WAITS = (
    "m.direction = 'outgoing' AND m.dead_at IS NULL AND NOT EXISTS (SELECT 1 FROM"
    " delivery_attempts a WHERE a.message_id = m.id AND a.next_attempt_at IS NULL)"
)


class ParkingSql:
    """`ParkingQueries` over a `Driver`."""

    _driver: Driver

    async def unhandled(self, conversation_id: str, since: datetime) -> list[Unfinished]:
        async with self._driver.connection() as conn:
            rows = await conn.fetchall(
                "SELECT m.id AS message_id, m.retry_at FROM messages m"
                " WHERE m.conversation_id = ? AND m.direction = 'incoming'"
                " AND m.state = 'queued' AND m.handled_at IS NULL AND m.dead_at IS NULL"
                " AND m.created_at >= ?"
                # In the order of their numbers (`relay.store.sql.new_messages`): the order the bot
                # stage checks. Messages written before they were numbered come first.
                " ORDER BY COALESCE(m.inbound_sequence, 0), m.created_at, m.id",
                conversation_id,
                since,
            )
        return [Unfinished.model_validate(row) for row in rows]

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

    async def mark_expired(self, message_id: str, expired_at: datetime) -> None:
        # `dead_at` as for a dead-lettered response: every query of what is unfinished
        # already leaves those out; the state tells the history which end it was.
        async with self._driver.connection() as conn:
            await conn.execute(
                "UPDATE messages SET state = 'expired', retry_at = NULL, dead_at = ?"
                " WHERE id = ? AND direction = 'outgoing'",
                expired_at,
                message_id,
            )

    async def waiting_responses(
        self, integration_ids: list[str], since: datetime
    ) -> dict[str, int]:
        counts = dict.fromkeys(integration_ids, 0)
        for chunk in chunks(integration_ids, MAX_PARAMETERS - 1):
            async with self._driver.connection() as conn:
                rows = await conn.fetchall(
                    "SELECT m.integration_id, count(*) AS n FROM messages m"
                    f" WHERE m.integration_id IN ({', '.join(['?'] * len(chunk))})"
                    f" AND m.created_at >= ? AND {_RESPONSE_WAITS} GROUP BY m.integration_id",
                    *chunk,
                    since,
                )
            counts.update({row["integration_id"]: int(row["n"]) for row in rows})
        return counts
