"""PostgreSQL driver (asyncpg): for several machines sharing one store.

A `schema` query parameter in the URL (`postgresql://.../db?schema=name`) puts every table
in that schema, created if missing: several deployments (or test modules) can share one
database without seeing each other.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import lru_cache
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from relay.store.driver import IntegrityViolation, Row, StoreError, StoreUnavailable

_MIGRATION_LOCK = 0x52454C4159  # "RELAY": one migrator at a time across processes


@lru_cache(maxsize=512)
def numbered(sql: str) -> str:
    """Turn `?` placeholders into asyncpg's `$1, $2, ...`."""
    counter = iter(range(1, 1000))
    return re.sub(r"\?", lambda _: f"${next(counter)}", sql)


def split_schema(url: str) -> tuple[str, str | None]:
    """Take the relay-specific `schema` parameter out of a PostgreSQL URL."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query)
    schema = next((value for key, value in query if key == "schema"), None)
    rest = urlencode([(key, value) for key, value in query if key != "schema"])
    if schema is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,62}", schema):
        raise ValueError(f"invalid schema name {schema!r}")
    return urlunsplit(parts._replace(query=rest)), schema


# No call waits on the database for ever: a server that stopped answering (a restart, a
# network partition) is the store being away, and the caller retries or answers 503.
STATEMENT_TIMEOUT = 30.0
ACQUIRE_TIMEOUT = 10.0
CLOSE_TIMEOUT = 5.0  # a graceful close of the pool; then its connections are cut

# A value or a statement the database refuses: sending it again cannot help.
_REFUSED: tuple[type[BaseException], ...] = (asyncpg.DataError, asyncpg.SyntaxOrAccessError)
# Everything else asyncpg (or the socket under it) raises is the database being away or
# busy, wherever it surfaces: a query, a commit, or the pool releasing a broken connection
# (`InternalClientError: cannot switch to state …` during a server restart).
_AWAY: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
)


@asynccontextmanager
async def translated() -> AsyncIterator[None]:
    """Raise the store's own errors for asyncpg's."""
    try:
        yield
    except asyncpg.IntegrityConstraintViolationError as error:
        raise IntegrityViolation(str(error)) from error
    except _REFUSED as error:  # e.g. a value the column refuses
        raise StoreError(f"{type(error).__name__}: {error}") from error
    except _AWAY as error:
        raise StoreUnavailable(f"{type(error).__name__}: {error}") from error


async def drop_schema(server_url: str, schema: str) -> None:
    """Drop a schema and everything in it (test modules and benchmark runs clean up so)."""
    conn = await asyncpg.connect(split_schema(server_url)[0])
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


def _rowcount(status: str) -> int:
    last = status.rsplit(" ", 1)[-1]
    return int(last) if last.isdigit() else 0


class _PgConn:
    def __init__(self, conn: asyncpg.Connection[Any] | PoolConnectionProxy[Any]) -> None:
        self._conn = conn

    async def fetchone(self, sql: str, *args: Any) -> Row | None:
        row = await self._conn.fetchrow(numbered(sql), *args)
        return dict(row) if row is not None else None

    async def fetchall(self, sql: str, *args: Any) -> list[Row]:
        return [dict(row) for row in await self._conn.fetch(numbered(sql), *args)]

    async def execute(self, sql: str, *args: Any) -> int:
        return _rowcount(await self._conn.execute(numbered(sql), *args))


async def _keep_session(_: asyncpg.Connection[Any]) -> None:
    """Nothing to reset when a connection goes back to the pool: the store sets no session
    state (no SET, LISTEN, cursors or session locks; the migration lock is a transaction's).
    asyncpg's default reset is a round trip on every release, a fifth of a hot path's."""


class PostgresDriver:
    """The `Driver` for PostgreSQL, over an asyncpg pool."""

    dialect: str = "postgresql"
    migration_lock: str | None = f"SELECT pg_advisory_xact_lock({_MIGRATION_LOCK})"

    def __init__(self, pool: asyncpg.Pool[Any]) -> None:
        self._pool = pool

    @classmethod
    async def open(cls, url: str, max_size: int = 10) -> PostgresDriver:
        """Connect a pool; create the URL's schema if it names one."""
        dsn, schema = split_schema(url.replace("postgres://", "postgresql://", 1))
        settings = {"search_path": schema} if schema else {}
        if schema:
            conn = await asyncpg.connect(dsn)
            try:
                await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
            finally:
                await conn.close()
        pool = await asyncpg.create_pool(
            dsn,
            min_size=1,
            max_size=max_size,
            server_settings=settings,
            command_timeout=STATEMENT_TIMEOUT,
            reset=_keep_session,
        )
        return cls(pool)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[_PgConn]:
        async with (
            translated(),
            self._pool.acquire(timeout=ACQUIRE_TIMEOUT) as conn,
            conn.transaction(),
        ):
            yield _PgConn(conn)

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[_PgConn]:
        async with translated(), self._pool.acquire(timeout=ACQUIRE_TIMEOUT) as conn:
            yield _PgConn(conn)

    async def close(self) -> None:
        # Bounded: after a server restart a graceful close can wait on connections that
        # never answer, and a service must stop on SIGTERM whatever the database does.
        try:
            await asyncio.wait_for(self._pool.close(), CLOSE_TIMEOUT)
        except TimeoutError:
            self._pool.terminate()
