"""The raw ceiling of the broker for Relay's shape of traffic: aio-pika alone, no HTTP, no
store, two hops like ingress -> bot worker -> delivery worker.

N messages of a given body are published persistently with publisher confirms to the same
kind of queues Relay declares (durable quorum queues, single active consumer, the same
arguments: `relay.broker.topology.declare` under a throwaway prefix), spread over the
partitions by the same hash of the conversation, from `concurrency` publishers on one
confirming channel (as the ingress has one publish in flight per request).

A `hop` process consumes every inbound partition (the bot worker's prefetch), publishes each
message to its outbound partition with a confirm and then acks it (the least a worker that
keeps at-least-once can do); a `sink` process consumes the outbound partitions and acks.
The figure is N / (the sink's last ack - the first publish). With `hops=1` the sink reads
the inbound partitions directly (the one-hop figure of earlier reports).

The CPU each process and the broker spent over the run is measured too, so the broker's
cost per message in the raw chain can be set against its cost under Relay.

    python -m bench.raw hop|sink --amqp URL --prefix P --partitions 16 --messages N --prefetch 64
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import time
import uuid
from dataclasses import dataclass, field

import aio_pika
from aio_pika.abc import AbstractExchange, AbstractIncomingMessage, AbstractQueueIterator

from bench.common import process_cpu_seconds, remove_topology, stop_process
from relay.broker import StageName
from relay.broker.topology import Topology, declare, partition_of


@dataclass
class RawResult:
    """The broker's own figures for the chain."""

    hops: int
    messages: int
    body_bytes: int
    concurrency: int
    prefetch: int
    seconds: float
    per_second: float
    publish_per_second: float
    # CPU milliseconds per message: publisher, hop, sink, rabbitmq.
    cpu_ms_per_message: dict[str, float] = field(default_factory=dict)


async def raw_ceiling(
    amqp_url: str,
    partitions: int,
    messages: int,
    conversations: int,
    body: bytes,
    concurrency: int,
    prefetch: int,
    hops: int = 2,
    broker_pids: list[int] | None = None,
) -> RawResult:
    """Publish `messages` copies of `body` through `hops` hops; the rate at the sink."""
    topology = Topology(prefix="bench-raw-" + uuid.uuid4().hex[:8], partitions=partitions)
    try:
        connection = await aio_pika.connect(amqp_url)
        async with connection:
            channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
            exchange = (await declare(channel, topology))[topology.exchange("inbound")]
            sink_stage: StageName = "outbound" if hops == 2 else "inbound"
            processes = {
                "sink": await _start("sink", amqp_url, topology, messages, prefetch, sink_stage)
            }
            if hops == 2:
                processes["hop"] = await _start(
                    "hop", amqp_url, topology, messages, prefetch, "inbound"
                )
            try:
                groups = {name: [process.pid] for name, process in processes.items()}
                cpu = _Cpu({**groups, "publisher": [os.getpid()], "rabbitmq": broker_pids or []})
                started = time.monotonic()
                await _publish_all(exchange, partitions, messages, conversations, body, concurrency)
                published = time.monotonic()
                async with asyncio.timeout(max(60.0, messages / 100)):
                    report = await _report(processes["sink"])
                used = cpu.used()
            finally:
                for process in processes.values():
                    await stop_process(process, 10)
    finally:
        await remove_topology(topology, amqp_url)
    seconds = report["last"] - started
    return RawResult(
        hops,
        messages,
        len(body),
        concurrency,
        prefetch,
        round(seconds, 2),
        round(messages / seconds, 1),
        round(messages / (published - started), 1),
        {name: round(s * 1000 / messages, 3) for name, s in used.items()},
    )


class _Cpu:
    """CPU seconds each group of processes used since the meter was made."""

    def __init__(self, groups: dict[str, list[int]]) -> None:
        self._groups = groups
        self._before = self._read()

    def _read(self) -> dict[str, float]:
        totals: dict[str, float] = {}
        for name, pids in self._groups.items():
            totals[name] = 0.0
            for pid in pids:
                with contextlib.suppress(OSError):
                    totals[name] += process_cpu_seconds(pid)
        return totals

    def used(self) -> dict[str, float]:
        after = self._read()
        return {name: after[name] - self._before[name] for name in after}


async def _start(
    role: str,
    amqp_url: str,
    topology: Topology,
    messages: int,
    prefetch: int,
    stage: StageName,
) -> asyncio.subprocess.Process:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.raw",
        role,
        f"--amqp={amqp_url}",
        f"--prefix={topology.prefix}",
        f"--partitions={topology.partitions}",
        f"--messages={messages}",
        f"--prefetch={prefetch}",
        f"--stage={stage}",
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
        raise RuntimeError(f"the raw {role} did not start (said {line!r})")
    return process


async def _report(process: asyncio.subprocess.Process) -> dict[str, float]:
    assert process.stdout is not None
    line = await process.stdout.readline()
    if not line:
        raise RuntimeError("the raw sink exited without a report")
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


async def _iterators(
    channel: aio_pika.abc.AbstractChannel, topology: Topology, stage: StageName
) -> list[AbstractQueueIterator]:
    iterators = []
    for partition in range(topology.partitions):
        queue = await channel.get_queue(topology.queue(stage, partition))
        iterator = queue.iterator()
        await iterator.consume()  # registered with the broker before we say "ready"
        iterators.append(iterator)
    return iterators


async def hop(amqp_url: str, topology: Topology, prefetch: int, stage: StageName) -> None:
    """Forward every message of `stage` to the same outbound partition: publish with a
    confirm, then ack. Each message's forward runs as a task started in delivery order, so
    the publishes of a partition leave in order and their confirms are awaited together."""
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        consuming = await connection.channel()
        await consuming.set_qos(prefetch_count=prefetch)
        publishing = await connection.channel(publisher_confirms=True)
        outbound = await publishing.get_exchange(topology.exchange("outbound"))
        tasks: set[asyncio.Task[None]] = set()

        async def forward(message: AbstractIncomingMessage) -> None:
            copy = aio_pika.Message(
                message.body,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                content_type="application/json",
                message_id=message.message_id,
            )
            await outbound.publish(copy, routing_key=message.routing_key or "0")
            await message.ack()

        async def drain(incoming: AbstractQueueIterator) -> None:
            async with incoming:
                async for message in incoming:
                    task = asyncio.create_task(forward(message))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)

        iterators = await _iterators(consuming, topology, stage)
        print("ready", flush=True)
        await asyncio.gather(*[drain(iterator) for iterator in iterators])


async def sink(
    amqp_url: str, topology: Topology, messages: int, prefetch: int, stage: StageName
) -> None:
    """Consume and ack `messages` from `stage`; print when the first and last arrived."""
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=prefetch)
        done = asyncio.Event()
        seen = {"count": 0, "first": 0.0, "last": 0.0}

        async def drain(incoming: AbstractQueueIterator) -> None:
            async with incoming:
                async for message in incoming:
                    await message.ack()
                    seen["count"] += 1
                    seen["last"] = time.monotonic()
                    seen["first"] = seen["first"] or seen["last"]
                    if seen["count"] >= messages:
                        done.set()

        iterators = await _iterators(channel, topology, stage)
        tasks = [asyncio.create_task(drain(iterator)) for iterator in iterators]
        print("ready", flush=True)
        await done.wait()
        print(json.dumps(seen), flush=True)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="the raw chain's hop and sink")
    parser.add_argument("role", choices=["hop", "sink"])
    parser.add_argument("--amqp", required=True)
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--partitions", type=int, required=True)
    parser.add_argument("--messages", type=int, required=True)
    parser.add_argument("--prefetch", type=int, required=True)
    parser.add_argument("--stage", default="inbound", choices=["inbound", "outbound"])
    options = parser.parse_args()
    chosen = Topology(prefix=options.prefix, partitions=options.partitions)
    if options.role == "hop":
        asyncio.run(hop(options.amqp, chosen, options.prefetch, options.stage))
    else:
        asyncio.run(sink(options.amqp, chosen, options.messages, options.prefetch, options.stage))
