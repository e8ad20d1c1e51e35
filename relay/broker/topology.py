"""Names and declaration of every exchange and queue; nothing here publishes or consumes.

Each stage (inbound, outbound) is a direct exchange routing to N partition queues; the
partition is picked on the client side by a stable hash of the conversation, because a
plain broker has no consistent-hash exchange. Dead letters of a stage go through the
`{prefix}.dead` exchange to `{prefix}.{stage}.dead`.

Each partition count is a generation of partition queues of its own, so that the count can
change on a running system (`relay.pipeline.generations`): the default count's queues are
`{prefix}.{stage}.{p}` (routing key `p`), another count N's are `{prefix}.{stage}.of{N}.{p}`
(routing key `of{N}.{p}`), behind the same exchanges, delay and dead-letter queues.

Retries wait in the broker, never in a sleeping consumer: each delay of a stage is a fanout
exchange and a queue with one fixed TTL (expiry happens at the head, so one TTL per queue)
that dead-letters back into the stage exchange. The message keeps its routing key, the
partition number, so it returns to its own partition.

Operations events (`relay.wire.operations`) have a queue of their own, `{prefix}.operations`
behind the fanout exchange of the same name, with delay queues of the outbound delays
(`{prefix}.operations.delay.{ms}ms`) for their retries: they never pass through a stage's
partitions, so a back end's operations endpoint never holds a conversation's deliveries.
Listed (`Topology.queues`) under the stage `operations`, which is no `StageName`: the queue
of kind `operations`, its delay queues of kind `delay`.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Literal

import aio_pika
import aiormq.exceptions
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractQueue

from relay.broker.dead_queues import (
    dead_arguments,
    declare_dead_queue,
    declared_as_meant,
    probe,
)
from relay.broker.version import BrokerVersion, version_of

if TYPE_CHECKING:  # the settings import the broker's address parsing
    from relay.settings import Settings

# On a cluster, new quorum queues get their leaders spread over the nodes rather than all on
# the node of the service that declared them first ("client-local", the default).
LEADER_LOCATOR = {"x-queue-leader-locator": "balanced"}

# The partition count whose queues keep the names they had before counts could change.
BASE_PARTITIONS = 8

StageName = Literal["inbound", "outbound"]
STAGES: tuple[StageName, ...] = ("inbound", "outbound")
# What a listed queue belongs to: a stage, or the operations events (`stage="operations"`,
# as the dispatcher's metrics name them), which pass through no stage.
QueueStage = Literal["inbound", "outbound", "operations"]
OPERATIONS: QueueStage = "operations"
QueueKind = Literal["partition", "delay", "dead", "operations"]


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

    def with_partitions(self, partitions: int) -> Topology:
        """The same relay with another partition count: another generation of queues."""
        return replace(self, partitions=partitions)

    @property
    def generation(self) -> str:
        """What tells this count's partition queues from another count's ('' for the base)."""
        return "" if self.partitions == BASE_PARTITIONS else f"of{self.partitions}."

    def queue(self, stage: StageName, partition: int) -> str:
        """One partition queue of a stage."""
        return f"{self.prefix}.{stage}.{self.generation}{partition}"

    def routing_key(self, partition: int) -> str:
        """The routing key of a partition (the same in every stage)."""
        return f"{self.generation}{partition}"

    def dead_exchange(self) -> str:
        """Where the partition queues dead-letter to."""
        return f"{self.prefix}.dead"

    def dead_queue(self, stage: StageName) -> str:
        """The dead-letter queue of a stage."""
        return f"{self.prefix}.{stage}.dead"

    def presence_exchange(self, stage: StageName) -> str:
        """The fanout exchange a stage's workers of this partition count announce
        themselves on (hand-off)."""
        return f"{self.prefix}.{stage}.{self.generation}presence"

    @property
    def operations_exchange(self) -> str:
        """The fanout exchange operations events are published to, and their queue's name."""
        return f"{self.prefix}.operations"

    def operations_delay(self, seconds: float) -> str:
        """The exchange (and queue) that holds operations events for `seconds`."""
        return f"{self.prefix}.operations.delay.{round(seconds * 1000)}ms"

    def operations_queues(self) -> list[str]:
        """The operations events' queue and its delay queues."""
        delays = self.stage_delays("outbound")
        return [self.operations_exchange, *(self.operations_delay(d) for d in delays)]

    @property
    def news_exchange(self) -> str:
        """The fanout exchange conversations with news are announced on (`relay.broker.news`)."""
        return f"{self.prefix}.news"

    def queues(self) -> list[tuple[str, QueueStage, QueueKind]]:
        """(name, stage, kind) of every queue of the relay, in a stable order: each stage's,
        then the operations events' queue and its delay queues."""
        found: list[tuple[str, QueueStage, QueueKind]] = []
        for stage in STAGES:
            found += [(self.queue(stage, p), stage, "partition") for p in range(self.partitions)]
            found += [
                (self.delay_exchange(stage, d), stage, "delay") for d in self.stage_delays(stage)
            ]
            found.append((self.dead_queue(stage), stage, "dead"))
        operations, *delays = self.operations_queues()
        found.append((operations, OPERATIONS, "operations"))
        found += [(delay, OPERATIONS, "delay") for delay in delays]
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
            **LEADER_LOCATOR,
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


async def declare(
    channel: AbstractChannel, topology: Topology, otherwise: list[str] | None = None
) -> dict[str, AbstractExchange]:
    """Declare every exchange, queue and binding (idempotent); the exchanges by name. Each
    queue has the delivery limit it means to have on this broker's version: the partition
    queues `topology.delivery_limit`, the delay and dead-letter queues none. A dead-letter
    queue found declared otherwise (by an earlier version) is taken as it is, and its name
    added to `otherwise`."""
    version = await version_of(channel)
    dead = await channel.declare_exchange(
        topology.dead_exchange(), aio_pika.ExchangeType.DIRECT, durable=True
    )
    exchanges: dict[str, AbstractExchange] = {topology.dead_exchange(): dead}
    exchanges[topology.news_exchange] = await channel.declare_exchange(
        topology.news_exchange, aio_pika.ExchangeType.FANOUT, durable=True
    )
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
            exchanges[name] = await _declare_delay(channel, topology, stage, seconds, version)
        for partition in range(topology.partitions):
            queue = await _declare_quorum(
                channel, topology.queue(stage, partition), topology.partition_arguments(stage)
            )
            await queue.bind(exchange, routing_key=topology.routing_key(partition))
        name = topology.dead_queue(stage)
        meant = await declare_dead_queue(channel, name, dead, stage, dead_queue_arguments(version))
        if not meant and otherwise is not None:
            otherwise.append(name)
    exchanges.update(await _declare_operations(channel, topology, version))
    return exchanges


def dead_queue_arguments(version: BrokerVersion) -> dict[str, Any]:
    """A dead-letter queue's arguments on this broker version."""
    return dead_arguments({"x-queue-type": "quorum", **LEADER_LOCATOR}, version)


async def declared_otherwise(channel: AbstractChannel, topology: Topology) -> list[str]:
    """The topology's dead-letter queues (those that exist) declared otherwise than this
    version of Relay declares them on this broker: with a delivery limit that drops."""
    version = await version_of(channel)
    found = []
    for stage in STAGES:
        name = topology.dead_queue(stage)
        if await exists(channel, name) and not await declared_as_meant(
            channel, name, dead_queue_arguments(version)
        ):
            found.append(name)
    return found


async def exists(channel: AbstractChannel, name: str) -> bool:
    """Whether the queue exists, asked on a channel of its own (a passive declaration of a
    missing queue closes its channel)."""
    async with probe(channel) as probing:
        try:
            await probing.queue_declare(name, passive=True)
        except aiormq.exceptions.ChannelNotFoundEntity:
            return False
    return True


async def _declare_operations(
    channel: AbstractChannel, topology: Topology, version: BrokerVersion
) -> dict[str, AbstractExchange]:
    """The operations events' exchange and queue, and their delay queues, by name. Events
    are consumed by competing consumers in no order; one given back more than the delivery
    limit times (a worker crashing on it over and over) is dropped."""
    name = topology.operations_exchange
    exchange = await channel.declare_exchange(name, aio_pika.ExchangeType.FANOUT, durable=True)
    arguments = {"x-delivery-limit": topology.delivery_limit, **LEADER_LOCATOR}
    queue = await _declare_quorum(channel, name, {"x-queue-type": "quorum", **arguments})
    await queue.bind(exchange)
    exchanges = {name: exchange}
    for seconds in topology.stage_delays("outbound"):
        delay = topology.operations_delay(seconds)
        exchanges[delay] = await _declare_delay_queue(channel, delay, seconds, name, version)
    return exchanges


async def _declare_delay(
    channel: AbstractChannel,
    topology: Topology,
    stage: StageName,
    seconds: float,
    version: BrokerVersion,
) -> AbstractExchange:
    name = topology.delay_exchange(stage, seconds)
    return await _declare_delay_queue(channel, name, seconds, topology.exchange(stage), version)


async def _declare_delay_queue(
    channel: AbstractChannel, name: str, seconds: float, back_to: str, version: BrokerVersion
) -> AbstractExchange:
    """A fanout exchange and its queue holding messages `seconds`, then back to `back_to`."""
    exchange = await channel.declare_exchange(name, aio_pika.ExchangeType.FANOUT, durable=True)
    queue = await _declare_quorum(
        channel,
        name,
        {
            "x-queue-type": "quorum",
            "x-message-ttl": round(seconds * 1000),
            "x-dead-letter-exchange": back_to,
            "x-dead-letter-strategy": "at-least-once",
            "x-overflow": "reject-publish",
            **LEADER_LOCATOR,
            # Never consumed (its messages leave by expiry), so never returned; but never
            # dropped either, on any version.
            **version.no_delivery_limit(),
        },
    )
    await queue.bind(exchange)
    return exchange


async def _declare_quorum(
    channel: AbstractChannel, name: str, arguments: dict[str, Any]
) -> AbstractQueue:
    """Declare a queue; one that an earlier version declared without a leader locator (its
    leader stays where it was placed), or a delay queue without a delivery limit (never
    consumed, so never returned), is taken as it is: the broker refuses a declare whose
    arguments differ, and a queue's arguments cannot change."""
    try:
        return await channel.declare_queue(name, durable=True, arguments=arguments)
    except aiormq.exceptions.ChannelPreconditionFailed as error:
        if "x-queue-leader-locator" not in str(error) and "x-delivery-limit" not in str(error):
            raise
    await channel.reopen()  # the refusal closed the channel; the same object serves on
    try:
        others = {k: v for k, v in arguments.items() if k not in LEADER_LOCATOR}
        return await channel.declare_queue(name, durable=True, arguments=others)
    except aiormq.exceptions.ChannelPreconditionFailed:
        await channel.reopen()
    return await channel.declare_queue(name, passive=True)


async def delete(channel: AbstractChannel, topology: Topology) -> None:
    """Remove every queue and exchange of the topology (tests and `relay` teardown)."""
    for name in topology.queue_names():
        await channel.queue_delete(name)
    for stage in STAGES:
        await channel.exchange_delete(topology.exchange(stage))
        await channel.exchange_delete(topology.presence_exchange(stage))
        for seconds in topology.stage_delays(stage):
            await channel.exchange_delete(topology.delay_exchange(stage, seconds))
    for name in topology.operations_queues():  # their queues are among `queue_names`
        await channel.exchange_delete(name)
    await channel.exchange_delete(topology.dead_exchange())
    await channel.exchange_delete(topology.news_exchange)
