"""The small database interface both drivers implement, so the SQL logic is written once.

Statements use `?` placeholders; the PostgreSQL driver numbers them. Timestamps go in as
aware datetimes and come back as datetimes (PostgreSQL) or ISO strings (SQLite); the
pydantic records accept both.
"""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol

Row = dict[str, Any]


class StoreError(Exception):
    """A database failure, translated by the drivers so callers need not know the driver."""


class IntegrityViolation(StoreError):
    """A constraint refused a write (unique or foreign key)."""


class StoreUnavailable(StoreError):
    """The database cannot be reached or cannot write now; the operation may be retried."""


class Conn(Protocol):
    """One connection, inside or outside a transaction."""

    async def fetchone(self, sql: str, *args: Any) -> Row | None:
        """The first row, or None."""

    async def fetchall(self, sql: str, *args: Any) -> list[Row]:
        """Every row."""

    async def execute(self, sql: str, *args: Any) -> int:
        """Run a statement; the number of rows it changed."""


class Driver(Protocol):
    """A pool (or a single serialized connection) for one database."""

    dialect: str
    # A statement that serializes migrators across processes, run first in the transaction.
    migration_lock: str | None

    def transaction(self) -> AbstractAsyncContextManager[Conn]:
        """A connection in a write transaction, committed on exit, rolled back on error."""

    def connection(self) -> AbstractAsyncContextManager[Conn]:
        """A connection for reads and single statements (autocommit)."""

    async def close(self) -> None:
        """Close every connection."""
