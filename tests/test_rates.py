"""Token buckets shared through the store (`relay.store.sql.rate_buckets`, `relay.rates`),
on both stores: a bucket starts full, refills at its rate up to its burst, and two
processes taking at once never spend more than it holds."""

from __future__ import annotations

import asyncio
import itertools

from relay.rates import SharedRates
from relay.store import SqlStore, Taken
from tests.helpers import keyed

T0 = 1_800_000_000.0


async def test_a_bucket_starts_full_and_refills_at_its_rate_up_to_its_burst(store: SqlStore):
    assert await store.take_tokens("b1", 2.0, 5, 3, T0) == Taken(3, 0.0)
    assert await store.take_tokens("b1", 2.0, 5, 3, T0) == Taken(2, 0.0)
    empty = await store.take_tokens("b1", 2.0, 5, 3, T0)
    assert empty.granted == 0
    assert empty.wait == 0.5  # one token at 2 per second
    # A quarter of a second later: half a token, still none to give.
    assert (await store.take_tokens("b1", 2.0, 5, 1, T0 + 0.25)).wait == 0.25
    assert await store.take_tokens("b1", 2.0, 5, 10, T0 + 1.25) == Taken(2, 0.0)
    # Idle for long: full again, never more than the burst.
    assert await store.take_tokens("b1", 2.0, 5, 10, T0 + 100) == Taken(5, 0.0)
    # A clock behind the last taker's refills nothing (and takes nothing back).
    behind = await store.take_tokens("b1", 2.0, 5, 1, T0 + 50)
    assert behind.granted == 0
    assert await store.take_tokens("b2", 2.0, 5, 1, T0) == Taken(1, 0.0)  # its own bucket


async def test_two_processes_taking_at_once_never_spend_more_than_the_bucket(
    store: SqlStore, database_url: str
):
    async with keyed(database_url) as other:

        async def take(taker: SqlStore) -> int:
            return (await taker.take_tokens("shared", 1.0, 20, 3, T0)).granted

        takers = itertools.islice(itertools.cycle([store, other]), 24)
        granted = await asyncio.gather(*(take(taker) for taker in takers))
    assert sum(granted) == 20


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


async def test_leases_spend_locally_and_lapse(store: SqlStore, database_url: str):
    clock = Clock()
    rates = SharedRates(store, lease_seconds=0.5, lease_life=1.0, clock=clock)
    # 10 per second: a lease of 5 tokens, one store call, then four taken locally.
    assert [await rates.take("lease", 10.0, 10) for _ in range(10)] == [0.0] * 10
    async with store.driver.connection() as conn:
        row = await conn.fetchone("SELECT tokens FROM rate_buckets WHERE key = ?", "lease")
    assert row is not None
    assert row["tokens"] == 0  # two leases of 5: the burst is spent
    wait = await rates.take("lease", 10.0, 10)
    assert 0 < wait <= 0.1
    # Another process shares the bucket: what one takes, the other cannot.
    async with keyed(database_url) as other_store:
        other = SharedRates(other_store, lease_seconds=0.5, clock=clock)
        clock.now += 0.5  # five tokens back
        assert await rates.take("lease", 10.0, 10) == 0.0  # a lease of 5
        assert await other.take("lease", 10.0, 10) > 0
    # An unspent lease lapses rather than being spent in a burst later.
    clock.now += 1.0
    async with store.driver.connection() as conn:
        await conn.execute("UPDATE rate_buckets SET tokens = 0, stamp = ?", clock.now)
    assert await rates.take("lease", 10.0, 10) > 0
