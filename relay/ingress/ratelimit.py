"""Token buckets: an integration's rate limit, held across every ingress through the store
(`IntegrationLimit`), and a client address's budget, in one process's memory (`RateLimiter`).

The store holds the shared count, not the broker: every ingress already writes each accepted
message to the store (no new dependency, the same on a plain broker, SQLite and PostgreSQL),
and `relay.rates` takes tokens in leases, so the count costs one store write per lease, not
one per request.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from relay.errors import RateLimited
from relay.lru import Lru
from relay.rates import SharedRates

# Buckets one limiter keeps, least recently used first out: a flood of new keys (client
# addresses, say) costs a bounded memory; a bucket pushed out starts full again.
MAX_KEYS = 65_536


@dataclass
class _Bucket:
    tokens: float
    stamp: float


class RateLimiter:
    """Allows `rate` requests per second with bursts of `burst`; rate 0 disables it.

    In this process's memory: the budget of failed authentications per client address
    (`relay.ingress.clients`), which guards the ingress a client is connected to and is
    checked before anything is looked up, so a flood of bad tokens never reaches the store.
    With K ingress replicas a client may fail up to K times as often.
    """

    def __init__(
        self,
        rate: float,
        burst: int,
        clock: Callable[[], float] = time.monotonic,
        max_keys: int = MAX_KEYS,
    ) -> None:
        self._rate = rate
        self._burst = float(burst)
        self._clock = clock
        self._buckets: Lru[str, _Bucket] = Lru(max_keys)

    def check(self, key: str) -> float:
        """Take one token for `key`: 0 if allowed, else the seconds until one is free."""
        if self._rate <= 0:
            return 0.0
        bucket = self._refilled(key)
        if bucket.tokens >= 1:
            bucket.tokens -= 1
            return 0.0
        return self._short(bucket)

    def wait(self, key: str) -> float:
        """Seconds until `key` has a token (0: it has one now), taking none."""
        if self._rate <= 0:
            return 0.0
        bucket = self._refilled(key)
        return 0.0 if bucket.tokens >= 1 else self._short(bucket)

    def _short(self, bucket: _Bucket) -> float:
        """Seconds until `bucket`, short of a whole token, has one."""
        return (1 - bucket.tokens) / self._rate

    def _refilled(self, key: str) -> _Bucket:
        now = self._clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = _Bucket(self._burst, now)
            self._buckets.put(key, bucket)
        bucket.tokens = min(self._burst, bucket.tokens + (now - bucket.stamp) * self._rate)
        bucket.stamp = now
        return bucket


class IntegrationLimit:
    """An integration's requests: `rate` per second with bursts of `burst`, counted across
    every ingress on the store (rate 0: no limit). Each key (the integration's messages, its
    bot's pushes, its reads) is a bucket of its own.

    The count is in the store: when the store cannot be reached, a request that needs a new
    lease fails (`StoreUnavailable`: 503, `Retry-After: 1`), as the store write it was about
    to make would have.
    """

    def __init__(self, rates: SharedRates, rate: float, burst: int) -> None:
        self._rates = rates
        self._rate = rate
        self._burst = burst

    async def enforce(self, key: str) -> None:
        """Take one token for `key`, or raise a 429 saying when to retry."""
        if self._rate <= 0:
            return
        # Named apart from the other users of the store's buckets (the delivery pace).
        wait = await self._rates.take(f"ingress:{key}", self._rate, self._burst)
        if wait:
            raise RateLimited(
                "over the integration's rate limit", headers={"Retry-After": retry_after(wait)}
            )


def retry_after(seconds: float) -> str:
    """A `Retry-After` value: whole seconds, at least 1."""
    return str(max(1, math.ceil(seconds)))
