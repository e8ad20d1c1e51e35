"""Names and declaration of every exchange and queue; nothing here publishes or consumes.

Each stage (inbound, outbound) is a direct exchange routing to N partition queues; the
partition is picked on the client side by a stable hash of the conversation, because a
plain broker has no consistent-hash exchange. Dead letters of a stage go through the
`{prefix}.dead` exchange to `{prefix}.{stage}.dead`.

Retries wait in the broker, never in a sleeping consumer: each delay of a stage is a fanout
exchange and a queue with one fixed TTL (expiry happens at the head, so one TTL per queue)
that dead-letters back into the stage exchange. The message keeps its routing key, the
partition number, so it returns to its own partition.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any, Literal

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractExchange

from relay.settings import Settings

StageName = Literal["inbound", "outbound"]
STAGES: tuple[StageName, ...] = ("inbound", "outbound")
QueueKind = Literal["partition", "delay", "dead"]


def partition_of(conversation_id: str, partitions: int) -> int:
    """The partition of a conversation: stable across processes, versions and restarts."""
    return zlib.crc32(conversation_id.encode()) % partitions


@dataclass(frozen=True)
class Topology:
    """The relay's queue names under one prefix (a deployment, or one test module)."""

    prefix: str
    partitions: int
    delivery_limit: int = 20
    # Seconds each stage's delay queues hold a message, e.g. {"inbound": (1.0, 5.0)}.
    delays: tuple[tuple[StageName, tuple[float, ...]], ...] = ()

    def stage_delays(self, stage: StageName) -> tuple[float, ...]:
        """The delays declared for a stage, shortest first."""
        found = next((seconds for name, seconds in self.delays if name == stage), ())
        return tuple(sorted(set(found)))

    def delay_exchange(self, stage: StageName, seconds: float) -> str:
        """The exchange (and queue) that holds a stage's messages for `seconds`."""
        return f"{self.prefix}.{stage}.delay.{round(seconds * 1000)}ms"

    def exchange(self, stage: StageName) -> str:
        """The direct exchange a stage publishes to."""
        return f"{self.prefix}.{stage}"

    def queue(self, stage: StageName, partition: int) -> str:
        """One partition queue of a stage."""
        return f"{self.prefix}.{stage}.{partition}"

    def routing_key(self, partition: int) -> str:
        """The routing key of a partition (the same in every stage)."""
        return str(partition)

    def dead_exchange(self) -> str:
        """Where the partition queues dead-letter to."""
        return f"{self.prefix}.dead"

    def dead_queue(self, stage: StageName) -> str:
        """The dead-letter queue of a stage."""
        return f"{self.prefix}.{stage}.dead"

    def presence_exchange(self, stage: StageName) -> str:
        """The fanout exchange a stage's workers announce themselves on (hand-off)."""
        return f"{self.prefix}.{stage}.presence"

    def queues(self) -> list[tuple[str, StageName, QueueKind]]:
        """(name, stage, kind) of every queue of the relay, in a stable order."""
        found: list[tuple[str, StageName, QueueKind]] = []
        for stage in STAGES:
            found += [(self.queue(stage, p), stage, "partition") for p in range(self.partitions)]
            found += [
                (self.delay_exchange(stage, d), stage, "delay") for d in self.stage_delays(stage)
            ]
            found.append((self.dead_queue(stage), stage, "dead"))
        return found

    def queue_names(self) -> list[str]:
        """Every queue of the relay, in a stable order."""
        return [name for name, _, _ in self.queues()]

    def partition_arguments(self, stage: StageName) -> dict[str, Any]:
        """Arguments of a partition queue; changing them later needs a migration of queues."""
        return {
            "x-queue-type": "quorum",
            # One consumer per partition at a time keeps a conversation's order across workers.
            "x-single-active-consumer": True,
            "x-delivery-limit": self.delivery_limit,
            "x-dead-letter-exchange": self.dead_exchange(),
            "x-dead-letter-routing-key": stage,
            # at-least-once dead-lettering needs reject-publish overflow (RabbitMQ 3.10+).
            "x-dead-letter-strategy": "at-least-once",
            "x-overflow": "reject-publish",
        }


def topology_of(settings: Settings) -> Topology:
    """The queue topology the settings describe (every service declares the same)."""
    return Topology(
        prefix=settings.queue_prefix,
        partitions=settings.partitions,
        delays=(
            ("inbound", tuple(settings.bot_retry_delays)),
            ("outbound", tuple(settings.delivery_delay_queues)),
        ),
    )


async def declare(channel: AbstractChannel, topology: Topology) -> dict[str, AbstractExchange]:
    """Declare every exchange, queue and binding (idempotent); the exchanges by name."""
    dead = await channel.declare_exchange(
        topology.dead_exchange(), aio_pika.ExchangeType.DIRECT, durable=True
    )
    exchanges: dict[str, AbstractExchange] = {topology.dead_exchange(): dead}
    for stage in STAGES:
        exchange = await channel.declare_exchange(
            topology.exchange(stage), aio_pika.ExchangeType.DIRECT, durable=True
        )
        exchanges[topology.exchange(stage)] = exchange
        presence = topology.presence_exchange(stage)
        exchanges[presence] = await channel.declare_exchange(
            presence, aio_pika.ExchangeType.FANOUT, durable=True
        )
        for seconds in topology.stage_delays(stage):
            name = topology.delay_exchange(stage, seconds)
            exchanges[name] = await _declare_delay(channel, topology, stage, seconds)
        for partition in range(topology.partitions):
            queue = await channel.declare_queue(
                topology.queue(stage, partition),
                durable=True,
                arguments=topology.partition_arguments(stage),
            )
            await queue.bind(exchange, routing_key=topology.routing_key(partition))
        dead_queue = await channel.declare_queue(
            topology.dead_queue(stage), durable=True, arguments={"x-queue-type": "quorum"}
        )
        await dead_queue.bind(dead, routing_key=stage)
    return exchanges


async def _declare_delay(
    channel: AbstractChannel, topology: Topology, stage: StageName, seconds: float
) -> AbstractExchange:
    name = topology.delay_exchange(stage, seconds)
    exchange = await channel.declare_exchange(name, aio_pika.ExchangeType.FANOUT, durable=True)
    queue = await channel.declare_queue(
        name,
        durable=True,
        arguments={
            "x-queue-type": "quorum",
            "x-message-ttl": round(seconds * 1000),
            "x-dead-letter-exchange": topology.exchange(stage),
            "x-dead-letter-strategy": "at-least-once",
            "x-overflow": "reject-publish",
        },
    )
    await queue.bind(exchange)
    return exchange


async def delete(channel: AbstractChannel, topology: Topology) -> None:
    """Remove every queue and exchange of the topology (tests and `relay` teardown)."""
    for name in topology.queue_names():
        await channel.queue_delete(name)
    for stage in STAGES:
        await channel.exchange_delete(topology.exchange(stage))
        await channel.exchange_delete(topology.presence_exchange(stage))
        for seconds in topology.stage_delays(stage):
            await channel.exchange_delete(topology.delay_exchange(stage, seconds))
    await channel.exchange_delete(topology.dead_exchange())
