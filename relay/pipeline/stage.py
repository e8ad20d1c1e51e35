"""The stage worker, put together from parts: what both workers run.

`StageWorker` consumes a stage's partitions in order, one lane per conversation, and turns
each message's verdict into broker actions in one place. It knows no stage: it is given a
handler (`relay.pipeline.handler.StageHandler`) that reads the stage's envelopes and decides
what becomes of each message. Its parts, each read on its own: a `PartitionSet`
(`partitions`: subscribing, sharing the partitions with the peers, handing them over), the
`Lanes`, a `Handling` (`handling`: one message from its lane to its settling), with an
`Adoption` (`adoption`: the parking another worker left) and a `Settler` (`settle`: a
verdict into broker actions). Here they are wired, with the start, the stop, and the
dispatch of each delivery into its conversation's lane.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Generic, TypeVar

import structlog
from aio_pika.abc import AbstractIncomingMessage
from pydantic import BaseModel

from relay.broker import Broker, StageName
from relay.broker.presence import Presence
from relay.broker.topology import Topology
from relay.metrics import Metrics
from relay.pipeline.adoption import Adoption
from relay.pipeline.handler import StageHandler, parse
from relay.pipeline.handling import Handling
from relay.pipeline.lanes import Lanes
from relay.pipeline.parking import Parking
from relay.pipeline.partitions import START_ERRORS, Holdings, Intake, PartitionSet
from relay.pipeline.settle import Settler
from relay.pipeline.subscription import Delivery, Subscription
from relay.pipeline.waiting import WaitingRoom
from relay.pipeline.watch import PartitionWatch
from relay.retry import pauses
from relay.settings import Settings

log = structlog.get_logger(__name__)

E = TypeVar("E", bound=BaseModel)  # the stage's envelope model


class StageWorker(Generic[E]):
    """Consumes the partitions of one stage it is the active consumer of (those of
    `topology`, by default the broker's), hands over those beyond its fair share, and
    gives each message to the stage's `handler`, `concurrency` conversations at a time."""

    def __init__(
        self,
        handler: StageHandler[E],
        broker: Broker,
        metrics: Metrics,
        concurrency: int,
        settings: Settings,
        topology: Topology | None = None,
    ) -> None:
        self.handler = handler
        self.topology = topology or broker.topology  # the generation of queues consumed
        self._broker = broker
        self._metrics = metrics
        self.parking = Parking()
        self._waiting_room: WaitingRoom[Delivery[E]] = WaitingRoom(self._resume, concurrency)
        handling = Handling(
            handler,
            metrics,
            self.parking,
            self._waiting_room,
            Adoption(handler, self.parking, self.topology.stage_delays(self.stage)),
            Settler(broker, self.topology, self.stage, metrics, self.parking, self._waiting_room),
            broker.tracing,
        )
        self._lanes: Lanes[Delivery[E]] = Lanes(handling.process, concurrency)
        presence = Presence(broker, self.stage, settings.presence_interval, self.topology)
        self._worker_id = presence.worker_id
        # Per partition channel, the prefetch is twice the lanes' concurrency: as many
        # messages again wait in memory for their turn (so a full waiting room never keeps
        # the heads they wait for from being delivered).
        self._partitions = self._partition_set(settings, 2 * concurrency, presence)

    def _partition_set(self, settings: Settings, prefetch: int, presence: Presence) -> PartitionSet:
        own_count = self.topology.partitions == self._broker.topology.partitions
        watch = PartitionWatch(
            self.stage,
            self.topology,
            own_count,
            self._metrics,
            presence,
            self._lanes,
            settings.stall_seconds,
        )
        intake = Intake(self._on_delivery, self._take, self._withdraw_of)
        holdings = Holdings(self.parking, self._waiting_room, self.topology.partitions)
        return PartitionSet(
            self._broker,
            self.topology,
            self.stage,
            settings,
            prefetch,
            presence,
            holdings,
            watch,
            intake,
        )

    @property
    def stage(self) -> StageName:
        """The stage whose partitions this worker consumes (its handler's)."""
        return self.handler.stage

    @property
    def metrics(self) -> Metrics:
        """The worker's metrics (what it consumed, by outcome)."""
        return self._metrics

    @property
    def active_partitions(self) -> set[int]:
        """Partitions this worker has taken messages from since it subscribed."""
        return self._partitions.active

    @property
    def releasing(self) -> set[int]:
        """Partitions being handed over: their messages in hand are being finished."""
        return self._partitions.releasing

    @property
    def subscribed(self) -> set[int]:
        """Partitions with an open subscription that takes messages (active or waiting)."""
        return self._partitions.subscribed

    def stalled(self) -> dict[int, float]:
        """Partitions whose oldest unstarted message waited past the stall limit: seconds."""
        return self._partitions.stalled()

    def watch(self) -> None:
        """Export the partitions' ages and report stalls now (also done every interval)."""
        self._partitions.watch()

    async def start(self, wait: float = 60.0) -> None:
        """Join the stage's workers and subscribe to every partition (waits for the broker).

        The broker makes one subscriber per partition the active one. A broker lost while
        starting is waited for (up to `wait` seconds), not fatal.
        """
        await self._broker.wait_connected()
        deadline = asyncio.get_running_loop().time() + wait
        for delay in pauses(0.5, 5.0):
            try:
                await self._partitions.start()
                break
            except START_ERRORS as error:
                if asyncio.get_running_loop().time() + delay > deadline:
                    raise
                log.warning("worker_start_failed", error=str(error), retry_in=delay)
                await asyncio.sleep(delay)
        log.info(
            "worker_started",
            stage=self.stage,
            partitions=self.topology.partitions,
            worker=self._worker_id,
        )

    async def stop(self, grace: float) -> None:
        """Stop taking messages, finish those being handled (bounded), return the rest."""
        self._waiting_room.close()
        await self._partitions.leave()
        self._withdraw(lambda _: True)
        finished = await self._lanes.drain(grace)
        await self._partitions.close()
        log.info("worker_stopped", stage=self.stage, finished=finished)

    async def _on_delivery(
        self, subscription: Subscription, message: AbstractIncomingMessage
    ) -> None:
        # Each delivery runs as a task started in delivery order; nothing here awaits before
        # `submit`, which fixes the order.
        if subscription.closing:
            return  # unacked: the closing channel returns it to the queue
        if not self._partitions.is_current(subscription):
            # Impossible by construction; should it happen, the messages go back and the
            # consumer ends rather than keep the partition with nobody handling it.
            log.error("delivery_to_unknown_subscription", partition=subscription.partition)
            self._partitions.drop(subscription)
            return
        subscription.arrived(message)
        if subscription.holding or self._partitions.stopping:
            subscription.held.append(message)  # unacked: a close returns it to the head
            return
        self._take(subscription, message)

    def _take(self, subscription: Subscription, message: AbstractIncomingMessage) -> None:
        subscription.take()
        envelope = parse(self.handler, message)
        key = self.handler.keys(envelope)[0] if envelope is not None else message.message_id
        self._lanes.submit(str(key), Delivery(message, envelope, subscription))

    def _withdraw_of(self, subscription: Subscription) -> None:
        self._withdraw(lambda delivery: delivery.subscription is subscription)

    def _withdraw(self, predicate: Callable[[Delivery[E]], bool]) -> None:
        """Take back deliveries not yet started: they wait with the held ones (returned on
        close), so only the messages being handled right now have to finish."""
        for delivery in self._lanes.withdraw(predicate):
            delivery.subscription.done()
            delivery.subscription.held.append(delivery.message)

    def _resume(self, conversation: str, delivery: Delivery[E]) -> None:
        """A message back from the waiting room: into its lane again (or with the held ones,
        during a hand-off; nowhere if its channel is gone: the broker has it back)."""
        subscription = delivery.subscription
        if subscription.closing:
            return
        if subscription.holding or self._partitions.stopping:
            subscription.held.append(delivery.message)
            return
        subscription.take()
        self._lanes.submit(conversation, delivery)
