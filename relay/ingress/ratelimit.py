"""A token bucket per integration, in the memory of one ingress process."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from relay.errors import RateLimited


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
        self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._rate = rate
        self._burst = float(burst)
        self._clock = clock
        self._buckets: dict[str, _Bucket] = {}

    def check(self, key: str) -> float:
        """Take one token for `key`: 0 if allowed, else the seconds until one is free."""
        if self._rate <= 0:
            return 0.0
        now = self._clock()
        bucket = self._buckets.setdefault(key, _Bucket(self._burst, now))
        bucket.tokens = min(self._burst, bucket.tokens + (now - bucket.stamp) * self._rate)
        bucket.stamp = now
        if bucket.tokens >= 1:
            bucket.tokens -= 1
            return 0.0
        return (1 - bucket.tokens) / self._rate

    def enforce(self, key: str) -> None:
        """Take one token for `key`, or raise a 429 saying when to retry."""
        wait = self.check(key)
        if wait:
            raise RateLimited(
                "over the integration's rate limit", headers={"Retry-After": retry_after(wait)}
            )


def retry_after(seconds: float) -> str:
    """A `Retry-After` value: whole seconds, at least 1."""
    return str(max(1, math.ceil(seconds)))
