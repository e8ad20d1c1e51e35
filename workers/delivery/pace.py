"""Deliveries paced per integration: at most its `deliveryRate` responses a second to its
response URL, in bursts of `deliveryBurst`, across every delivery worker (one token bucket
per integration in the store, `pace:{integrationId}`, taken from in leases: `relay.rates`).

A response whose turn has not come waits for it in its lane, but briefly (`LANE_WAIT`) and
only in a few lanes per integration at once (`LANES`): the worker's other lanes stay free
for the other integrations, so one tenant's backlog never slows another's deliveries. The
rest wait in the delay queues, holding their conversation's order as every wait does, each
given a turn a little further on than the last (the backlog spread at the rate), so that
they come back one by one rather than all together to bounce again.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from relay.lru import Lru
from relay.metrics import Metrics
from relay.store import IntegrationRecord

LANE_WAIT = 1.0  # seconds a response waits in its lane for its turn, at most
LANES = 2  # lanes of one integration that may wait for its turn at once
MAX_INTEGRATIONS = 65_536  # integrations whose waits this worker remembers


@dataclass
class _Turns:
    """One integration's waits in this worker."""

    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # lane waiters, first come first
    in_lanes: int = 0
    last_promised: float = 0.0  # the latest turn promised to a response sent to the queues


class Tokens(Protocol):
    """Shared token buckets (`relay.rates.SharedRates`)."""

    async def take(self, key: str, rate: float, burst: int) -> float:
        """0 once a token of `key` is taken, else the seconds until one may be."""
        ...


def bucket(integration_id: str) -> str:
    """The key of an integration's shared bucket."""
    return f"pace:{integration_id}"


class Pace:
    """Each response's turn under its integration's pace."""

    def __init__(
        self,
        rates: Tokens,
        metrics: Metrics,
        lanes: int = LANES,
        lane_wait: float = LANE_WAIT,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._rates = rates
        self._metrics = metrics
        self._lanes = lanes
        self._lane_wait = lane_wait
        self._clock = clock
        self._turns: Lru[str, _Turns] = Lru(MAX_INTEGRATIONS)

    async def turn(self, integration: IntegrationRecord) -> float | None:
        """None once the response may go (a token of its integration taken, or unpaced),
        else the seconds it waits in the delay queues. StoreError if the store is away."""
        rate = integration.delivery.delivery_rate
        if rate is None or rate <= 0:
            return None
        turns = self._turns.get(integration.id)
        if turns is None:
            turns = _Turns()
            self._turns.put(integration.id, turns)
        if turns.in_lanes >= self._lanes:
            return self._later(turns, rate)
        turns.in_lanes += 1
        try:
            return await self._in_lane(turns, integration, rate)
        finally:
            turns.in_lanes -= 1

    async def _in_lane(
        self, turns: _Turns, integration: IntegrationRecord, rate: float
    ) -> float | None:
        """Wait here for a token until `lane_wait` is over (then: the queues' wait)."""
        deadline = self._clock() + self._lane_wait
        try:
            async with asyncio.timeout(self._lane_wait):
                await turns.lock.acquire()
        except TimeoutError:
            return self._later(turns, rate)
        key, burst = bucket(integration.id), integration.delivery.burst()
        try:
            waited = False
            while (wait := await self._rates.take(key, rate, burst)) > 0:
                if self._clock() + wait > deadline:
                    return self._later(turns, rate)
                waited = True
                await asyncio.sleep(wait)
            if waited:
                self._metrics.delivery_paced.labels("lane").inc()
            return None
        finally:
            turns.lock.release()

    def _later(self, turns: _Turns, rate: float) -> float:
        """The wait in the queues: a turn after the lanes' waiters and after the last turn
        promised (so a backlog comes back at the rate, not all at once)."""
        self._metrics.delivery_paced.labels("queue").inc()
        now = self._clock()
        turns.last_promised = max(now + (turns.in_lanes + 1) / rate, turns.last_promised + 1 / rate)
        return turns.last_promised - now
