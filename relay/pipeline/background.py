"""A stage worker's background tasks (rebalancing, subscribing again, handing over): each
runs on its own, a failure is logged, never lost, and stopping cancels them all."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

import structlog

log = structlog.get_logger(__name__)


class Background:
    """The tasks started with `spawn`, until `cancel` ends them."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[None]] = set()
        self._cancelling = False

    def spawn(self, work: Coroutine[Any, Any, None], name: str) -> None:
        """Run `work` in the background; `cancel` cancels it; a failure is logged."""
        task = asyncio.create_task(work, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._finished)

    async def cancel(self) -> None:
        """Cancel every task still running and wait for them to end."""
        self._cancelling = True
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            if not self._cancelling:  # only `cancel` cancels them: anything else is a fault
                log.error("background_task_cancelled", task=task.get_name())
        elif (error := task.exception()) is not None:
            log.error("background_task_failed", task=task.get_name(), exc_info=error)
