"""Several processes on one SQLite file: a write that finds the file locked by another
connection waits for it (Relay's own short pauses, not SQLite's growing sleeps) and goes
through once it is free; locked for longer than `LOCKED_FOR`, the store is unavailable."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from relay.store import sqlite as sqlite_driver
from relay.store.driver import StoreUnavailable
from relay.store.sqlite import SqliteDriver


@pytest.fixture
async def two_connections(tmp_path: Path) -> AsyncIterator[tuple[SqliteDriver, SqliteDriver]]:
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    first, second = await SqliteDriver.open(url), await SqliteDriver.open(url)
    async with first.connection() as conn:
        await conn.execute("CREATE TABLE notes (n INTEGER)")
    yield first, second
    await first.close()
    await second.close()


async def test_a_write_waits_for_another_connection_s_lock_and_then_goes_through(
    two_connections: tuple[SqliteDriver, SqliteDriver],
):
    first, second = two_connections
    held = asyncio.Event()
    release = asyncio.Event()

    async def hold_the_lock() -> None:
        async with first.transaction() as conn:
            await conn.execute("INSERT INTO notes VALUES (1)")
            held.set()
            await release.wait()

    holder = asyncio.create_task(hold_the_lock())
    await held.wait()

    # Locked: an autocommit write and a transaction both wait (a failure would raise).
    async def write_alone() -> int:
        async with second.connection() as conn:
            return await conn.execute("INSERT INTO notes VALUES (2)")

    async def write_in_a_transaction() -> None:
        async with second.transaction() as conn:
            await conn.execute("INSERT INTO notes VALUES (3)")

    alone = asyncio.create_task(write_alone())
    await asyncio.sleep(0.05)  # long enough to have been refused many times over
    assert not alone.done()
    release.set()
    await holder
    assert await asyncio.wait_for(alone, 5) == 1
    await asyncio.wait_for(write_in_a_transaction(), 5)
    async with first.connection() as conn:
        rows = await conn.fetchall("SELECT n FROM notes ORDER BY n")
    assert [row["n"] for row in rows] == [1, 2, 3]


async def test_a_write_locked_out_past_the_limit_finds_the_store_unavailable(
    two_connections: tuple[SqliteDriver, SqliteDriver], monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setattr(sqlite_driver, "LOCKED_FOR", 0.3)
    first, second = two_connections
    async with first.transaction() as conn:
        await conn.execute("INSERT INTO notes VALUES (1)")
        with pytest.raises(StoreUnavailable, match="locked"):
            async with second.connection() as other:
                await other.execute("INSERT INTO notes VALUES (2)")
    async with second.connection() as conn:
        assert [row["n"] for row in await conn.fetchall("SELECT n FROM notes")] == [1]
