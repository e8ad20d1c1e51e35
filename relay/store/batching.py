"""Group commit: the small writes that arrive while one batch is being written go together
in the next, one statement and one commit for all of them.

Hot-path writes (an inbound message marked queued, a response marked queued, a delivery
attempt logged) are each awaited before the work goes on, and one commit each made the
store the bottleneck: SQLite serializes commits across every process on the file, and
PostgreSQL pays a WAL flush per commit. Each writer still waits for its own row to be
committed, so nothing is acknowledged earlier than before.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")

BATCH_LIMIT = 200  # items per write (the store splits statements to its parameter limit)


class GroupCommit(Generic[T]):
    """Batches items for `write`; `add` returns once the batch holding its item is written."""

    def __init__(self, write: Callable[[Sequence[T]], Awaitable[None]], name: str) -> None:
        self._write = write
        self._name = name
        self._waiting: list[tuple[T, asyncio.Future[None]]] = []
        self._writer: asyncio.Task[None] | None = None

    async def add(self, item: T) -> None:
        """Write `item` with whatever else is waiting; raises what the write raised."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append((item, done))
        if self._writer is None or self._writer.done():
            # A context of its own: the first writer's log context is not the batch's.
            self._writer = asyncio.create_task(
                self._drain(), name=self._name, context=contextvars.Context()
            )
        await done

    async def _drain(self) -> None:
        batch: list[tuple[T, asyncio.Future[None]]] = []
        try:
            while self._waiting:
                batch, self._waiting = self._waiting[:BATCH_LIMIT], self._waiting[BATCH_LIMIT:]
                try:
                    await self._write([item for item, _ in batch])
                except Exception:
                    # One bad item must not fail the others: each is written alone.
                    for item, done in batch:
                        await self._write_alone(item, done)
                else:
                    for _, done in batch:
                        _settle(done, None)
        except BaseException as error:  # cancelled: no writer may wait forever
            for _, done in [*batch, *self._waiting]:
                _settle(done, error)
            self._waiting = []
            raise

    async def _write_alone(self, item: T, done: asyncio.Future[None]) -> None:
        try:
            await self._write([item])
        except Exception as error:
            _settle(done, error)
        else:
            _settle(done, None)


def _settle(done: asyncio.Future[None], error: BaseException | None) -> None:
    if done.done():  # its writer was cancelled, or it was settled already
        return
    if error is None:
        done.set_result(None)
    elif isinstance(error, Exception):
        done.set_exception(error)
    else:
        done.cancel()
