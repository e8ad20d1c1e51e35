"""The one backoff of the code's own retry loops (connecting, subscribing, polling)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator

import structlog

log = structlog.get_logger(__name__)


def pauses(first: float, cap: float) -> Iterator[float]:
    """Pauses between attempts: `first`, doubling each time, never more than `cap`."""
    pause = first
    while True:
        yield pause
        pause = min(pause * 2, cap)


async def keep_trying(
    attempt: Callable[[], Awaitable[None]],
    errors: tuple[type[BaseException], ...],
    event: str,
) -> None:
    """Await `attempt` until it returns, pausing between tries; each failure among `errors`
    is logged as `event` (anything else ends the trying)."""
    for delay in pauses(0.5, 10.0):
        try:
            return await attempt()
        except errors as error:
            log.warning(event, error=str(error), retry_in=delay)
        await asyncio.sleep(delay)
