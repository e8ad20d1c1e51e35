"""Retention: rows older than a cutoff and settled are deleted in small batches, each one
statement of its own, so the hot path never waits long behind them; a lease per named job
keeps one process at a time at it; SQLite gives the pages freed back to the file system.

Settled, with nothing of it at or after the cutoff:

- a response: dead-lettered before the cutoff, or its last attempt final (delivered, or
  given up: no next attempt planned), and no attempt since the cutoff (a resend, a replay);
- an incoming message: queued, its turn handled (or, never handled, dead-lettered) before
  the cutoff, and none of its responses left: they go first, so a turn goes as a whole.

Never touched: a message pending (the outbox's), queued and not handled, dead-lettered
since the cutoff (its dead letter may still be replayed), a response with no attempt yet or
a retry planned. Attempts go once their response is gone; users and conversations once no
message names them. A message's idempotency keys (the caller's messageId, a pushed
response's key) are its columns, and go with it.

SQLite stamps a row that becomes visible with one more than the largest stamp
(`relay.store.sql.stamps`): the row holding that one is kept, or a stamp (and with the
rowid reused, a watermark) could repeat, and a reader past it miss the new row. PostgreSQL
stamps with transaction ids and a sequence, which no delete turns back.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, Literal

import structlog

from relay.store.driver import Driver
from relay.store.records import PRUNE_KINDS, Pruned, PruneKind
from relay.store.sql.common import delete_unused
from relay.store.sqlite import SqliteDriver

log = structlog.get_logger(__name__)

# Called before each batch: False once the lease is lost (the prune then stops).
Renew = Callable[[], Awaitable[bool]]
# Where a batch starts: (updated_at, id) for users and conversations, paged through in that
# order (the ones still in use stay where they are); the others always start at the oldest.
Cursor = tuple[Any, str]
_START: Cursor = (datetime(1970, 1, 1, tzinfo=UTC), "")

_TAKE_LEASE = (
    "INSERT INTO leases (name, holder, held_until) VALUES (?, ?, ?)"
    " ON CONFLICT (name) DO UPDATE SET holder = excluded.holder,"
    " held_until = excluded.held_until"
    " WHERE leases.held_until < ? OR leases.holder = excluded.holder"
)

_LAST_ATTEMPT_FINAL = (
    "(SELECT CASE WHEN a.next_attempt_at IS NULL THEN 1 ELSE 0 END FROM delivery_attempts a"
    " WHERE a.message_id = m.id ORDER BY a.created_at DESC, a.attempt DESC LIMIT 1) = 1"
)
# Every `?` is the cutoff.
_SETTLED: dict[PruneKind, str] = {
    "responses": "m.direction = 'outgoing' AND NOT EXISTS (SELECT 1 FROM delivery_attempts a"
    " WHERE a.message_id = m.id AND a.created_at >= ?)"
    f" AND (m.dead_at < ? OR {_LAST_ATTEMPT_FINAL})",
    "messages": "m.direction = 'incoming' AND m.state = 'queued'"
    " AND COALESCE(m.handled_at, m.dead_at) < ?"
    " AND NOT EXISTS (SELECT 1 FROM messages r WHERE r.reply_to = m.id)",
}
_KEEP_LATEST_STAMP = {
    "sqlite": " AND m.txid < (SELECT MAX(txid) FROM messages)",
    "postgresql": "",
}

_INCREMENTAL = 2  # PRAGMA auto_vacuum's value for INCREMENTAL
_VACUUM_PAGES = 2000  # pages given back per step: each step holds the write lock briefly


def _delete_settled(kind: PruneKind, dialect: str) -> str:
    return (
        "DELETE FROM messages WHERE id IN (SELECT m.id FROM messages m WHERE m.created_at < ?"
        f" AND {_SETTLED[kind]}{_KEEP_LATEST_STAMP[dialect]} ORDER BY m.created_at LIMIT ?)"
    )


_DELETE_ATTEMPTS = (
    "DELETE FROM delivery_attempts WHERE id IN (SELECT a.id FROM delivery_attempts a"
    " WHERE a.created_at < ? AND NOT EXISTS (SELECT 1 FROM messages m WHERE m.id = a.message_id)"
    " ORDER BY a.created_at LIMIT ?)"
)

# A conversation token is settled once expired or revoked: it is kept until the cutoff only
# so that what a browser was let do stays known as long as what it did.
_DELETE_CONVERSATION_TOKENS = (
    "DELETE FROM conversation_tokens WHERE id IN (SELECT t.id FROM conversation_tokens t"
    " WHERE t.expires_at < ? OR t.revoked_at < ? LIMIT ?)"
)


class RetentionSql:
    """`Retention` over a `Driver`."""

    _driver: Driver

    async def take_lease(self, name: str, holder: str, until: datetime, now: datetime) -> bool:
        async with self._driver.connection() as conn:
            return await conn.execute(_TAKE_LEASE, name, holder, until, now) == 1

    async def release_lease(self, name: str, holder: str) -> None:
        async with self._driver.connection() as conn:
            await conn.execute("DELETE FROM leases WHERE name = ? AND holder = ?", name, holder)

    async def prune(self, cutoff: datetime, batch: int, renew: Renew) -> Pruned:
        counts = dict.fromkeys(PRUNE_KINDS, 0)
        for kind in PRUNE_KINDS:
            after: Cursor | None = _START
            while after is not None:
                if not await renew():
                    return Pruned(counts, complete=False)
                deleted, after = await self._prune_batch(kind, cutoff, batch, after)
                counts[kind] += deleted
        return Pruned(counts)

    async def _prune_batch(
        self, kind: PruneKind, cutoff: datetime, batch: int, after: Cursor
    ) -> tuple[int, Cursor | None]:
        """Delete one batch; how many, and where the next starts (None: no more)."""
        if kind == "conversations" or kind == "users":
            return await self._prune_unused(kind, cutoff, batch, after)
        if kind == "attempts":
            sql, cutoffs = _DELETE_ATTEMPTS, 1
        elif kind == "conversation_tokens":
            sql, cutoffs = _DELETE_CONVERSATION_TOKENS, 2
        else:
            sql = _delete_settled(kind, self._driver.dialect)
            cutoffs = 1 + _SETTLED[kind].count("?")
        async with self._driver.connection() as conn:
            deleted = await conn.execute(sql, *[cutoff] * cutoffs, batch)
        return deleted, _START if deleted == batch else None

    async def _prune_unused(
        self,
        table: Literal["conversations", "users"],
        cutoff: datetime,
        batch: int,
        after: Cursor,
    ) -> tuple[int, Cursor | None]:
        """Users or conversations made before the cutoff that no message names, from one
        page of them (by when they were made)."""
        async with self._driver.connection() as conn:
            page = await conn.fetchall(
                f"SELECT updated_at, id FROM {table} WHERE updated_at < ?"
                " AND (updated_at, id) > (?, ?) ORDER BY updated_at, id LIMIT ?",
                cutoff,
                *after,
                batch,
            )
        if not page:
            return 0, None
        deleted = await delete_unused(self._driver, table, [row["id"] for row in page])
        last: Cursor = (page[-1]["updated_at"], page[-1]["id"])
        return deleted, (last if len(page) == batch else None)

    async def reclaim_space(self, full_vacuum_limit: int | None) -> int:
        driver = self._driver
        if not isinstance(driver, SqliteDriver):
            return 0
        before = await self._pragma("page_count")
        if await self._pragma("auto_vacuum") != _INCREMENTAL and not await self._make_incremental(
            driver, before, full_vacuum_limit
        ):
            return 0
        free = await self._pragma("freelist_count")
        while free > 0:
            await driver.run_script(f"PRAGMA incremental_vacuum({_VACUUM_PAGES})")
            left = await self._pragma("freelist_count")
            if left >= free:  # nothing more could be given back (cannot be, but never spin)
                break
            free = left
        async with driver.connection() as conn:
            # The file shrinks when the WAL is copied back into it; PASSIVE waits for no one.
            await conn.fetchone("PRAGMA wal_checkpoint(PASSIVE)")
        return (before - await self._pragma("page_count")) * await self._pragma("page_size")

    async def _make_incremental(
        self, driver: SqliteDriver, pages: int, full_vacuum_limit: int | None
    ) -> bool:
        """Switch a file made before incremental vacuum to it: one whole VACUUM, which
        blocks every writer while it copies the file. Only up to `full_vacuum_limit` bytes
        (None: any size); False if the file is larger."""
        size = pages * await self._pragma("page_size")
        if full_vacuum_limit is not None and size > full_vacuum_limit:
            log.warning(
                "sqlite_vacuum_postponed",
                size=size,
                hint="run `relay prune` once, at a quiet time, to give deleted space back",
            )
            return False
        log.info("sqlite_vacuum", size=size, note="once: the file moves to incremental vacuum")
        await driver.run_script("PRAGMA auto_vacuum=INCREMENTAL; VACUUM")
        return True

    async def _pragma(self, name: str) -> int:
        async with self._driver.connection() as conn:
            row = await conn.fetchone(f"PRAGMA {name}")
        return int(next(iter(row.values()))) if row else 0
