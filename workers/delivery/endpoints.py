"""The endpoints a delivery worker sends to, as slots: a delivery takes its endpoint's slot
before the POST and gives it back with the outcome (`workers.delivery.breaker` keeps the
circuits and the caps; here the waiting for a busy endpoint, and the breaker metric)."""

from __future__ import annotations

import asyncio
import contextlib

from relay.metrics import Metrics
from workers.delivery.breaker import Breakers, State

BUSY_WAIT = 5.0  # seconds a response waits in its lane for a busy endpoint's slot

_STATE_VALUE = {"closed": 0, "half_open": 1, "open": 2}


class Endpoints:
    """In-flight slots per endpoint, behind each endpoint's circuit breaker."""

    def __init__(self, breakers: Breakers, metrics: Metrics) -> None:
        self._breakers = breakers
        self._metrics = metrics
        self._slot_freed = asyncio.Condition()

    async def take(self, endpoint: str) -> float | None:
        """An in-flight slot of the endpoint: None once taken, else the seconds to wait in the
        broker. A busy endpoint is waited for here, briefly: slots free up within
        milliseconds under load, and a round trip through a delay queue per response would
        cost the broker more than the delivery itself."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + BUSY_WAIT
        async with self._slot_freed:
            while True:
                wait = self._breakers.acquire(endpoint)
                left = deadline - loop.time()
                if wait is None or self._breakers.state(endpoint) is not State.CLOSED or left <= 0:
                    return wait
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._slot_freed.wait(), left)

    async def give_back(self, endpoint: str, success: bool) -> None:
        """Return the endpoint's slot with the attempt's outcome (its circuit learns it)."""
        self._breakers.release(endpoint, success=success)
        async with self._slot_freed:
            self._slot_freed.notify_all()
        value = _STATE_VALUE[self._breakers.state(endpoint).value]
        self._metrics.breaker_state.labels(endpoint).set(value)
