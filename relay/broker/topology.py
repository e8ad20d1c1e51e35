"""Names and declaration of every exchange and queue; nothing here publishes or consumes.

Each stage (inbound, outbound) is a direct exchange routing to N partition queues; the
partition is picked on the client side by a stable hash of the conversation, because a
plain broker has no consistent-hash exchange. Dead letters of a stage go through the
`{prefix}.dead` exchange to `{prefix}.{stage}.dead`.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any, Literal

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractExchange

StageName = Literal["inbound", "outbound"]
STAGES: tuple[StageName, ...] = ("inbound", "outbound")


def partition_of(conversation_id: str, partitions: int) -> int:
    """The partition of a conversation: stable across processes, versions and restarts."""
    return zlib.crc32(conversation_id.encode()) % partitions


@dataclass(frozen=True)
class Topology:
    """The relay's queue names under one prefix (a deployment, or one test module)."""

    prefix: str
    partitions: int
    delivery_limit: int = 20

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

    def queue_names(self) -> list[str]:
        """Every queue of the relay, in a stable order."""
        names = []
        for stage in STAGES:
            names += [self.queue(stage, p) for p in range(self.partitions)]
            names.append(self.dead_queue(stage))
        return names

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


async def declare(
    channel: AbstractChannel, topology: Topology
) -> dict[StageName, AbstractExchange]:
    """Declare every exchange, queue and binding (idempotent); the stage exchanges."""
    dead = await channel.declare_exchange(
        topology.dead_exchange(), aio_pika.ExchangeType.DIRECT, durable=True
    )
    exchanges: dict[StageName, AbstractExchange] = {}
    for stage in STAGES:
        exchange = await channel.declare_exchange(
            topology.exchange(stage), aio_pika.ExchangeType.DIRECT, durable=True
        )
        exchanges[stage] = exchange
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


async def delete(channel: AbstractChannel, topology: Topology) -> None:
    """Remove every queue and exchange of the topology (tests and `relay` teardown)."""
    for name in topology.queue_names():
        await channel.queue_delete(name)
    for stage in STAGES:
        await channel.exchange_delete(topology.exchange(stage))
    await channel.exchange_delete(topology.dead_exchange())
