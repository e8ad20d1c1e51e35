"""Delivery attempts found by what an operator knows: integration, conversation,
webhook-id, status class, outcome, time; newest first, a page at a time."""

from __future__ import annotations

from typing import Any

from relay.store.driver import Driver
from relay.store.records import AttemptQuery, FoundAttempt
from relay.store.sql.common import ATTEMPT_DELIVERED, ATTEMPT_FAILED

_SELECT = """
SELECT a.*, m.conversation_id, c.external_id AS conversation_external_id
FROM delivery_attempts a
LEFT JOIN messages m ON m.id = a.message_id
LEFT JOIN conversations c ON c.id = m.conversation_id
"""
_STATUS = {
    "2xx": ATTEMPT_DELIVERED,
    "3xx": "a.status >= 300 AND a.status < 400",
    "4xx": "a.status >= 400 AND a.status < 500",
    "5xx": "a.status >= 500",
    "error": "a.status IS NULL",
}
_OUTCOME = {
    "delivered": _STATUS["2xx"],
    "failed": ATTEMPT_FAILED,
}


def _where(query: AttemptQuery) -> tuple[list[str], list[Any]]:
    """The conditions of `query`, with their arguments (None: no condition)."""
    conversation = query.conversation_id
    conditions: list[tuple[object, str, list[Any]]] = [
        (query.integration_id, "a.integration_id = ?", [query.integration_id]),
        (query.delivery_id, "a.delivery_id = ?", [query.delivery_id]),
        (conversation, "(m.conversation_id = ? OR c.external_id = ?)", [conversation] * 2),
        (query.status_class, _STATUS.get(query.status_class or "", ""), []),
        (query.outcome, _OUTCOME.get(query.outcome or "", ""), []),
        (query.since, "a.created_at >= ?", [query.since]),
        (query.until, "a.created_at < ?", [query.until]),
        (query.before, "(a.created_at, a.id) < (?, ?)", list(query.before or ())),
    ]
    clauses = [sql for value, sql, _ in conditions if value is not None and sql]
    args = [arg for value, _, bound in conditions if value is not None for arg in bound]
    return clauses, args


class SearchSql:
    """`Attempts.search_attempts` over a `Driver`."""

    _driver: Driver

    async def search_attempts(self, query: AttemptQuery, limit: int) -> list[FoundAttempt]:
        clauses, args = _where(query)
        where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
        async with self._driver.connection() as conn:
            rows = await conn.fetchall(
                f"{_SELECT}{where} ORDER BY a.created_at DESC, a.id DESC LIMIT ?", *args, limit
            )
        return [FoundAttempt.model_validate(row) for row in rows]
