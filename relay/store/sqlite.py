"""SQLite driver (aiosqlite): the one-machine default.

One connection, serialized by a lock: SQLite has a single writer anyway, and a shared
connection must not interleave one task's statements into another task's transaction.
WAL lets other processes read while this one writes; several processes (separately run
services on one machine) share the file by waiting for its write lock.

That wait is Relay's, not SQLite's: SQLite's own busy handler sleeps 1, 2, 5, 10, 15, 20,
25 ms... between tries, so under three processes' steady writes a commit that needed the
lock for half a millisecond waited 8 or 18 ms, the file idle meanwhile. A statement that
finds the file locked is tried again after 0.2 ms, the pause doubling up to every 2 ms,
for up to the same 10 s.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiosqlite

from relay.retry import pauses
from relay.store.driver import IntegrityViolation, Row, StoreUnavailable

_PRAGMAS = (
    # Retention gives freed pages back to the file system (`PRAGMA incremental_vacuum`).
    # Before WAL, whose switch writes a new file's first page and so fixes its mode; an
    # older file keeps the mode it has until a VACUUM (`relay.store.sql.retention`).
    "PRAGMA auto_vacuum=INCREMENTAL",
    "PRAGMA journal_mode=WAL",
    # FULL: a reply or an accepted message must survive power loss, not only a crash.
    "PRAGMA synchronous=FULL",
    "PRAGMA foreign_keys=ON",
    # Locked: fail at once, and `_SqliteConn` tries again sooner than SQLite would.
    "PRAGMA busy_timeout=0",
)
LOCKED_FOR = 10.0  # seconds a statement waits for the file's write lock, at most
_PAUSES = (0.0002, 0.002)  # between tries: the first, doubling up to the second


def sqlite_path(url: str) -> str:
    """The file of a `sqlite:///relative` or `sqlite:////absolute` URL."""
    path = url.removeprefix("sqlite://")
    return path[1:] if path.startswith("/") else path


def to_db(value: Any) -> Any:
    """Timestamps as fixed-width UTC text, so comparing strings compares times."""
    if isinstance(value, datetime):
        return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f+00:00")
    return value


@asynccontextmanager
async def translated() -> AsyncIterator[None]:
    """Raise the store's own errors for SQLite's."""
    try:
        yield
    except sqlite3.IntegrityError as error:
        raise IntegrityViolation(str(error)) from error
    except sqlite3.DatabaseError as error:
        # Locked past busy_timeout, disk I/O, disk full, a corrupt file.
        raise StoreUnavailable(f"{type(error).__name__}: {error}") from error


class _SqliteConn:
    """Each statement in one hop to the connection's thread: aiosqlite's cursor API takes
    two or three (execute, fetch, close), and every hop is a wake-up of both threads while
    the process's one connection (and, in a transaction, the file's write lock) is held."""

    def __init__(self, db: aiosqlite.Connection) -> None:
        self._db = db

    async def fetchone(self, sql: str, *args: Any) -> Row | None:
        rows = await self._rows(sql, args)
        return next((dict(row) for row in rows), None)

    async def fetchall(self, sql: str, *args: Any) -> list[Row]:
        return [dict(row) for row in await self._rows(sql, args)]

    async def execute(self, sql: str, *args: Any) -> int:
        # The rows the statement changed: the connection's running count before and after
        # (the driver's lock keeps every other statement of this connection out meanwhile;
        # the schema has no triggers, whose changes the count would include).
        before = self._db.total_changes
        await self._rows(sql, args)
        return self._db.total_changes - before

    async def _rows(self, sql: str, args: tuple[Any, ...]) -> Iterable[sqlite3.Row]:
        """Run the statement, trying again while another process holds the write lock. A
        statement refused so wrote nothing (a write in autocommit, or `BEGIN IMMEDIATE`:
        in a transaction begun so, this process holds the lock)."""
        params = [to_db(a) for a in args]
        deadline = time.monotonic() + LOCKED_FOR
        for pause in pauses(*_PAUSES):
            try:
                return await self._db.execute_fetchall(sql, params)
            except sqlite3.OperationalError as error:
                if not _locked(error) or time.monotonic() >= deadline:
                    raise
            await asyncio.sleep(pause)
        raise AssertionError("unreachable")  # pragma: no cover: the pauses never end


def _locked(error: sqlite3.OperationalError) -> bool:
    """Whether SQLite refused because another connection holds the lock (SQLITE_BUSY)."""
    code = getattr(error, "sqlite_errorcode", None)
    return code is not None and code & 0xFF == sqlite3.SQLITE_BUSY


class SqliteDriver:
    """The `Driver` for a SQLite file."""

    dialect: str = "sqlite"
    migration_lock: str | None = None  # BEGIN IMMEDIATE already excludes other writers

    def __init__(self, db: aiosqlite.Connection) -> None:
        self._db = db
        self._conn = _SqliteConn(db)
        self._lock = asyncio.Lock()

    @classmethod
    async def open(cls, url: str) -> SqliteDriver:
        """Open (and create) the database file of `url`."""
        path = sqlite_path(url)
        if path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        db = await aiosqlite.connect(path, isolation_level=None)
        db.row_factory = aiosqlite.Row
        for pragma in _PRAGMAS:
            await db.execute(pragma)
        return cls(db)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[_SqliteConn]:
        async with self._lock, translated():
            # IMMEDIATE takes the write lock up front: no deadlock on a read-to-write upgrade.
            await self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
                await self._conn.execute("COMMIT")
            except BaseException:
                # Also after a failed COMMIT (disk full): an open transaction would jam the
                # connection for every later BEGIN.
                with contextlib.suppress(sqlite3.Error):
                    await self._conn.execute("ROLLBACK")
                raise

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[_SqliteConn]:
        async with self._lock, translated():
            yield self._conn

    async def run_script(self, script: str) -> None:
        """Run statements outside any transaction, each to its end: `VACUUM`, and
        `PRAGMA incremental_vacuum`, which frees one page per step where `execute` steps once."""
        async with self._lock, translated():
            # A script's statements step inside SQLite: let it wait for the lock itself.
            # (Each pragma run to its end: a statement left open would refuse a VACUUM.)
            await self._db.execute_fetchall(f"PRAGMA busy_timeout={int(LOCKED_FOR * 1000)}")
            try:
                await self._db.executescript(script)
            finally:
                await self._db.execute_fetchall("PRAGMA busy_timeout=0")

    async def close(self) -> None:
        await self._db.close()
