"""Isolation per key (an endpoint a delivery worker sends to, an integration whose bot a bot
worker runs): a circuit breaker and a cap on work in flight.

After `threshold` consecutive failures a key is open for `cooldown` seconds: nothing is
sent to it, its work waits in the broker instead of holding the worker. Then one probe goes
through (half-open); its success closes the circuit, its failure opens it again.
Separately, at most `cap` pieces of work for one key are in flight at once, so a slow one
cannot take every slot. `Breakers` is pure bookkeeping, the clock injected; `Slots` waits
for a busy key's slot, briefly.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from urllib.parse import urlsplit


class State(Enum):
    """A circuit's state (the metric's label)."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class Change(Enum):
    """What an attempt's outcome did to its circuit, when it did something to tell: opened
    it (from closed), or closed it (from open or half-open). A failed probe opens a circuit
    that was never closed: no change."""

    OPENED = "opened"
    CLOSED = "closed"


@dataclass
class _Circuit:
    failures: int = 0
    opened_at: float | None = None
    probing: bool = False
    in_flight: int = 0


def endpoint_of(url: str) -> str:
    """What isolation is per: scheme, host and port of the URL."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return f"{parts.scheme}://{parts.hostname}:{port}"


class Breakers:
    """The circuits of every endpoint this worker delivers to."""

    def __init__(
        self,
        threshold: int,
        cooldown: float,
        cap: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._threshold = threshold
        self._cooldown = cooldown
        self._cap = cap
        self._clock = clock
        self._circuits: dict[str, _Circuit] = {}

    def state(self, endpoint: str) -> State:
        """The endpoint's circuit state now."""
        circuit = self._circuits.get(endpoint)
        if circuit is None or circuit.opened_at is None:
            return State.CLOSED
        if self._clock() - circuit.opened_at < self._cooldown:
            return State.OPEN
        return State.HALF_OPEN

    def acquire(self, endpoint: str) -> float | None:
        """Take a slot to send: None if granted, else seconds to wait before trying again."""
        circuit = self._circuits.setdefault(endpoint, _Circuit())
        state = self.state(endpoint)
        if state is State.OPEN:
            assert circuit.opened_at is not None
            return self._cooldown - (self._clock() - circuit.opened_at)
        if circuit.in_flight >= self._cap or (state is State.HALF_OPEN and circuit.probing):
            return 1.0
        circuit.in_flight += 1
        circuit.probing = circuit.probing or state is State.HALF_OPEN
        return None

    def release(self, endpoint: str, success: bool) -> Change | None:
        """Give the slot back with the attempt's outcome; what it did to the circuit."""
        circuit = self._circuits[endpoint]
        circuit.in_flight -= 1
        circuit.probing = False
        was_open = circuit.opened_at is not None
        if success:
            circuit.failures, circuit.opened_at = 0, None
            return Change.CLOSED if was_open else None
        circuit.failures += 1
        if circuit.failures >= self._threshold or was_open:
            circuit.opened_at = self._clock()
            return None if was_open else Change.OPENED
        return None

    def states(self) -> dict[str, State]:
        """Every known endpoint's state (for the metrics)."""
        return {endpoint: self.state(endpoint) for endpoint in self._circuits}


class Slots:
    """The slots of `Breakers`, a busy key's waited for in the lane for up to `patience`
    seconds: under load slots free up within milliseconds, and a round trip through a delay
    queue per piece of work would cost the broker more than the work itself."""

    def __init__(self, breakers: Breakers, patience: float) -> None:
        self._breakers = breakers
        self._patience = patience
        self._freed = asyncio.Condition()

    def state(self, key: str) -> State:
        """The key's circuit state now."""
        return self._breakers.state(key)

    async def take(self, key: str) -> float | None:
        """A slot of `key`: None once taken, else the seconds to wait in the broker (its
        circuit is not closed, or its slots stayed taken for `patience`)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._patience
        async with self._freed:
            while True:
                wait = self._breakers.acquire(key)
                left = deadline - loop.time()
                if wait is None or left <= 0 or self.state(key) is not State.CLOSED:
                    return wait
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._freed.wait(), left)

    async def give_back(self, key: str, success: bool) -> Change | None:
        """Return the slot with the outcome (the circuit learns it); what it did to it."""
        change = self._breakers.release(key, success=success)
        async with self._freed:
            self._freed.notify_all()
        return change
