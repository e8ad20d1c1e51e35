"""A wait of any length in a stage's delay queues: hops through a few queues with fixed TTLs
(one TTL per queue, as the broker expires only at the head).

Pure functions. Each hop takes the longest queue that does not overshoot; a message that
must wait longer carries the time it is due (`relay.wire.DUE_HEADER`), and one back early
simply hops again.
"""

from __future__ import annotations

from collections.abc import Sequence


def first_hop(remaining: float, queues: Sequence[float]) -> float:
    """The delay queue a wait of `remaining` seconds starts in (the shortest if it is due)."""
    return hop(remaining, queues) or min(queues)


def hop(remaining: float, queues: Sequence[float]) -> float | None:
    """The delay queue for the next hop of a wait of `remaining` seconds; None if due."""
    if remaining <= 0:
        return None
    fitting = [q for q in queues if q <= remaining]
    return max(fitting) if fitting else min(queues)
