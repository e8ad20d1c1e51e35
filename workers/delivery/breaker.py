"""Per-endpoint isolation: a circuit breaker and a cap on deliveries in flight.

After `threshold` consecutive failures an endpoint is open for `cooldown` seconds: nothing
is sent to it, its deliveries wait in the broker instead of holding the worker. Then one
probe goes through (half-open); its success closes the circuit, its failure opens it again.
Separately, at most `cap` deliveries to one endpoint are in flight at once, so a slow
endpoint cannot take every slot. Pure bookkeeping; the clock is injected.
"""

from __future__ import annotations

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

    def release(self, endpoint: str, success: bool) -> None:
        """Give the slot back with the attempt's outcome."""
        circuit = self._circuits[endpoint]
        circuit.in_flight -= 1
        circuit.probing = False
        if success:
            circuit.failures, circuit.opened_at = 0, None
            return
        circuit.failures += 1
        if circuit.failures >= self._threshold or circuit.opened_at is not None:
            circuit.opened_at = self._clock()

    def states(self) -> dict[str, State]:
        """Every known endpoint's state (for the metrics)."""
        return {endpoint: self.state(endpoint) for endpoint in self._circuits}
