"""Where messages go while RELAY_PARTITIONS changes: two ingresses with different counts
side by side (as in a rolling restart), the real broker and both stores, one step at a
time. A conversation's messages stay in the queue of the count its unfinished messages went
to, and move to a publisher's count once it is drained (`relay/store/sql/generations.py`);
a bot worker with another count publishes a turn's replies behind the conversation's
undelivered ones. (`tests/test_repartition.py` does it end to end, mid-stream.)"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from aio_pika.abc import AbstractRobustConnection

from relay.broker import Topology, topology_of
from relay.settings import Settings
from relay.store import SqlStore
from tests.helpers import (
    Ingress,
    Queues,
    attempt_record,
    make_integration,
    message,
    start_bot_worker,
    start_ingress,
    take_until,
)


@pytest.fixture(scope="module")
async def eight(settings: Settings) -> AsyncIterator[Ingress]:
    async with start_ingress(settings.model_copy(update={"partitions": 8})) as running:
        yield running


@pytest.fixture(scope="module")
async def sixteen(settings: Settings) -> AsyncIterator[Ingress]:
    async with start_ingress(settings.model_copy(update={"partitions": 16})) as running:
        yield running


def queues_of(amqp: AbstractRobustConnection, settings: Settings, count: int) -> Queues:
    topology: Topology = topology_of(settings).with_partitions(count)
    return Queues(amqp, topology)


async def test_a_conversation_moves_to_a_new_count_only_once_drained(
    eight: Ingress,
    sixteen: Ingress,
    store: SqlStore,
    settings: Settings,
    amqp: AbstractRobustConnection,
):
    integration_id, token = await make_integration(store, settings)
    under_8, under_16 = queues_of(amqp, settings, 8), queues_of(amqp, settings, 16)
    status, first = await eight.post(integration_id, token, message(1, conversationId="moving"))
    assert status == 200
    # The first message is not handled yet: the second goes behind it, whoever takes it.
    status, _ = await sixteen.post(integration_id, token, message(2, conversationId="moving"))
    assert status == 200
    assert [m["text"] for m in await under_8.take("inbound")] == ["hello 1", "hello 2"]
    assert await under_16.take("inbound") == []
    # Both handled, their (no) replies on the broker: drained, the conversation moves.
    conversation = await store.get_conversation(first["conversation"]["id"])
    assert conversation is not None
    for n in (1, 2):
        found = await store.find_incoming(integration_id, f"msg-{n}")
        assert found is not None
        await store.record_replies(conversation, found.bundle.message.id, [], 8)
    status, _ = await sixteen.post(integration_id, token, message(3, conversationId="moving"))
    assert status == 200
    assert [m["text"] for m in await under_16.take("inbound")] == ["hello 3"]
    # And back, the same way: the ingress with 8 puts the next one behind the third.
    status, _ = await eight.post(integration_id, token, message(4, conversationId="moving"))
    assert status == 200
    assert [m["text"] for m in await under_16.take("inbound")] == ["hello 4"]
    assert await under_8.take("inbound") == []


async def test_a_bot_worker_with_another_count_publishes_behind_undelivered_replies(
    eight: Ingress,
    store: SqlStore,
    settings: Settings,
    amqp: AbstractRobustConnection,
):
    integration_id, token = await make_integration(store, settings)
    under_8, under_16 = queues_of(amqp, settings, 8), queues_of(amqp, settings, 16)
    bot = settings.model_copy(update={"bot": "echo", "partitions": 8})
    await eight.post(integration_id, token, message(1, conversationId="replies"))
    async with start_bot_worker(bot):
        first = await take_until(under_8, "outbound", 2)  # typing, then the echo
    # A bot worker with 16 partitions (consuming the queues of 8 too, as every worker
    # consumes every count in use) takes the next message while those two are not
    # delivered: its replies go behind them, to the same queue.
    await eight.post(integration_id, token, message(2, conversationId="replies"))
    async with start_bot_worker(bot.model_copy(update={"partitions": 16}), consuming=8):
        second = await take_until(under_8, "outbound", 2)
    assert [r["body"]["sequence"] for r in first + second] == [1, 2, 3, 4]
    assert await under_16.take("outbound") == []
    # All four delivered: the next turn's replies move to 16.
    await store.record_attempts(
        [
            attempt_record(r["body"]["botpressMessageId"], integration_id=integration_id)
            for r in first + second
        ]
    )
    await eight.post(integration_id, token, message(3, conversationId="replies"))
    async with start_bot_worker(bot.model_copy(update={"partitions": 16}), consuming=8):
        third = await take_until(under_16, "outbound", 2)
    assert [r["body"]["sequence"] for r in third] == [5, 6]
