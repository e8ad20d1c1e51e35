"""A conversation's history as the conversation API reads it: incoming messages once queued
and responses once stored, in the order they became visible, after a watermark.

A reader that resumes after the last item it saw must find every item it has not seen:
numbering rows as they are written is not enough on PostgreSQL, where a transaction that
took a number first can commit after one that took a later number. So each row is stamped
once, when it becomes visible, with `(txid, item)`:

- PostgreSQL: the id of the writing transaction and a number from a sequence. Every
  transaction with an id below the oldest one still running (`pg_snapshot_xmin`) has
  finished, so what sits below that horizon is final; a read stops there, and whatever
  commits later sorts after it. Only a transaction left open for long holds the horizon
  (and so new items) back.
- SQLite: writers take turns, so a counter of writing statements (one more than the
  largest stamp) and the rowid give the order of commits, with no horizon.

The stamp is set by the statements that make a row visible (`relay.store.sql.stamps`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, Literal

import structlog

from relay.store.driver import Driver, Row
from relay.store.records import (
    HistoryPage,
    HistoryRow,
    OutgoingRecord,
    TurnRecord,
    Unreadable,
    Watermark,
)
from relay.store.sql.common import ATTEMPT_DELIVERED, ATTEMPT_FAILED, as_datetime
from relay.store.sql.outgoing import OUTGOING_SELECT, read_record
from relay.wire.contract import MAX_DEPTH, json_problems

log = structlog.get_logger(__name__)

Scope = Literal["conversation", "integration"]
_NO_BOUND = 2**62  # bytes: no page comes near it

_ITEM = {"postgresql": "m.item", "sqlite": "m.rowid"}
_HORIZON = {
    "postgresql": "pg_snapshot_xmin(pg_current_snapshot())::text::bigint",
    "sqlite": "NULL",
}
_SCOPE_COLUMN: dict[Scope, str] = {
    "conversation": "m.conversation_id",
    "integration": "m.integration_id",
}


_SIZE = {"postgresql": "octet_length(m.payload)", "sqlite": "length(CAST(m.payload AS BLOB))"}


def _history_select(dialect: str, scope: Scope) -> str:
    """A page of items after a watermark; each row says how many payload bytes come before
    it in the page (`before`) and how many rows the page has (`total`), so a page can stop
    at a byte bound inside the database: rows past it are never sent."""
    item = _ITEM[dialect]
    page = f"""
SELECT m.id, m.external_id, m.direction, m.type, m.payload, m.created_at, m.sequence,
       m.conversation_id, c.external_id AS conversation_external_id, m.dead_at, m.state,
       m.txid, {item} AS item, {_HORIZON[dialect]} AS horizon, {_SIZE[dialect]} AS size,
       (SELECT count(*) FROM delivery_attempts a WHERE a.message_id = m.id) AS attempts,
       (SELECT count(*) FROM delivery_attempts a WHERE a.message_id = m.id
            AND {ATTEMPT_DELIVERED}) AS delivered,
       (SELECT count(*) FROM delivery_attempts a WHERE a.message_id = m.id
            AND a.next_attempt_at IS NULL AND {ATTEMPT_FAILED}) AS given_up
FROM messages m JOIN conversations c ON c.id = m.conversation_id
WHERE {_SCOPE_COLUMN[scope]} = ? AND (m.txid, {item}) > (?, ?)
ORDER BY m.txid, {item} LIMIT ?
"""
    return f"""
SELECT * FROM (
    SELECT page.*, COUNT(*) OVER () AS total,
           SUM(page.size) OVER (ORDER BY page.txid, page.item ROWS UNBOUNDED PRECEDING)
               - page.size AS before
    FROM ({page}) AS page
) AS sized WHERE sized.before < ? ORDER BY sized.txid, sized.item
"""


def _history_row(row: Row) -> HistoryRow:
    return HistoryRow(
        id=row["id"],
        watermark=Watermark(int(row["txid"]), int(row["item"])),
        direction=row["direction"],
        type=row["type"],
        # An empty object stands for a payload no answer could carry.
        payload=shown_payload(row["payload"], row["id"]) or {},
        created_at=as_datetime(row["created_at"]),
        conversation_id=row["conversation_id"],
        conversation_external_id=row["conversation_external_id"],
        external_id=row["external_id"],
        sequence=row["sequence"],
        attempts=int(row["attempts"]),
        delivered=bool(row["delivered"]),
        # Dead-lettered: marked so, or an attempt that failed with no retry planned.
        dead=row["dead_at"] is not None or bool(row["given_up"]),
        expired=row["state"] == "expired",
    )


def shown_payload(text: str, message_id: str) -> Any:
    """A stored payload as a reader is shown it; None for one that breaks the input contract
    (a row written by an older Relay, or by hand), which no answer could carry."""
    try:
        payload = json.loads(text)
    except (ValueError, RecursionError):
        payload = None
    return payload if _carriable(payload, message_id) else None


def _carriable(payload: Any, message_id: str) -> bool:
    """Whether a stored payload (None: not even JSON) keeps the input contract."""
    if payload is not None and not json_problems(payload, depth=MAX_DEPTH - 1):
        return True
    log.warning("stored_payload_unreadable", message_id=message_id)
    return False


def _shown_response(row: Row) -> OutgoingRecord | None:
    """A turn's response as a reader is shown it; None for one no answer could carry."""
    record = read_record(row)
    if isinstance(record, Unreadable):
        log.warning("stored_payload_unreadable", message_id=record.id)
        return None
    return record if _carriable(record.payload, record.id) else None


def _final(rows: Sequence[Row]) -> list[Row]:
    """The rows below the horizon (all of them on SQLite): those sort after them may still
    be joined by a transaction that commits later."""
    final = []
    for row in rows:
        if row["horizon"] is not None and int(row["txid"]) >= int(row["horizon"]):
            break
        final.append(row)
    return final


class HistorySql:
    """`History` over a `Driver`."""

    _driver: Driver

    async def find_conversation(self, integration_id: str, external_id: str) -> str | None:
        async with self._driver.connection() as conn:
            row = await conn.fetchone(
                "SELECT id FROM conversations WHERE integration_id = ? AND external_id = ?",
                integration_id,
                external_id,
            )
        return str(row["id"]) if row else None

    async def history(
        self,
        scope: Scope,
        scope_id: str,
        after: Watermark | None,
        limit: int,
        max_bytes: int | None = None,
    ) -> HistoryPage:
        start = after or Watermark.ORIGIN
        async with self._driver.connection() as conn:
            rows = await conn.fetchall(
                _history_select(self._driver.dialect, scope),
                scope_id,
                start.txid,
                start.item,
                limit,
                # The first row always comes (nothing is before it).
                max(max_bytes, 1) if max_bytes is not None else _NO_BOUND,
            )
        final = _final(rows)
        items = [_history_row(row) for row in final]
        total = int(rows[0]["total"]) if rows else 0
        return HistoryPage(
            items=items,
            watermark=items[-1].watermark if items else start,
            held_back=len(final) < len(rows),
            more=len(final) == len(rows) and (total == limit or len(rows) < total),
        )

    async def latest_watermark(self, integration_id: str) -> Watermark:
        item, horizon = _ITEM[self._driver.dialect], _HORIZON[self._driver.dialect]
        async with self._driver.connection() as conn:
            row = await conn.fetchone(
                f"SELECT m.txid, {item} AS item FROM messages m WHERE m.integration_id = ?"
                f" AND m.txid IS NOT NULL AND (m.txid < {horizon} OR {horizon} IS NULL)"
                f" ORDER BY m.txid DESC, {item} DESC LIMIT 1",
                integration_id,
            )
        return Watermark(int(row["txid"]), int(row["item"])) if row else Watermark.ORIGIN

    async def turn(self, message_id: str) -> TurnRecord:
        async with self._driver.connection() as conn:
            row = await conn.fetchone(
                "SELECT handled_at, dead_at FROM messages WHERE id = ?", message_id
            )
            rows = await conn.fetchall(
                OUTGOING_SELECT + " WHERE m.reply_to = ? ORDER BY m.sequence", message_id
            )
        return TurnRecord(
            handled=row is not None and row["handled_at"] is not None,
            dead=row is not None and row["dead_at"] is not None,
            # A response whose payload no answer could carry was never sent: left out.
            responses=[shown for r in rows if (shown := _shown_response(r)) is not None],
        )
