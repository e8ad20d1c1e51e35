"""One lane per conversation: its messages are handled one at a time, in arrival order,
while different conversations run concurrently up to a bound.

`submit` is synchronous on purpose: called straight from the consumer's in-order iterator,
it fixes the order before any await can reorder deliveries.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

Item = TypeVar("Item")


class Lanes(Generic[Item]):
    """Runs `handler(item)` per key sequentially, across keys concurrently (bounded)."""

    def __init__(self, handler: Callable[[Item], Awaitable[None]], concurrency: int) -> None:
        self._handler = handler
        self._slots = asyncio.Semaphore(concurrency)
        self._queues: dict[str, asyncio.Queue[Item]] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._since: dict[str, float] = {}  # when each lane's current item started

    def submit(self, key: str, item: Item) -> None:
        """Queue `item` behind everything already submitted under `key`."""
        queue = self._queues.get(key)
        if queue is None:
            queue = self._queues[key] = asyncio.Queue()
            self._tasks[key] = asyncio.create_task(self._run(key, queue), name=f"lane-{key}")
        queue.put_nowait(item)

    async def _run(self, key: str, queue: asyncio.Queue[Item]) -> None:
        try:
            while not queue.empty():
                item = queue.get_nowait()
                async with self._slots:
                    self._since[key] = time.monotonic()
                    try:
                        await self._handler(item)
                    finally:
                        self._since.pop(key, None)
        finally:
            self._queues.pop(key, None)
            self._tasks.pop(key, None)

    def stuck(self, seconds: float) -> dict[str, list[str]]:
        """The lanes whose current item has run longer than `seconds`: where each waits
        (its chain of awaits, outermost first), for a stall's report."""
        now = time.monotonic()
        return {
            key: awaiting(self._tasks[key])
            for key, since in self._since.items()
            if now - since > seconds and key in self._tasks
        }

    def withdraw(self, predicate: Callable[[Item], bool]) -> list[Item]:
        """Take back the items not yet started that match, keeping each lane's order."""
        taken: list[Item] = []
        for queue in self._queues.values():
            kept: list[Item] = []
            while not queue.empty():
                item = queue.get_nowait()
                (taken if predicate(item) else kept).append(item)
            for item in kept:
                queue.put_nowait(item)
        return taken

    @property
    def busy(self) -> int:
        """Lanes with work in hand."""
        return len(self._tasks)

    async def drain(self, seconds: float) -> bool:
        """Wait for every lane to finish (True), or cancel what is left after `seconds`."""
        tasks = list(self._tasks.values())
        if not tasks:
            return True
        _, pending = await asyncio.wait(tasks, timeout=seconds)
        for task in pending:
            task.cancel()
        for task in pending:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        return not pending


def awaiting(task: asyncio.Task[None]) -> list[str]:
    """`file:line function` of each coroutine in the task's chain of awaits, down to the
    innermost (what `Task.get_stack` does not show for a suspended task), then what that
    one awaits."""
    chain: list[str] = []
    awaited: Any = task.get_coro()
    while awaited is not None and len(chain) < 50:
        frame = getattr(awaited, "cr_frame", None) or getattr(awaited, "gi_frame", None)
        if frame is None:
            chain.append(repr(awaited)[:200])  # a future, or a C awaitable
            break
        chain.append(f"{frame.f_code.co_filename}:{frame.f_lineno} {frame.f_code.co_name}")
        awaited = getattr(awaited, "cr_await", None) or getattr(awaited, "gi_yieldfrom", None)
    return chain
