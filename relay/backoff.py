"""When to try a delivery again: the schedule, jitter, Retry-After, and delay-queue hops.

Pure functions. A wait of any length is made of hops through a few delay queues with fixed
TTLs (one TTL per queue, as the broker expires only at the head): each hop takes the
longest queue that does not overshoot, and the message carries the time it is due, so a
message back early simply hops again.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

JITTER = 0.2


def jittered(seconds: float, rng: random.Random | None = None) -> float:
    """`seconds` ± 20%, so retries of many deliveries do not arrive together."""
    spread = (rng or random).uniform(-JITTER, JITTER)
    return max(0.0, seconds * (1 + spread))


def parse_retry_after(value: str | None, now: datetime) -> float | None:
    """Seconds from a `Retry-After` header (delta-seconds or HTTP date); None if absent/bad."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - now).total_seconds())


def next_delay(
    scheduled: float,
    retry_after: float | None,
    overloaded: bool,
    penalty: float,
    rng: random.Random | None = None,
) -> float:
    """The wait before the next attempt.

    The schedule's delay with jitter; a `Retry-After` replaces it but is clamped to at most
    twice the scheduled delay (an endpoint cannot park deliveries for days); after a
    timeout or a 429 the wait is at least the overload penalty.
    """
    delay = jittered(scheduled, rng)
    if retry_after is not None:
        delay = min(retry_after, 2 * scheduled) if scheduled > 0 else retry_after
    if overloaded:
        delay = max(delay, penalty)
    return delay


def first_hop(remaining: float, queues: Sequence[float]) -> float:
    """The delay queue a wait of `remaining` seconds starts in (the shortest if it is due)."""
    return hop(remaining, queues) or min(queues)


def hop(remaining: float, queues: Sequence[float]) -> float | None:
    """The delay queue for the next hop of a wait of `remaining` seconds; None if due."""
    if remaining <= 0:
        return None
    fitting = [q for q in queues if q <= remaining]
    return max(fitting) if fitting else min(queues)
