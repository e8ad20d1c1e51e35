"""What asyncio leaves to its users: telling a cancelled task from a cancelled future."""

from __future__ import annotations

import asyncio


def cancelled_from_outside() -> bool:
    """Whether the running task itself is being cancelled (stop, a timeout), rather than a
    future it awaited: aiormq cancels what waits on a connection when that connection
    closes, and the CancelledError then reaches code nobody cancelled."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0
