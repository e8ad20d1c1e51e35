"""Token buckets shared by every process on one store (`relay.rates` takes from them in
leases): a rate limit that holds across ingresses, a pace that holds across delivery
workers. A bucket is one row; taking from it reads, refills and writes it with the row
locked, so two processes never spend the same token."""

from __future__ import annotations

import math

from relay.store.driver import Driver
from relay.store.records import Taken


class RateBucketsSql:
    """`take_tokens` of `RateBuckets` over a `Driver`."""

    _driver: Driver

    async def take_tokens(
        self, key: str, rate: float, burst: float, wanted: int, now: float
    ) -> Taken:
        lock = " FOR UPDATE" if self._driver.dialect == "postgresql" else ""
        async with self._driver.transaction() as conn:
            # A bucket starts full, as a limiter in memory does.
            await conn.execute(
                "INSERT INTO rate_buckets (key, tokens, stamp) VALUES (?, ?, ?)"
                " ON CONFLICT (key) DO NOTHING",
                key,
                burst,
                now,
            )
            row = await conn.fetchone(
                f"SELECT tokens, stamp FROM rate_buckets WHERE key = ?{lock}", key
            )
            assert row is not None  # inserted above, in this transaction
            # A clock behind the last writer's refills nothing, rather than taking back.
            stamp = max(now, float(row["stamp"]))
            tokens = min(burst, float(row["tokens"]) + (stamp - float(row["stamp"])) * rate)
            granted = max(0, min(wanted, math.floor(tokens)))
            await conn.execute(
                "UPDATE rate_buckets SET tokens = ?, stamp = ? WHERE key = ?",
                tokens - granted,
                stamp,
                key,
            )
        wait = 0.0 if granted else (1 - (tokens - granted)) / rate if rate > 0 else math.inf
        return Taken(granted, wait)
