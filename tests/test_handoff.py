"""Partition hand-off: the fair-share rule, presence, and workers that join and leave."""

from __future__ import annotations

import asyncio
import contextlib

from relay.broker import Broker, partition_of, topology_of
from relay.broker.presence import Presence
from relay.pipeline.partitions import fair_share, surplus
from relay.settings import Settings
from relay.store import SqlStore
from tests.helpers import (
    Ingress,
    Queues,
    by_conversation,
    eventually,
    make_integration,
    message,
    start_bot_worker,
    take_until,
)


def test_fair_share_rounds_up():
    assert fair_share(8, 3) == 3
    assert fair_share(8, 4) == 2
    assert fair_share(4, 8) == 1
    assert fair_share(8, 0) == 8


def test_surplus_hands_over_beyond_the_fair_share_but_keeps_parked_partitions():
    assert surplus(8, 1, set(range(8)), set()) == []
    assert len(surplus(8, 2, set(range(8)), set())) == 4
    assert surplus(8, 3, {0, 1, 2}, set()) == []
    released = surplus(8, 4, {0, 1, 2, 3, 4}, {4, 3})
    assert len(released) == 3
    assert not set(released) & {3, 4}
    # Parked partitions are never handed over, even if that leaves more than the share.
    assert surplus(8, 4, {0, 1, 2}, {0, 1, 2}) == []


def test_presence_counts_peers_heard_lately_and_forgets_those_that_left():
    now = [100.0]
    presence = Presence(None, "inbound", 1.0, clock=lambda: now[0])  # type: ignore[arg-type]
    assert presence.peers() == 1  # itself
    presence.heard("a", leaving=False)
    presence.heard("b", leaving=False)
    assert presence.peers() == 3
    presence.heard("a", leaving=True)
    assert presence.peers() == 2
    now[0] += 5.5  # b is silent for longer than the horizon (three intervals, at least 5 s)
    assert presence.peers() == 1


async def test_workers_hear_each_other_over_the_broker(settings: Settings):
    brokers = [
        Broker(settings.amqp_url, topology_of(settings), settings.publish_timeout) for _ in range(3)
    ]
    presences = []
    try:
        for broker in brokers:
            broker.start()
            await asyncio.wait_for(broker.wait_connected(), 15)
            presence = Presence(broker, "outbound", 0.2)
            await presence.start()
            presences.append(presence)

        async def all_three() -> bool:
            return all(p.peers() == 3 for p in presences)

        await eventually(all_three, timeout=10)
        await presences.pop().stop()

        async def two_left() -> bool:
            return all(p.peers() == 2 for p in presences)

        await eventually(two_left, timeout=10)
    finally:
        for presence in presences:
            await presence.stop()
        for broker in brokers:
            await broker.close()


async def test_a_joining_worker_gets_partitions_handed_over_and_order_holds(
    ingress: Ingress, store: SqlStore, settings: Settings, queues: Queues
):
    integration_id, token = await make_integration(store, settings)
    partitions = settings.partitions
    covered: set[int] = set()

    async def post(c: int, n: int) -> None:
        status, sent = await ingress.post(
            integration_id, token, message(f"{c}-{n}", conversationId=f"h{c}", text=f"{c}:{n}")
        )
        assert status == 200
        covered.add(partition_of(sent["conversation"]["id"], partitions))

    async with contextlib.AsyncExitStack() as stack:
        first = await stack.enter_async_context(start_bot_worker(settings))
        # Conversation ids are random: sixteen, and more until every partition has one.
        conversations = 0
        while conversations < 16 or len(covered) < partitions:
            await post(conversations, 0)
            conversations += 1
        for n in (1, 2):
            await asyncio.gather(*[post(c, n) for c in range(conversations)])

        async def first_holds_all() -> bool:
            return first.active_partitions == set(range(partitions))

        await eventually(first_holds_all, timeout=20)
        second = await stack.enter_async_context(start_bot_worker(settings))
        n = 3

        async def shared() -> bool:
            nonlocal n
            await asyncio.gather(*[post(c, n) for c in range(conversations)])
            n += 1
            held = (first.active_partitions, second.active_partitions)
            return all(len(h) == fair_share(partitions, 2) for h in held)

        await eventually(shared, timeout=30, interval=0.1)
        assert not first.active_partitions & second.active_partitions
        responses = await take_until(queues, "outbound", conversations * n * 2, timeout=30)
    assert all(r["acceptedAt"] for r in responses)  # for the end-to-end latency
    grouped = by_conversation(responses)
    for c in range(conversations):
        texts = [
            r["body"]["payload"]["text"] for r in grouped[f"h{c}"] if r["body"]["type"] == "text"
        ]
        assert texts == [f"echo: {c}:{i}" for i in range(n)]
