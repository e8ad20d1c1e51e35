"""The raw ceiling of the broker for Relay's traffic: aio-pika alone, no HTTP, no store.

N messages of a given body are published persistently with publisher confirms to the same
kind of queues Relay declares (durable quorum queues, single active consumer, the same
arguments: `relay.broker.topology.declare` under a throwaway prefix), spread over the
partitions by the same hash of the conversation, from `concurrency` publishers on one
confirming channel (as the ingress has one publish in flight per request). Another process
consumes every partition on one channel with the bot worker's prefetch and acks each
message. The figure is N / (last ack - first publish).

The consumer is a separate process, like Relay's workers are: in one event loop with the
publishers, both would share one core and the ceiling would be Python's, not the broker's.

    python -m bench.raw consume --amqp URL --prefix P --partitions 8 --messages N --prefetch 64
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import uuid
from dataclasses import dataclass

import aio_pika
from aio_pika.abc import AbstractExchange, AbstractQueueIterator

from bench.common import remove_topology, stop_process
from relay.broker.topology import Topology, declare, partition_of


@dataclass
class RawResult:
    """The broker's own figures for one hop."""

    messages: int
    body_bytes: int
    concurrency: int
    prefetch: int
    seconds: float
    per_second: float
    publish_per_second: float


async def raw_ceiling(
    amqp_url: str,
    partitions: int,
    messages: int,
    conversations: int,
    body: bytes,
    concurrency: int,
    prefetch: int,
) -> RawResult:
    """Publish, consume and ack `messages` copies of `body`; the round-trip rate."""
    topology = Topology(prefix="bench-raw-" + uuid.uuid4().hex[:8], partitions=partitions)
    try:
        connection = await aio_pika.connect(amqp_url)
        async with connection:
            channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
            exchange = (await declare(channel, topology))[topology.exchange("inbound")]
            consumer = await _start_consumer(amqp_url, topology, messages, prefetch)
            try:
                started = time.monotonic()
                await _publish_all(exchange, partitions, messages, conversations, body, concurrency)
                published = time.monotonic()
                async with asyncio.timeout(max(60.0, messages / 100)):
                    report = await _report(consumer)
            finally:
                await stop_process(consumer, 10)
    finally:
        await remove_topology(topology, amqp_url)
    seconds = report["last"] - started
    return RawResult(
        messages,
        len(body),
        concurrency,
        prefetch,
        round(seconds, 2),
        round(messages / seconds, 1),
        round(messages / (published - started), 1),
    )


async def _start_consumer(
    amqp_url: str, topology: Topology, messages: int, prefetch: int
) -> asyncio.subprocess.Process:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.raw",
        "consume",
        f"--amqp={amqp_url}",
        f"--prefix={topology.prefix}",
        f"--partitions={topology.partitions}",
        f"--messages={messages}",
        f"--prefetch={prefetch}",
        stdout=asyncio.subprocess.PIPE,
        start_new_session=True,
    )
    assert process.stdout is not None
    try:
        line = await asyncio.wait_for(process.stdout.readline(), 30)
    except TimeoutError:
        line = b""
    if line.strip() != b"ready":
        await stop_process(process, 5)
        raise RuntimeError(f"the raw consumer did not start (said {line!r})")
    return process


async def _report(process: asyncio.subprocess.Process) -> dict[str, float]:
    assert process.stdout is not None
    line = await process.stdout.readline()
    if not line:
        raise RuntimeError("the raw consumer exited without a report")
    report: dict[str, float] = json.loads(line)
    return report


async def _publish_all(
    exchange: AbstractExchange,
    partitions: int,
    messages: int,
    conversations: int,
    body: bytes,
    concurrency: int,
) -> None:
    numbers = iter(range(messages))
    # Relay partitions by its own conversation ids (random UUIDs): so do we.
    keys = [partition_of(str(uuid.uuid4()), partitions) for _ in range(conversations)]

    async def publisher() -> None:
        for n in numbers:
            partition = keys[n % conversations]
            message = aio_pika.Message(
                body,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                content_type="application/json",
                message_id=f"raw-{n}",
            )
            await exchange.publish(message, routing_key=str(partition), mandatory=True)

    await asyncio.gather(*[publisher() for _ in range(concurrency)])


async def consume(
    amqp_url: str, prefix: str, partitions: int, messages: int, prefetch: int
) -> None:
    """Consume and ack `messages` from the inbound partitions; print when each began and ended."""
    topology = Topology(prefix=prefix, partitions=partitions)
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=prefetch)
        done = asyncio.Event()
        seen = {"count": 0, "first": 0.0, "last": 0.0}

        async def drain(incoming: AbstractQueueIterator) -> None:
            # Like the workers: one in-order iterator per partition, one ack per message.
            async with incoming:
                async for message in incoming:
                    await message.ack()
                    seen["count"] += 1
                    seen["last"] = time.monotonic()
                    seen["first"] = seen["first"] or seen["last"]
                    if seen["count"] >= messages:
                        done.set()

        iterators = []
        for partition in range(partitions):
            queue = await channel.get_queue(topology.queue("inbound", partition))
            iterator = queue.iterator()
            await iterator.consume()  # registered with the broker before we say "ready"
            iterators.append(iterator)
        tasks = [asyncio.create_task(drain(iterator)) for iterator in iterators]
        print("ready", flush=True)
        await done.wait()
        print(json.dumps(seen), flush=True)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="the raw ceiling's consumer")
    parser.add_argument("role", choices=["consume"])
    parser.add_argument("--amqp", required=True)
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--partitions", type=int, required=True)
    parser.add_argument("--messages", type=int, required=True)
    parser.add_argument("--prefetch", type=int, required=True)
    options = parser.parse_args()
    asyncio.run(
        consume(
            options.amqp, options.prefix, options.partitions, options.messages, options.prefetch
        )
    )
