"""Delivery attempts, logged in batches; an endpoint disabled by a `410 Gone`."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from relay.store.driver import Driver
from relay.store.records import AttemptRecord
from relay.store.sql.common import MAX_PARAMETERS, chunks, new_id

# The columns of delivery_attempts besides its id: the record's fields, by name.
_ATTEMPT_FIELDS = tuple(AttemptRecord.model_fields)


class AttemptsSql:
    """`Attempts` over a `Driver`."""

    _driver: Driver

    async def record_attempts(self, attempts: Sequence[AttemptRecord]) -> None:
        for chunk in chunks(attempts, MAX_PARAMETERS // (len(_ATTEMPT_FIELDS) + 1)):
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

    async def list_attempts(self, delivery_id: str) -> list[AttemptRecord]:
        async with self._driver.connection() as conn:
            rows = await conn.fetchall(
                "SELECT * FROM delivery_attempts WHERE delivery_id = ? ORDER BY created_at",
                delivery_id,
            )
        return [AttemptRecord.model_validate(row) for row in rows]

    async def set_disabled(self, integration_id: str, disabled_at: datetime | None) -> bool:
        async with self._driver.connection() as conn:
            changed = await conn.execute(
                "UPDATE integrations SET disabled_at = ? WHERE id = ?", disabled_at, integration_id
            )
        return changed == 1

    async def disable(self, integration_id: str, disabled_at: datetime) -> bool:
        async with self._driver.connection() as conn:
            changed = await conn.execute(
                "UPDATE integrations SET disabled_at = ? WHERE id = ? AND disabled_at IS NULL",
                disabled_at,
                integration_id,
            )
        return changed == 1
