"""The endpoints a delivery worker sends to, as slots: a delivery takes its endpoint's slot
before the POST and gives it back with the outcome (`relay.pipeline.breaker` keeps the
circuits and the caps and waits for a busy endpoint; here the breaker metric, and the
news of a circuit opened or closed, for the back ends' operations URLs)."""

from __future__ import annotations

from relay.metrics import Metrics
from relay.pipeline.breaker import Breakers, Slots, State
from relay.store import IntegrationRecord
from workers.delivery.telling import CircuitNews

BUSY_WAIT = 5.0  # seconds a response waits in its lane for a busy endpoint's slot

_STATE_VALUE = {"closed": 0, "half_open": 1, "open": 2}


class Endpoints:
    """In-flight slots per endpoint, behind each endpoint's circuit breaker."""

    def __init__(self, breakers: Breakers, metrics: Metrics, news: CircuitNews) -> None:
        self._slots = Slots(breakers, BUSY_WAIT)
        self._metrics = metrics
        self._news = news

    async def take(self, endpoint: str, integration: IntegrationRecord) -> float | None:
        """An in-flight slot of the endpoint for a delivery of `integration`: None once
        taken, else the seconds to wait in the broker (a busy endpoint is waited for here,
        briefly; an open circuit holding the delivery is told)."""
        wait = await self._slots.take(endpoint)
        if wait is not None and self._slots.state(endpoint) is not State.CLOSED:
            self._news.held(endpoint, integration)
        return wait

    async def give_back(self, endpoint: str, integration: IntegrationRecord, success: bool) -> None:
        """Return the endpoint's slot with the outcome of a delivery of `integration` (its
        circuit learns it, and a circuit it opened or closed is told)."""
        change = await self._slots.give_back(endpoint, success)
        if change is not None:
            self._news.changed(endpoint, integration, change)
        value = _STATE_VALUE[self._slots.state(endpoint).value]
        self._metrics.breaker_state.labels(endpoint).set(value)
