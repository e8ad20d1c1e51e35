"""What asyncio leaves to its users: telling a cancelled task from a cancelled future,
stopping a background task."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any


def cancelled_from_outside() -> bool:
    """Whether the running task itself is being cancelled (stop, a timeout), rather than a
    future it awaited: aiormq cancels what waits on a connection when that connection
    closes, and the CancelledError then reaches code nobody cancelled."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


async def pause(seconds: float) -> None:
    """`asyncio.sleep` for the loops of background tasks that call into aio-pika.

    A cancel that arrives while such a call runs can be swallowed by it (it catches the
    CancelledError of a future it cancelled itself); the task then still counts as being
    cancelled but would sleep on, and whoever stops it would wait forever. Here the cancel
    is raised instead."""
    if cancelled_from_outside():
        raise asyncio.CancelledError
    await asyncio.sleep(seconds)


async def cancel_and_wait(task: asyncio.Future[Any] | None) -> None:
    """Cancel a background task (if any) and wait until it has ended."""
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
