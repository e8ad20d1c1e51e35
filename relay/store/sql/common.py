"""What the SQL of every role shares: ids, timestamps read back, and statements kept under
the parameter limit."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import TypeVar

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
