"""Spreading a stage's partitions over its workers.

Every worker subscribes to every partition queue; with single active consumer the broker
delivers each partition to one of them, the first to subscribe, so a worker that starts
first takes them all. Each worker therefore counts its live peers (`Presence`) and hands
over the partitions beyond its fair share: it stops taking messages of the partition,
finishes those it holds, closes the partition's channel (the broker returns what was
prefetched to the head of the queue and activates the next subscriber) and subscribes
again, at the back of the line.

`PartitionSet` is that part of a stage worker, with subscribing again to a partition whose
channel was lost, and watching for a partition that stalls (`relay.pipeline.watch`); it
hands each delivery to the `Intake` it is given. `fair_share` and `surplus` are the
arithmetic.
"""

from __future__ import annotations

import asyncio
import math
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog
from aio_pika.abc import AbstractIncomingMessage

from relay.aio import pause
from relay.broker import CONNECTION_ERRORS, Broker, BrokerUnavailable, StageName, partition_of
from relay.broker.presence import Presence
from relay.broker.topology import Topology
from relay.pipeline.background import Background
from relay.pipeline.parking import Parking
from relay.pipeline.renewal import renew_worn
from relay.pipeline.subscriber import SUBSCRIBE_TIMEOUT, OnDelivery, Subscriber
from relay.pipeline.subscription import Subscription
from relay.pipeline.waiting import WaitingRoom
from relay.pipeline.watch import PartitionWatch
from relay.retry import pauses
from relay.settings import Settings

log = structlog.get_logger(__name__)

START_ERRORS: tuple[type[BaseException], ...] = (*CONNECTION_ERRORS, BrokerUnavailable)


@dataclass(frozen=True)
class Intake:
    """What becomes of a partition's messages: the stage worker's side of the set."""

    # A delivery came through a subscription: taken into a lane, or held.
    on_delivery: OnDelivery
    # A held delivery goes to its lane after all (a hand-off called off).
    take: Callable[[Subscription, AbstractIncomingMessage], None]
    # Deliveries of the subscription not started yet go back to its held ones.
    withdraw: Callable[[Subscription], None]


class Holdings:
    """The stage worker's memory of its conversations, by partition (of `partitions`):
    their parking, and the messages waiting in memory. A partition's hand-off, or its loss,
    clears what it held."""

    def __init__(self, parking: Parking, waiting_room: WaitingRoom[Any], partitions: int) -> None:
        self._parking = parking
        self._waiting_room = waiting_room
        self._partitions = partitions

    def forget(self, subscription: Subscription, keep_parking: bool) -> None:
        """Drop what waits in memory of the subscription, and (unless `keep_parking`) the
        parking of its partition's conversations."""
        self._waiting_room.forget(subscription)
        if keep_parking:
            return
        partition, partitions = subscription.partition, self._partitions
        self._parking.forget(
            c for c in self._parking.conversations() if partition_of(c, partitions) == partition
        )

    def parked_partitions(self) -> set[int]:
        """The partitions with a conversation waiting in a delay queue."""
        return {partition_of(c, self._partitions) for c in self._parking.away()}


class PartitionSet:
    """The partitions of one stage (the queues of `topology`) as this worker consumes
    them: subscribed, shared with the peers `presence` hears, handed over."""

    def __init__(
        self,
        broker: Broker,
        topology: Topology,
        stage: StageName,
        settings: Settings,
        prefetch: int,
        presence: Presence,
        holdings: Holdings,
        watch: PartitionWatch,
        intake: Intake,
    ) -> None:
        self._broker = broker
        self._topology = topology
        self._stage = stage
        self._presence = presence
        self._holdings = holdings
        self._watch = watch
        self._intake = intake
        self._interval = settings.presence_interval
        self._grace = settings.shutdown_timeout  # for a hand-off's messages in hand
        self._subscriber = Subscriber(
            broker, topology, stage, prefetch, intake.on_delivery, self._on_channel_closed
        )
        self._subscriptions = self._subscriber.current  # a view: the subscriber makes them
        # One (re)subscription of a partition at a time.
        self._subscribing: defaultdict[int, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._background = Background()
        self.stopping = False

    @property
    def active(self) -> set[int]:
        """Partitions this worker has taken messages from since it subscribed."""
        return {number for number, sub in self._subscriptions.items() if sub.active}

    @property
    def releasing(self) -> set[int]:
        """Partitions being handed over: their messages in hand are being finished."""
        return {n for n, sub in self._subscriptions.items() if sub.holding and sub.is_open}

    @property
    def subscribed(self) -> set[int]:
        """Partitions with an open subscription that takes messages (active or waiting)."""
        return {n for n, sub in self._subscriptions.items() if sub.is_open and not sub.holding}

    def stalled(self) -> dict[int, float]:
        """Partitions whose oldest message held unstarted waited too long (see `watch`)."""
        return self._watch.stalled(self._subscriptions)

    def watch(self) -> None:
        """Export the partitions' ages, say which stall (`relay.pipeline.watch`)."""
        self._watch.check(self._subscriptions, self.stopping)

    def is_current(self, subscription: Subscription) -> bool:
        """Whether `subscription` is its partition's subscription here."""
        return self._subscriber.is_current(subscription)

    def drop(self, subscription: Subscription) -> None:
        """Close a subscription that is not its partition's (in the background)."""
        self._background.spawn(subscription.close(), "close-unknown")

    async def start(self) -> None:
        """Join the stage's workers and subscribe to every partition, each on a channel
        of its own (so one can be handed over without the others); then keep the share
        fair. A broker lost meanwhile undoes what was started, and raises."""
        try:
            if self._broker.connection is None:
                raise BrokerUnavailable("no broker connection")
            async with asyncio.timeout(SUBSCRIBE_TIMEOUT):
                await self._presence.start()
            for partition in range(self._topology.partitions):
                await self._subscriber.subscribe_within(partition, 2 * SUBSCRIBE_TIMEOUT)
        except START_ERRORS:
            await self._undo_start()
            raise
        self._background.spawn(self._balance_forever(), f"balance-{self._stage}")

    async def _undo_start(self) -> None:
        await self._presence.stop()
        await self._subscriber.close_all()

    async def leave(self) -> None:
        """Take no more messages, and tell the peers this worker is leaving."""
        self.stopping = True
        await self._presence.stop()

    async def close(self) -> None:
        """End the background work and give every partition back (after `leave`)."""
        await self._background.cancel()
        for subscription in self._subscriptions.values():
            await self._give_back(subscription)

    def _on_channel_closed(self, subscription: Subscription) -> None:
        """A partition's channel closed without this worker closing it (the connection was
        lost, or the broker closed it): subscribe again, until it works."""
        if self.stopping:
            return
        subscription.abandon()
        self._forget_parking(subscription)
        if self._subscriber.is_current(subscription):
            log.warning("partition_lost", stage=self._stage, partition=subscription.partition)
            self._background.spawn(self._resubscribe(subscription.partition), "resubscribe")

    async def _resubscribe(self, partition: int) -> None:
        """Make sure the partition has an open subscription, trying until it has one."""
        async with self._subscribing[partition]:
            for delay in pauses(0.2, 5.0):
                current = self._subscriptions.get(partition)
                if self.stopping or (current is not None and current.is_open):
                    return
                try:
                    await self._subscriber.subscribe_within(partition, 2 * SUBSCRIBE_TIMEOUT)
                    log.info("partition_subscribed", stage=self._stage, partition=partition)
                    return
                except START_ERRORS as error:
                    log.warning("resubscribe_failed", partition=partition, error=str(error))
                await asyncio.sleep(delay)

    async def _balance_forever(self) -> None:
        while True:
            await pause(self._interval)
            try:
                self.rebalance()
                self.watch()
            except Exception:
                log.exception("rebalance_failed", stage=self._stage)

    def rebalance(self) -> None:
        """Hand over the partitions beyond this worker's fair share (in the background)."""
        if self.stopping:
            return
        held = self.active - {n for n, s in self._subscriptions.items() if s.holding}
        self._watch.held(len(held))
        partitions, peers = self._topology.partitions, self._presence.peers()
        for partition in surplus(partitions, peers, held, self._holdings.parked_partitions()):
            self._background.spawn(self._hand_off(partition), f"hand-off-{partition}")

    def _forget_parking(self, subscription: Subscription) -> None:
        """The partition's conversations are the next holder's now: whatever this worker
        parked of them is in the store, and in the delay queues, for it to find. Unless the
        partition has a newer subscription here already (its channel died during a
        hand-off, and the worker subscribed again meanwhile): that one's parking stands."""
        newer = self._subscriptions.get(subscription.partition, subscription) is not subscription
        self._holdings.forget(subscription, keep_parking=newer)

    async def _hand_off(self, partition: int) -> None:
        """Finish what this worker holds of the partition, return the rest, queue up again.

        Closing the channel (rather than cancelling the consumer first) returns the unacked
        messages and ends the subscription in one step, so the next consumer starts with
        them, in order, and cannot overtake them.
        """
        subscription = self._subscriptions[partition]
        subscription.holding = True
        self._intake.withdraw(subscription)
        finished = await subscription.settled(self._grace)
        keep = self._holdings.parked_partitions() & {partition} and not self.stopping
        if keep and subscription.is_open:
            # A message of the partition went to a retry meanwhile: keep it, take what waited.
            subscription.holding = False
            held, subscription.held = subscription.held, []
            for message in held:
                self._intake.take(subscription, message)
            return
        await self._give_back(subscription)
        self._forget_parking(subscription)
        log.info("partition_handed_off", stage=self._stage, partition=partition, finished=finished)
        await self._resubscribe(partition)

    async def _give_back(self, subscription: Subscription) -> None:
        """Close the subscription, giving back what it holds unstarted; a message that has
        used half its deliveries is renewed first (`relay.pipeline.renewal`), so that
        hand-offs and stops never wear a healthy message out."""
        if subscription.is_open and subscription.held:
            subscription.held = await renew_worn(
                self._broker, self._topology, self._stage, subscription.partition, subscription.held
            )
        await subscription.close()


def fair_share(partitions: int, workers: int) -> int:
    """The most partitions one of `workers` should hold."""
    return math.ceil(partitions / max(workers, 1))


def surplus(partitions: int, workers: int, held: set[int], parked: set[int]) -> list[int]:
    """The partitions to hand over: those beyond the fair share, if any.

    Partitions with a conversation waiting in a delay queue (`parked`) stay: a retry's
    parking the next worker would find in the store (after messages bounced through delay
    queues), but a hold of the order (a message back in a moment, its store or broker away)
    is known to this worker alone, and the next would let later messages overtake it.
    """
    extra = len(held) - fair_share(partitions, workers)
    if extra <= 0:
        return []
    return sorted(held - parked, reverse=True)[:extra]
