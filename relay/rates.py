"""Rates that hold across processes: token buckets kept in the store
(`relay.store.sql.rate_buckets`), taken from in leases.

Every ingress shares one bucket per integration for its rate limit, every delivery worker
one per integration for its pace. A process takes a lease of tokens (about `lease_seconds`
of the rate) in one store call and spends it locally, so the store sees one write per lease,
not one per request. A lease not spent within `lease_life` seconds is dropped, so tokens a
process took and did not need cannot be spent in a burst later: the shared rate is never
exceeded, at the price of running slightly under it when several processes share a bucket.
A bucket the store found empty is not asked again before a lease's worth of tokens has come
back (nor later than `lease_life`), so a flood over the rate costs the store a lease and at
most one refusal per lease's time, not a call per refused request.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from relay.lru import Lru
from relay.store.protocols import RateBuckets
from relay.store.records import Taken

LEASE_SECONDS = 0.1
LEASE_LIFE = 1.0
MAX_KEYS = 65_536


@dataclass
class _Lease:
    tokens: int = 0
    expires: float = 0.0
    # The store's bucket was empty: its next token is due at `due`; asked again at `recheck`.
    due: float = 0.0
    recheck: float = 0.0
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
        local = self._local(lease)
        if local is not None:
            return local
        async with lease.lock:  # one store call per key at a time; the others wait for it
            local = self._local(lease)
            if local is not None:
                return local
            now = self._clock()
            wanted = max(1, min(burst, math.ceil(rate * self._lease_seconds)))
            taken = await self._store.take_tokens(key, rate, burst, wanted, now)
            if taken.granted < wanted:
                self._drained(lease, now, taken, wanted, rate)
            if not taken.granted:
                return taken.wait
            lease.tokens, lease.expires = taken.granted - 1, now + self._lease_life
            return 0.0

    def _drained(self, lease: _Lease, now: float, taken: Taken, wanted: int, rate: float) -> None:
        """The store's bucket is empty after giving `taken` (fewer than `wanted`). Others only
        take from it: no token comes before the next is due, no whole lease `wanted - 1`
        tokens' time after that. Asked again within `lease_life` all the same, should the
        rate have changed."""
        # Tokens given (or more than one wanted) mean a rate above 0; after a part of a
        # lease, the next token is at most 1 / rate away.
        wait = taken.wait if not taken.granted else 1 / rate
        rest = (wanted - 1) / rate if wanted > 1 else 0.0
        lease.due = now + wait
        lease.recheck = now + min(wait + rest, self._lease_life)

    def _local(self, lease: _Lease) -> float | None:
        """What the lease answers without the store: 0 (a token of it spent); the seconds
        until the store's next token, or past it until the store is asked again (it was found
        empty lately); or None: ask the store."""
        now = self._clock()
        if lease.tokens > 0 and now < lease.expires:
            lease.tokens -= 1
            return 0.0
        if now < lease.recheck:
            return lease.due - now if now < lease.due else lease.recheck - now
        return None
