"""Token buckets per key, in the memory of one ingress process."""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from relay.errors import RateLimited

# Buckets one limiter keeps, least recently used first out: a flood of new keys (client
# addresses, say) costs a bounded memory; a bucket pushed out starts full again.
MAX_KEYS = 65_536


@dataclass
class _Bucket:
    tokens: float
    stamp: float


class RateLimiter:
    """Allows `rate` requests per second with bursts of `burst`; rate 0 disables it.

    The limit holds per ingress process: with K ingress replicas an integration may send
    up to K times the rate (documented in the README).
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
        self._max_keys = max_keys
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    def check(self, key: str) -> float:
        """Take one token for `key`: 0 if allowed, else the seconds until one is free."""
        wait = self.wait(key)
        if wait == 0 and self._rate > 0:
            self._buckets[key].tokens -= 1
        return wait

    def wait(self, key: str) -> float:
        """Seconds until `key` has a token (0: it has one now), taking none."""
        if self._rate <= 0:
            return 0.0
        bucket = self._refilled(key)
        return 0.0 if bucket.tokens >= 1 else (1 - bucket.tokens) / self._rate

    def enforce(self, key: str) -> None:
        """Take one token for `key`, or raise a 429 saying when to retry."""
        wait = self.check(key)
        if wait:
            raise RateLimited(
                "over the integration's rate limit", headers={"Retry-After": retry_after(wait)}
            )

    def _refilled(self, key: str) -> _Bucket:
        now = self._clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = _Bucket(self._burst, now)
            if len(self._buckets) > self._max_keys:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
        bucket.tokens = min(self._burst, bucket.tokens + (now - bucket.stamp) * self._rate)
        bucket.stamp = now
        return bucket


def retry_after(seconds: float) -> str:
    """A `Retry-After` value: whole seconds, at least 1."""
    return str(max(1, math.ceil(seconds)))
