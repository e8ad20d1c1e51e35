"""Responses to send again: one by its id (`resend`), and an integration's given up since a
time (`recover`). Given up: dead-lettered, or its last attempt failed with no retry planned,
and no attempt delivered it; not expired (`expiringTypes`)."""

from __future__ import annotations

from datetime import datetime

from relay.store.driver import Driver
from relay.store.records import OutgoingRecord, SentResponse
from relay.store.sql.common import ATTEMPT_DELIVERED, ATTEMPT_FAILED
from relay.store.sql.outgoing import OUTGOING_SELECT, outgoing_record, read_record

_DELIVERED = f"""EXISTS (SELECT 1 FROM delivery_attempts a WHERE a.message_id = m.id
    AND {ATTEMPT_DELIVERED})"""
_GIVEN_UP_SINCE = f"""(m.dead_at >= ? OR EXISTS (SELECT 1 FROM delivery_attempts a
    WHERE a.message_id = m.id AND a.next_attempt_at IS NULL AND a.created_at >= ?
    AND {ATTEMPT_FAILED}))"""


class RecoverySql:
    """`Recovery` over a `Driver`."""

    _driver: Driver

    async def find_response(self, message_id: str) -> SentResponse | None:
        async with self._driver.connection() as conn:
            row = await conn.fetchone(
                f"{OUTGOING_SELECT} WHERE m.id = ? AND m.direction = 'outgoing'", message_id
            )
            if row is None:
                return None
            delivered = await conn.fetchone(
                "SELECT 1 AS yes FROM delivery_attempts a WHERE a.message_id = ?"
                f" AND {ATTEMPT_DELIVERED} LIMIT 1",
                message_id,
            )
        return SentResponse(record=outgoing_record(row), delivered=delivered is not None)

    async def given_up_since(self, integration_id: str, since: datetime) -> list[OutgoingRecord]:
        async with self._driver.connection() as conn:
            rows = await conn.fetchall(
                f"{OUTGOING_SELECT} WHERE m.integration_id = ? AND m.direction = 'outgoing'"
                # An expired response was dropped on purpose: too late to be worth sending.
                f" AND m.state <> 'expired' AND {_GIVEN_UP_SINCE} AND NOT {_DELIVERED}"
                " ORDER BY m.conversation_id, m.sequence",
                integration_id,
                since,
                since,
            )
        # A row no parser reads can never be sent again: left out (its outbox ended it).
        records = [read_record(row) for row in rows]
        return [record for record in records if isinstance(record, OutgoingRecord)]
