"""Rates that hold across processes: token buckets kept in the store
(`relay.store.sql.rate_buckets`), taken from in leases.

Every ingress shares one bucket per integration for its rate limit, every delivery worker
one per integration for its pace. A process takes a lease of tokens (about `lease_seconds`
of the rate) in one store call and spends it locally, so the store sees one write per lease,
not one per request. A lease not spent within `lease_life` seconds is dropped, so tokens a
process took and did not need cannot be spent in a burst later: the shared rate is never
exceeded, at the price of running slightly under it when several processes share a bucket.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from relay.lru import Lru
from relay.store.protocols import RateBuckets

LEASE_SECONDS = 0.1
LEASE_LIFE = 1.0
MAX_KEYS = 65_536


@dataclass
class _Lease:
    tokens: int = 0
    expires: float = 0.0
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class SharedRates:
    """Takes from the store's shared buckets through local leases."""

    def __init__(
        self,
        store: RateBuckets,
        lease_seconds: float = LEASE_SECONDS,
        lease_life: float = LEASE_LIFE,
        clock: Callable[[], float] = time.time,
        max_keys: int = MAX_KEYS,
    ) -> None:
        self._store = store
        self._lease_seconds = lease_seconds
        self._lease_life = lease_life
        self._clock = clock
        self._leases: Lru[str, _Lease] = Lru(max_keys)

    async def take(self, key: str, rate: float, burst: int) -> float:
        """One token of the bucket `key` (`rate` per second, bursts of `burst`): 0 if taken,
        else the seconds until one may be. StoreError if the store cannot be reached."""
        lease = self._leases.get(key)
        if lease is None:
            lease = _Lease()
            self._leases.put(key, lease)
        if self._spend(lease):
            return 0.0
        async with lease.lock:  # one store call per key at a time; the others wait for it
            if self._spend(lease):
                return 0.0
            now = self._clock()
            wanted = max(1, min(burst, math.ceil(rate * self._lease_seconds)))
            taken = await self._store.take_tokens(key, rate, burst, wanted, now)
            if not taken.granted:
                return taken.wait
            lease.tokens, lease.expires = taken.granted - 1, now + self._lease_life
            return 0.0

    def _spend(self, lease: _Lease) -> bool:
        if lease.tokens > 0 and self._clock() < lease.expires:
            lease.tokens -= 1
            return True
        return False
