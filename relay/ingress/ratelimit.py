"""Token buckets per key, in the memory of one ingress process."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from relay.errors import RateLimited
from relay.lru import Lru

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
    up to K times the rate (documented in docs/operating/security.md, Fair limits).
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
            bucket = _Bucket(self._burst, now)
            self._buckets.put(key, bucket)
        bucket.tokens = min(self._burst, bucket.tokens + (now - bucket.stamp) * self._rate)
        bucket.stamp = now
        return bucket


def retry_after(seconds: float) -> str:
    """A `Retry-After` value: whole seconds, at least 1."""
    return str(max(1, math.ceil(seconds)))
