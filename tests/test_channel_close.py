"""A stop that cancels whoever is closing a channel must not break the connection.

aiormq answers a cancel that arrives while it waits for Channel.CloseOk by sending
Channel.Close again; the broker, having freed the channel at the first, closes the whole
connection (504 "expected 'channel.open'", an error-level line of aiormq's). The ingress hit
it when SIGTERM came while its broker connection was being declared: the connect task,
cancelled at stop, was closing the probe channel of `declared_as_meant`
(`relay.broker.dead_queues.probe`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import aio_pika
import pytest
from aio_pika.abc import AbstractConnection

from relay.broker.dead_queues import probe
from tests.helpers import eventually


class _SpyQueue:
    """The connection's write queue, telling when a frame goes in (the Channel.Close)."""

    def __init__(self, queue: asyncio.Queue[Any], written: asyncio.Event) -> None:
        self._queue = queue
        self._written = written

    async def put(self, item: Any) -> None:
        await self._queue.put(item)
        self._written.set()

    def put_nowait(self, item: Any) -> None:
        self._queue.put_nowait(item)
        self._written.set()


@pytest.fixture
async def connection(amqp_url: str) -> AsyncIterator[AbstractConnection]:
    opened = await aio_pika.connect(amqp_url)
    yield opened
    await opened.close()


async def test_a_stop_while_the_probe_channel_closes_leaves_the_connection_open(
    connection: AbstractConnection, caplog: pytest.LogCaptureFixture
):
    channel = await connection.channel()
    closing_sent = asyncio.Event()
    probed: list[Any] = []

    async def probe_then_close() -> None:
        async with probe(channel) as probing:
            probed.append(probing)
            # What the probe's channel sends from here on is its Channel.Close.
            probing.write_queue = _SpyQueue(probing.write_queue, closing_sent)

    closer = asyncio.create_task(probe_then_close())
    await asyncio.wait_for(closing_sent.wait(), 10)
    # The very next turn of the loop: the frame is not even written yet, so the broker's
    # Channel.CloseOk cannot have been read; the cancel lands while the close waits for it.
    closer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await closer  # a stop still stops
    await eventually(lambda: _closed(probed[0]), timeout=10)
    # A round trip after it: a second Channel.Close would have made the broker close the
    # connection before answering this.
    async with connection.channel() as other:
        await other.declare_exchange("amq.fanout", passive=True)
    assert not connection.is_closed
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [], [r.getMessage() for r in errors]


async def _closed(probing: Any) -> bool:
    return bool(probing.is_closed)
