"""Dead letters on the real broker, whatever its version (CI runs this on RabbitMQ 3.10 and 4):
the keeper takes them off the queue into the store; a message returned past its delivery
limit is kept with the broker's reason and counted; a dead-letter queue never drops a letter
however often it is returned; an old dead-letter queue is replaced with its letters."""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
import uuid
from collections.abc import AsyncIterator

import aio_pika
import pytest
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection

from relay.broker import Broker, Topology, declare
from relay.broker.topology import declared_otherwise, delete
from relay.broker.version import version_of
from relay.metrics import Metrics
from relay.pipeline.dlq_keeper import Keeper
from relay.pipeline.renewal import renew_worn
from relay.settings import Settings
from relay.store import DeadLetterFilter, SqlStore
from relay.wire import REASON_HEADER
from tests.helpers import declared, eventually


@pytest.fixture
async def topology(amqp: AbstractRobustConnection, settings: Settings) -> AsyncIterator[Topology]:
    """Queues of the test's own, with a delivery limit of 2 on the partition queues."""
    own = Topology(f"{settings.queue_prefix}-{uuid.uuid4().hex[:6]}", 2, delivery_limit=2)
    async with declared(amqp, own):
        yield own


@pytest.fixture
async def kept(topology: Topology, store: SqlStore, settings: Settings) -> AsyncIterator[Metrics]:
    """Keepers of both stages of `topology` running; their metrics."""
    broker = Broker(settings.amqp_url, topology, settings.publish_timeout)
    broker.start()
    metrics = Metrics()
    keepers = [Keeper(store, broker, stage, metrics) for stage in ("inbound", "outbound")]
    for keeper in keepers:
        keeper.start()
    try:
        yield metrics
    finally:
        for keeper in keepers:
            await keeper.stop()
        await broker.close()


async def depth(amqp: AbstractRobustConnection, queue: str) -> int:
    async with amqp.channel() as channel:
        declared = await channel.declare_queue(queue, passive=True)
        return declared.declaration_result.message_count or 0


async def holds(amqp: AbstractRobustConnection, queue: str, count: int) -> bool:
    """Whether `queue` holds `count` ready messages, once what a closed channel gave back is
    there again (the broker requeues it after the close is answered, not before)."""

    async def counted() -> bool:
        return await depth(amqp, queue) == count

    await eventually(counted, timeout=5)
    return True


async def take_and_give_back(amqp: AbstractRobustConnection, queue: str) -> bool:
    """Consume the queue's message and give it back by closing the channel, as a stopping
    worker does; False if none came within 2 seconds. (Consumed, not got: the partition
    queues have a single active consumer, which refuses basic.get.)"""
    channel = await amqp.channel()
    try:
        came: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        async def hold(_: AbstractIncomingMessage) -> None:
            if not came.done():
                came.set_result(None)

        await (await channel.get_queue(queue)).consume(hold)
        try:
            await asyncio.wait_for(came, 2.0)
        except TimeoutError:
            return False
        return True
    finally:
        await channel.close()  # gives back what it held


async def return_until_gone(amqp: AbstractRobustConnection, queue: str, most: int) -> int:
    """Give the queue's message back until it is gone or `most` times; how many times."""
    for returned in range(most):
        if not await take_and_give_back(amqp, queue):
            return returned
    return most


async def test_the_keeper_keeps_a_stage_s_letter_and_empties_the_queue(
    amqp: AbstractRobustConnection, topology: Topology, store: SqlStore, kept: Metrics
) -> None:
    letter_id = f"kept-{uuid.uuid4().hex[:8]}"
    async with amqp.channel() as channel:
        exchange = await channel.get_exchange(topology.dead_exchange())
        headers = {REASON_HEADER: "the bot failed"}
        body = b'{"integrationId": "int-k", "bundle": {"conversation": {"id": "conv-k"}}}'
        await exchange.publish(
            aio_pika.Message(body, message_id=letter_id, headers=headers), routing_key="inbound"
        )
    selection = DeadLetterFilter("inbound", ids=frozenset({letter_id}))
    [letter] = await eventually(lambda: store.dead_letters(selection, None, 10))
    assert (letter.integration_id, letter.conversation_id) == ("int-k", "conv-k")
    assert letter.reason == "the bot failed"
    await eventually(lambda: _zero(amqp, topology.dead_queue("inbound")))
    cause = {"stage": "inbound", "cause": "relay"}
    assert kept.registry.get_sample_value("relay_dead_letters_kept_total", cause) == 1


async def _zero(amqp: AbstractRobustConnection, queue: str) -> bool:
    return await depth(amqp, queue) == 0


async def test_a_message_returned_past_its_limit_is_kept_with_the_broker_s_reason(
    amqp: AbstractRobustConnection, topology: Topology, store: SqlStore, kept: Metrics
) -> None:
    # Measured on both versions: a message given back by a closed channel counts towards
    # the limit (of 2 here), so the third return dead-letters it; nothing drops it.
    message_id = f"worn-{uuid.uuid4().hex[:8]}"
    partition = topology.queue("outbound", 0)
    async with amqp.channel() as channel:
        await channel.default_exchange.publish(
            aio_pika.Message(b'{"integrationId": "int-w"}', message_id=message_id),
            routing_key=partition,
        )
    assert await return_until_gone(amqp, partition, 10) == 3
    selection = DeadLetterFilter("outbound", ids=frozenset({message_id}))
    [letter] = await eventually(lambda: store.dead_letters(selection, None, 10))
    assert letter.reason.startswith("delivery_limit"), letter.reason
    assert partition in letter.reason
    cause = {"stage": "outbound", "cause": "broker"}
    assert kept.registry.get_sample_value("relay_dead_letters_kept_total", cause) == 1


async def test_a_dead_letter_queue_never_drops_a_letter_given_back_often(
    amqp: AbstractRobustConnection, topology: Topology
) -> None:
    # No keeper here: a letter taken and given back 30 times (RabbitMQ 4's default limit is
    # 20) is still there, because the queue says it has no limit in its version's words.
    dead = topology.dead_queue("outbound")
    async with amqp.channel() as channel:
        exchange = await channel.get_exchange(topology.dead_exchange())
        await exchange.publish(aio_pika.Message(b"{}", message_id="often"), routing_key="outbound")
    assert await return_until_gone(amqp, dead, 30) == 30
    assert await holds(amqp, dead, 1)


async def test_an_old_dead_letter_queue_is_taken_as_it_is_and_reported(
    amqp: AbstractRobustConnection, settings: Settings
) -> None:
    # As an earlier Relay declared it: no delivery limit said (on RabbitMQ 4 that is one of
    # 20) and no leader locator.
    old = Topology(f"{settings.queue_prefix}-old-{uuid.uuid4().hex[:6]}", 2)
    name = old.dead_queue("inbound")
    async with amqp.channel() as channel:
        exchange = await channel.declare_exchange(
            old.dead_exchange(), aio_pika.ExchangeType.DIRECT, durable=True
        )
        queue = await channel.declare_queue(
            name, durable=True, arguments={"x-queue-type": "quorum"}
        )
        await queue.bind(exchange, routing_key="inbound")
        await exchange.publish(aio_pika.Message(b"{}", message_id="old"), routing_key="inbound")
    try:
        otherwise: list[str] = []
        async with amqp.channel() as channel:
            await declare(channel, old, otherwise)
            assert otherwise == [name]
            assert await declared_otherwise(channel, old) == [name]
        assert await depth(amqp, name) == 1  # nothing taken, nothing lost
        # And it still gets what dies.
        async with amqp.channel() as channel:
            exchange = await channel.get_exchange(old.dead_exchange())
            await exchange.publish(aio_pika.Message(b"{}", message_id="new"), routing_key="inbound")
        assert await depth(amqp, name) == 2
    finally:
        async with amqp.channel() as channel:
            await delete(channel, old)


@pytest.mark.skipif(shutil.which("rabbitmqctl") is None, reason="needs the broker's rabbitmqctl")
async def test_the_readme_s_policy_lifts_an_old_queue_s_limit_on_rabbitmq_4(
    amqp: AbstractRobustConnection, settings: Settings
) -> None:
    async with amqp.channel() as channel:
        if (await version_of(channel)).major < 4:
            pytest.skip("RabbitMQ 3.x gives a queue that names no limit none: nothing to lift")
    prefix = f"{settings.queue_prefix}-policy-{uuid.uuid4().hex[:6]}"
    name = f"{prefix}.outbound.dead"  # as an older Relay declared it: no limit said
    async with amqp.channel() as channel:
        await channel.declare_queue(name, durable=True, arguments={"x-queue-type": "quorum"})
        await channel.default_exchange.publish(aio_pika.Message(b"{}"), routing_key=name)
    pattern = f"^{re.escape(prefix)}\\.(inbound|outbound)\\.dead$"
    policy = f"relay-dead-{uuid.uuid4().hex[:6]}"
    await asyncio.to_thread(
        rabbitmqctl,
        "set_policy",
        policy,
        pattern,
        '{"delivery-limit": -1}',
        "--apply-to",
        "quorum_queues",
    )
    try:
        # Past RabbitMQ 4's default of 20, still there.
        assert await return_until_gone(amqp, name, 25) == 25
        assert await depth(amqp, name) == 1
    finally:
        await asyncio.to_thread(rabbitmqctl, "clear_policy", policy)
        async with amqp.channel() as channel:
            await channel.queue_delete(name)


def rabbitmqctl(*args: str) -> str:
    done = subprocess.run(
        ["rabbitmqctl", "-q", *args], check=True, capture_output=True, text=True, timeout=60
    )
    return done.stdout


async def test_queues_declared_now_are_as_meant(
    amqp: AbstractRobustConnection, topology: Topology
) -> None:
    async with amqp.channel() as channel:
        assert await declared_otherwise(channel, topology) == []
        version = await version_of(channel)
    assert version.product == "RabbitMQ"
    assert version.major >= 3


async def test_a_message_given_back_on_purpose_is_renewed_not_worn_out(
    amqp: AbstractRobustConnection, topology: Topology, settings: Settings
) -> None:
    # What a stopping or handing-over worker does with what it holds unstarted: give it
    # back, renewing it once it has used half its deliveries (1 of 2 here). Twelve such
    # returns, six times the limit, and the message is still in its queue, not dead (without
    # the renewal the third return dead-letters it: the test above).
    worn_out = topology
    partition = worn_out.queue("inbound", 1)
    async with amqp.channel() as channel:
        await channel.default_exchange.publish(
            aio_pika.Message(b"{}", message_id="renewed", headers={REASON_HEADER: "kept"}),
            routing_key=partition,
        )
    broker = Broker(settings.amqp_url, worn_out, settings.publish_timeout)
    broker.start()
    try:
        await asyncio.wait_for(broker.wait_connected(), 15)
        renewals = 0
        for _ in range(12):
            channel = await amqp.channel()
            came: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
            await (await channel.get_queue(partition)).consume(came.put)
            message = await asyncio.wait_for(came.get(), 5)
            assert message.message_id == "renewed"
            assert (message.headers or {}).get(REASON_HEADER) == "kept"
            left = await renew_worn(broker, worn_out, "inbound", 1, [message])
            renewals += not left
            await channel.close()  # gives back what was not renewed
        assert renewals >= 6
        assert await holds(amqp, partition, 1)
        assert await depth(amqp, worn_out.dead_queue("inbound")) == 0
    finally:
        await broker.close()
