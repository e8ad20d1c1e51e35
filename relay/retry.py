"""The one backoff of the code's own retry loops (connecting, subscribing, polling)."""

from __future__ import annotations

from collections.abc import Iterator


def pauses(first: float, cap: float) -> Iterator[float]:
    """Pauses between attempts: `first`, doubling each time, never more than `cap`."""
    pause = first
    while True:
        yield pause
        pause = min(pause * 2, cap)
