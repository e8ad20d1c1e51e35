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
R = TypeVar("R")

BATCH_LIMIT = 200  # items per write (the store splits statements to its parameter limit)


class GroupCall(Generic[T, R]):
    """Batches items for `write`, which answers one result per item, in order; `add`
    returns its item's result once the batch holding it is written.

    A batch is what waits while the previous one is written: nothing waits for company.
    """

    def __init__(self, write: Callable[[Sequence[T]], Awaitable[Sequence[R]]], name: str) -> None:
        self._write = write
        self._name = name
        self._waiting: list[tuple[T, asyncio.Future[R]]] = []
        self._writer: asyncio.Task[None] | None = None

    async def add(self, item: T) -> R:
        """Write `item` with whatever else is waiting; raises what the write raised.

        The item is written even if the caller is cancelled while it waits (it joined the
        batch before the first wait): no need to shield the call."""
        done: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._waiting.append((item, done))
        self._start()
        return await done

    async def add_all(self, items: Sequence[T]) -> list[R]:
        """`add` for several items, which join the same batch (up to its limit); their
        results in order, or the first error raised."""
        if not items:
            return []
        loop = asyncio.get_running_loop()
        waiting = [(item, loop.create_future()) for item in items]
        self._waiting.extend(waiting)
        self._start()
        return list(await asyncio.gather(*(done for _, done in waiting)))

    def _start(self) -> None:
        if self._writer is None or self._writer.done():
            # A context of its own: the first writer's log context is not the batch's.
            self._writer = asyncio.create_task(
                self._drain(), name=self._name, context=contextvars.Context()
            )

    async def _drain(self) -> None:
        batch: list[tuple[T, asyncio.Future[R]]] = []
        try:
            while self._waiting:
                batch, self._waiting = self._waiting[:BATCH_LIMIT], self._waiting[BATCH_LIMIT:]
                try:
                    results = await self._write([item for item, _ in batch])
                except Exception:
                    # One bad item must not fail the others: each is written alone.
                    for item, done in batch:
                        await self._write_alone(item, done)
                else:
                    for (_, done), result in zip(batch, results, strict=True):
                        _settle(done, result)
        except BaseException as error:  # cancelled: no writer may wait forever
            for _, done in [*batch, *self._waiting]:
                _fail(done, error)
            self._waiting = []
            raise

    async def _write_alone(self, item: T, done: asyncio.Future[R]) -> None:
        try:
            [result] = await self._write([item])
        except Exception as error:
            _fail(done, error)
        else:
            _settle(done, result)


class GroupCommit(Generic[T]):
    """A `GroupCall` for writes that answer nothing: `add` returns once its item is written."""

    def __init__(self, write: Callable[[Sequence[T]], Awaitable[None]], name: str) -> None:
        self._write = write
        self._call: GroupCall[T, None] = GroupCall(self._written, name)

    async def _written(self, items: Sequence[T]) -> list[None]:
        await self._write(items)
        return [None] * len(items)

    async def add(self, item: T) -> None:
        """Write `item` with whatever else is waiting; raises what the write raised."""
        await self._call.add(item)

    async def add_all(self, items: Sequence[T]) -> None:
        """Write `items` together, with whatever else is waiting."""
        await self._call.add_all(items)


def _settle(done: asyncio.Future[R], result: R) -> None:
    if not done.done():  # its writer was cancelled, or it was settled already
        done.set_result(result)


def _fail(done: asyncio.Future[R], error: BaseException) -> None:
    if done.done():
        return
    if isinstance(error, Exception):
        done.set_exception(error)
    else:
        done.cancel()
