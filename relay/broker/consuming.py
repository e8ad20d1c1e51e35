"""Consuming a queue that is not a partition (a dead-letter queue, the operations events'
queue): its messages on a channel of their own, for as long as the caller reads them."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from aio_pika.abc import AbstractQueueIterator

from relay.broker.channels import close_channel
from relay.broker.client import Broker


@contextlib.asynccontextmanager
async def consuming(
    broker: Broker, queue: str, prefetch: int
) -> AsyncIterator[AbstractQueueIterator]:
    """The messages of `queue` (declared already), `prefetch` in hand at a time, on a
    channel of their own, closed at the end (what is in hand then goes back to the queue);
    once `broker` is connected. ConnectionError if the connection is down: the caller tries
    again (`relay.aio.keep_trying`)."""
    await broker.wait_connected()
    connection = broker.connection
    if connection is None or connection.is_closed:
        raise ConnectionError("not connected to the broker")
    channel = await connection.channel()
    try:
        await channel.set_qos(prefetch_count=prefetch)
        declared = await channel.declare_queue(queue, passive=True)
        async with declared.iterator() as messages:
            yield messages
    finally:
        if not channel.is_closed:
            await close_channel(channel)  # a stop's second cancel must not break the connection
