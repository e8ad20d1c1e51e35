"""Coalesced acks (`relay.pipeline.acks`) on a real broker: what is settled together goes
out as one `multiple` ack where every earlier delivery is settled, and only that."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aio_pika
import pytest
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue

from relay.pipeline.acks import Acks
from tests.helpers import eventually

COUNT = 12


@pytest.fixture
async def queue(amqp_url: str) -> AsyncIterator[tuple[aio_pika.abc.AbstractConnection, str]]:
    connection = await aio_pika.connect(amqp_url)
    name = f"test-acks-{uuid.uuid4().hex[:8]}"
    channel = await connection.channel()
    declared = await channel.declare_queue(name, durable=True, arguments={"x-queue-type": "quorum"})
    for n in range(COUNT):
        await channel.default_exchange.publish(aio_pika.Message(str(n).encode()), name)
    yield connection, name
    await declared.delete(if_unused=False, if_empty=False)
    await connection.close()


async def take_all(channel: AbstractChannel, name: str) -> list[AbstractIncomingMessage]:
    await channel.set_qos(prefetch_count=COUNT)
    queue: AbstractQueue = await channel.get_queue(name)
    taken: list[AbstractIncomingMessage] = []

    async def take(message: AbstractIncomingMessage) -> None:
        taken.append(message)

    async def all_taken() -> bool:
        return len(taken) >= COUNT

    await queue.consume(take)
    await eventually(all_taken, timeout=10)
    return taken


async def counting_acks(channel: AbstractChannel) -> list[bool]:
    """The `multiple` flag of each basic.ack the channel sends (the real one is sent)."""
    raw: Any = await channel.get_underlay_channel()
    sent: list[bool] = []
    real = raw.basic_ack

    async def basic_ack(delivery_tag: int, multiple: bool = False, **kwargs: Any) -> None:
        sent.append(multiple)
        await real(delivery_tag=delivery_tag, multiple=multiple, **kwargs)

    raw.basic_ack = basic_ack
    return sent


async def redelivered_after_close(connection: Any, name: str) -> list[bytes]:
    channel = await connection.channel()
    taken = []
    queue = await channel.get_queue(name)
    while (message := await queue.get(fail=False, timeout=5)) is not None:
        taken.append(message.body)
        await message.ack()
    await channel.close()
    return taken


async def tracked(
    connection: Any, name: str
) -> tuple[AbstractChannel, list[AbstractIncomingMessage], Acks]:
    """Every message of the queue taken on a channel of its own, each met by its `Acks`."""
    channel = await connection.channel()
    taken = await take_all(channel, name)
    acks = Acks()
    for message in taken:
        acks.delivered(message)
    return channel, taken, acks


async def test_a_settled_head_goes_as_one_multiple_ack(queue: tuple[Any, str]):
    connection, name = queue
    channel, taken, acks = await tracked(connection, name)
    sent = await counting_acks(channel)
    # Settled in one turn of the loop, in any order: one ack for all.
    await asyncio.gather(*(acks.ack(message) for message in reversed(taken)))
    assert sent == [True]
    await channel.close()
    assert await redelivered_after_close(connection, name) == []


async def test_a_delivery_in_hand_keeps_the_acks_behind_it_single(queue: tuple[Any, str]):
    connection, name = queue
    channel, taken, acks = await tracked(connection, name)
    sent = await counting_acks(channel)
    in_hand = taken[4]
    rest = [message for message in taken if message is not in_hand]
    await asyncio.gather(*(acks.ack(message) for message in rest))
    # The four before it in one multiple ack; the seven after it one each: a multiple ack
    # past it would settle the one still in hand.
    assert sent == [True] + [False] * 7
    await channel.close()
    assert await redelivered_after_close(connection, name) == [b"4"]


async def test_a_nacked_delivery_no_longer_holds_the_head(queue: tuple[Any, str]):
    connection, name = queue
    channel, taken, acks = await tracked(connection, name)
    sent = await counting_acks(channel)
    await acks.nack(taken[0])
    await asyncio.gather(*(acks.ack(message) for message in taken[1:]))
    assert sent == [True]
    await channel.close()
    assert await redelivered_after_close(connection, name) == [b"0"]


async def test_an_ack_on_a_closed_channel_raises_to_its_caller(queue: tuple[Any, str]):
    connection, name = queue
    channel, taken, acks = await tracked(connection, name)
    await channel.close()
    results = await asyncio.gather(
        *(acks.ack(message) for message in taken), return_exceptions=True
    )
    assert all(isinstance(result, Exception) for result in results)
    assert len(await redelivered_after_close(connection, name)) == COUNT


async def test_acks_go_out_in_the_order_they_were_decided(queue: tuple[Any, str]):
    # aiormq writes acks without the channel's lock through a queue of ten frames: while it
    # is full, a later ack can be written first. Here the first ack's write is held back (as
    # a full queue does): the second, a `multiple` ack past it, must still go after it, or
    # it settles the first's deliveries and the broker closes the channel on the first.
    connection, name = queue
    channel, taken, acks = await tracked(connection, name)
    raw: Any = await channel.get_underlay_channel()
    real = raw.basic_ack
    written: list[tuple[int, bool]] = []

    async def held_back_once(delivery_tag: int, multiple: bool = False, **kwargs: Any) -> None:
        if not written and delivery_tag == 2:
            await asyncio.sleep(0.2)  # the full queue
        written.append((delivery_tag, multiple))
        await real(delivery_tag=delivery_tag, multiple=multiple, **kwargs)

    raw.basic_ack = held_back_once
    first = asyncio.gather(acks.ack(taken[0]), acks.ack(taken[1]))
    await asyncio.sleep(0)  # the first flush goes out in this turn of the loop
    second = asyncio.gather(*(acks.ack(message) for message in taken[2:]))
    await asyncio.gather(first, second)
    assert written == [(2, True), (COUNT, True)]
    assert not channel.is_closed
    await channel.close()
    assert await redelivered_after_close(connection, name) == []
