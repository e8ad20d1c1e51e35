"""What the SQL of every role shares: ids, timestamps read back, statements kept under the
parameter limit, and users and conversations deleted once no message names them."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Literal, TypeVar

from relay.store.driver import Driver, IntegrityViolation

# What an attempt (a row of `delivery_attempts a`) came to: a 2xx delivered the response;
# anything else, or no answer at all (no status), failed.
ATTEMPT_DELIVERED = "a.status >= 200 AND a.status < 300"
ATTEMPT_FAILED = "(a.status IS NULL OR a.status < 200 OR a.status >= 300)"

# Bound values per statement: SQLite before 3.32 allows 999 (PostgreSQL 32767).
MAX_PARAMETERS = 999
T = TypeVar("T")


def new_id() -> str:
    """A relay id."""
    return str(uuid.uuid4())


def as_datetime(value: datetime | str) -> datetime:
    """A timestamp as read back: SQLite keeps them as ISO text, PostgreSQL as timestamps."""
    return datetime.fromisoformat(value) if isinstance(value, str) else value


def chunks(items: Sequence[T], size: int) -> list[Sequence[T]]:
    """`items` in slices of at most `size`."""
    return [items[start : start + size] for start in range(0, len(items), size)]


# The column of `messages` that names a row of each table.
_NAMED_BY = {"conversations": "conversation_id", "users": "user_id"}


async def delete_unused(
    driver: Driver, table: Literal["conversations", "users"], ids: Sequence[str]
) -> int:
    """Delete the rows of `table` with these ids that no message names; how many went.

    Best effort: on PostgreSQL a message committed meanwhile (one an ingress wrote with a
    user or conversation taken from memory) makes the foreign key refuse the statement;
    then each goes on its own, so that only the rows in use stay."""
    unused = f" AND NOT EXISTS (SELECT 1 FROM messages m WHERE m.{_NAMED_BY[table]} = {table}.id)"
    try:
        async with driver.connection() as conn:
            return await conn.execute(
                f"DELETE FROM {table} WHERE id IN ({', '.join(['?'] * len(ids))}){unused}", *ids
            )
    except IntegrityViolation:
        if len(ids) == 1:
            return 0
    return sum([await delete_unused(driver, table, [id_]) for id_ in ids])
