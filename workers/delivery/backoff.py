"""When to try a delivery again: the schedule, jitter, Retry-After.

Pure functions. The wait they give is spent in the outbound delay queues, in hops
(`relay.pipeline.delays`).
"""

from __future__ import annotations

import random
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
