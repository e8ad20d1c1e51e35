"""Dead letters kept in the store (`relay.pipeline.dlq`): written as the keeper takes them off
a dead-letter queue, listed by page, forgotten when replayed, purged or past their bounds."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, cast

from relay.broker.topology import StageName
from relay.store.driver import Driver, Row
from relay.store.records import DeadLetter, DeadLetterFilter, DeadPosition
from relay.store.sql.common import MAX_PARAMETERS, chunks

_COLUMNS = (
    "stage, id, deaths, integration_id, conversation_id, reason, attempts, last_status,"
    " dead_at, body"
)

# A letter that dies again (replayed, or carried twice by the queue after a lost ack) is one
# row: its latest death, counted.
_KEEP = f"""
INSERT INTO dead_letters ({_COLUMNS}) VALUES (?, ?, 1, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (stage, id) DO UPDATE SET
    deaths = dead_letters.deaths + 1, integration_id = excluded.integration_id,
    conversation_id = excluded.conversation_id, reason = excluded.reason,
    attempts = excluded.attempts, last_status = excluded.last_status,
    dead_at = excluded.dead_at, body = excluded.body
"""


def _letter(row: Row) -> DeadLetter:
    return DeadLetter(
        id=row["id"],
        stage=cast(StageName, row["stage"]),
        integration_id=row["integration_id"],
        conversation_id=row["conversation_id"],
        reason=row["reason"],
        attempts=row["attempts"],
        last_status=row["last_status"],
        dead_at=row["dead_at"],
        body=json.loads(row["body"]),
        deaths=row["deaths"],
    )


def _where(selection: DeadLetterFilter) -> tuple[list[str], list[Any]]:
    """The conditions (ANDed) and their parameters that select what `selection` names."""
    conditions: list[str] = []
    values: list[Any] = []
    for column, value in (
        ("stage", selection.stage),
        ("integration_id", selection.integration_id),
        ("conversation_id", selection.conversation_id),
    ):
        if value is not None:
            conditions.append(f"{column} = ?")
            values.append(value)
    if selection.ids is not None:
        ids = sorted(selection.ids)
        conditions.append(f"id IN ({', '.join(['?'] * len(ids))})" if ids else "1 = 0")
        values += ids
    return conditions, values


class DeadLettersSql:
    """`DeadLetterStore` over a `Driver`."""

    _driver: Driver

    async def keep_dead_letter(self, letter: DeadLetter) -> None:
        async with self._driver.connection() as conn:
            await conn.execute(
                _KEEP,
                letter.stage,
                letter.id,
                letter.integration_id,
                letter.conversation_id,
                letter.reason,
                letter.attempts,
                letter.last_status,
                letter.dead_at,
                json.dumps(letter.body),
            )

    async def dead_letters(
        self, selection: DeadLetterFilter, after: DeadPosition | None, limit: int
    ) -> list[DeadLetter]:
        conditions, values = _where(selection)
        if after is not None:
            conditions.append("(dead_at, stage, id) > (?, ?, ?)")
            values += list(after)
        where = f" WHERE {' AND '.join(conditions)}" if conditions else ""
        async with self._driver.connection() as conn:
            rows = await conn.fetchall(
                f"SELECT {_COLUMNS} FROM dead_letters{where} ORDER BY dead_at, stage, id LIMIT ?",
                *values,
                limit,
            )
        return [_letter(row) for row in rows]

    async def forget_dead_letters(self, letters: Sequence[DeadLetter]) -> int:
        """Each letter's row, unless it died again since it was read (`deaths`)."""
        forgotten = 0
        for chunk in chunks(letters, MAX_PARAMETERS // 3):
            keys = " OR ".join(["(stage = ? AND id = ? AND deaths = ?)"] * len(chunk))
            async with self._driver.connection() as conn:
                forgotten += await conn.execute(
                    f"DELETE FROM dead_letters WHERE {keys}",
                    *[value for d in chunk for value in (d.stage, d.id, d.deaths)],
                )
        return forgotten

    async def dead_letter_summary(self) -> dict[StageName, tuple[int, int | None]]:
        async with self._driver.connection() as conn:
            rows = await conn.fetchall(
                "SELECT stage, count(*) AS n, min(dead_at) AS oldest FROM dead_letters"
                " GROUP BY stage"
            )
        return {cast(StageName, row["stage"]): (row["n"], row["oldest"]) for row in rows}
