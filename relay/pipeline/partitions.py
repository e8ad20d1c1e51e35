"""Spreading a stage's partitions over its workers.

Every worker subscribes to every partition queue; with single active consumer the broker
delivers each partition to one of them, the first to subscribe, so a worker that starts
first takes them all. Each worker therefore counts its live peers (`Presence`) and hands
over the partitions beyond its fair share: it stops taking messages of the partition,
finishes those it holds, closes the partition's channel (the broker returns what was
prefetched to the head of the queue and activates the next subscriber) and subscribes
again, at the back of the line.

`Partitions` is that part of a `StageWorker`, with subscribing again to a partition whose
channel was lost, and watching for a partition that stalls; `fair_share` and `surplus` are
the arithmetic.
"""

from __future__ import annotations

import asyncio
import functools
import math
from abc import ABC, abstractmethod
from collections import defaultdict
from collections.abc import Callable, Coroutine
from typing import Any, Generic, TypeVar

import aio_pika
import structlog
from aio_pika.abc import AbstractIncomingMessage
from pydantic import BaseModel

from relay.aio import pause
from relay.broker import CONNECTION_ERRORS, Broker, BrokerUnavailable, StageName, partition_of
from relay.broker.presence import Presence
from relay.broker.topology import Topology
from relay.metrics import Metrics
from relay.pipeline.lanes import Lanes
from relay.pipeline.parking import Parking
from relay.pipeline.renewal import renew_worn
from relay.pipeline.subscription import Delivery, Subscription
from relay.pipeline.waiting import WaitingRoom
from relay.retry import pauses

log = structlog.get_logger(__name__)

START_ERRORS: tuple[type[BaseException], ...] = (*CONNECTION_ERRORS, BrokerUnavailable)
SUBSCRIBE_TIMEOUT = 10.0  # seconds for each step of subscribing to a partition
E = TypeVar("E", bound=BaseModel)  # the stage's envelope model


class Partitions(ABC, Generic[E]):
    """The partitions of one stage as this worker consumes them (a part of `StageWorker`)."""

    stage: StageName
    parking: Parking
    waiting_room: WaitingRoom[Any]
    presence: Presence
    _broker: Broker
    topology: Topology  # the partition count this worker consumes, and its queues
    _metrics: Metrics
    _prefetch: int
    _interval: float
    _grace: float
    _stall_seconds: float
    _subscriptions: dict[int, Subscription]
    _lanes: Lanes[Any]
    _reported_stuck: set[str]  # lanes said to be stuck, until they move again
    _subscribing: defaultdict[int, asyncio.Lock]
    _tasks: set[asyncio.Task[None]]
    _stopping: bool

    @abstractmethod
    async def _on_delivery(
        self, subscription: Subscription, message: AbstractIncomingMessage
    ) -> None:
        """A delivery came through the subscription (`StageWorker` takes or holds it)."""

    @abstractmethod
    def _take(self, subscription: Subscription, message: AbstractIncomingMessage) -> None:
        """Put a delivery in its conversation's lane (`StageWorker`)."""

    @abstractmethod
    def _withdraw(self, predicate: Callable[[Delivery[E]], bool]) -> None:
        """Take back the matching deliveries not yet started (`StageWorker`)."""

    @property
    def active_partitions(self) -> set[int]:
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
        """Partitions whose oldest message held unstarted waited longer than the stall
        limit: the seconds it has waited, by partition."""
        ages = {n: sub.oldest_unstarted() for n, sub in self._subscriptions.items()}
        return {n: round(age, 1) for n, age in ages.items() if age > self._stall_seconds}

    async def _subscribe(self, partition: int) -> Subscription:
        """Consume the partition on a channel of its own, which becomes its current
        subscription (before the first delivery can come)."""
        connection = self._broker.connection
        if connection is None or connection.is_closed:
            raise BrokerUnavailable("no broker connection")
        # Not `connection.channel()`: the robust connection would reopen that channel after a
        # reconnect, with its consumer, even after the worker closed it in a hand-off.
        channel = aio_pika.Channel(connection)
        # Bounded: on a connection that went silent (not closed yet) opening a channel waits
        # for an answer that never comes; the caller tries again.
        async with asyncio.timeout(SUBSCRIBE_TIMEOUT):
            await channel.initialize()
        subscription = Subscription(partition, channel)
        self._subscriptions[partition] = subscription
        channel.close_callbacks.add(functools.partial(self._on_channel_closed, subscription))
        try:
            async with asyncio.timeout(SUBSCRIBE_TIMEOUT):
                await channel.set_qos(prefetch_count=self._prefetch)
                queue = await channel.get_queue(self.topology.queue(self.stage, partition))
                await queue.consume(functools.partial(self._on_delivery, subscription))
        except BaseException:
            await subscription.close()
            raise
        return subscription

    async def _subscribe_within(self, partition: int, seconds: float) -> None:
        """Subscribe, or raise TimeoutError after `seconds` without waiting for the attempt.

        On a connection gone silent an attempt can outlive its own timeouts (a library's
        clean-up after the cancel waits for the broker's answer): it is left to end with the
        connection. Should it succeed after all, it is the partition's subscription, and
        one made meanwhile replaces it (its deliveries are then returned, see
        `_on_delivery`).
        """
        attempt = asyncio.ensure_future(self._subscribe(partition))
        done, _ = await asyncio.wait({attempt}, timeout=seconds)
        if attempt in done:
            if attempt.cancelled():
                # aiormq cancels what waits on a connection it closes: a failure to try
                # again, not a cancellation of this worker (which would end the retries).
                raise BrokerUnavailable("the connection closed while subscribing")
            attempt.result()
            return
        attempt.cancel()
        attempt.add_done_callback(_observed)
        raise TimeoutError(f"subscribing to partition {partition} took over {seconds}s")

    def _on_channel_closed(self, subscription: Subscription, *_: Any) -> None:
        """A partition's channel closed without this worker closing it (the connection was
        lost, or the broker closed it): subscribe again, until it works."""
        if subscription.closing or self._stopping:
            return
        subscription.abandon()
        self._forget_parking(subscription)
        if self._subscriptions.get(subscription.partition) is subscription:
            log.warning("partition_lost", stage=self.stage, partition=subscription.partition)
            self._spawn(self._resubscribe(subscription.partition), "resubscribe")

    async def _resubscribe(self, partition: int) -> None:
        """Make sure the partition has an open subscription, trying until it has one."""
        async with self._subscribing[partition]:
            for delay in pauses(0.2, 5.0):
                current = self._subscriptions.get(partition)
                if self._stopping or (current is not None and current.is_open):
                    return
                try:
                    await self._subscribe_within(partition, 2 * SUBSCRIBE_TIMEOUT)
                    log.info("partition_subscribed", stage=self.stage, partition=partition)
                    return
                except START_ERRORS as error:
                    log.warning("resubscribe_failed", partition=partition, error=str(error))
                await asyncio.sleep(delay)

    def _spawn(self, work: Coroutine[Any, Any, None], name: str) -> None:
        """Run `work` in the background; stop cancels it; a failure is logged, never lost."""
        task = asyncio.create_task(work, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            if not self._stopping:  # only stop cancels them: anything else is a fault
                log.error("background_task_cancelled", task=task.get_name())
        elif (error := task.exception()) is not None:
            log.error("background_task_failed", task=task.get_name(), exc_info=error)

    async def _balance_forever(self) -> None:
        while True:
            await pause(self._interval)
            try:
                self.rebalance()
                self.watch()
            except Exception:
                log.exception("rebalance_failed", stage=self.stage)

    def watch(self) -> None:
        """Export each partition's oldest unstarted message; say when one stalls, or when
        messages wait on a subscription that is not being handed over."""
        ages: dict[str, float] = {}
        for partition, subscription in self._subscriptions.items():
            age = subscription.oldest_unstarted()
            if subscription.active and subscription.is_open and not subscription.holding:
                ages[self.topology.queue(self.stage, partition)] = round(age, 1)
            self._metrics.oldest_unstarted.labels(self.stage, self._label(partition)).set(age)
            if age > self._stall_seconds:
                log.error("partition_stalled", stage=self.stage, partition=partition, age=age)
            if subscription.held and not subscription.holding and not self._stopping:
                log.error("messages_held_without_hand_off", partition=partition)
        self.presence.report(ages)
        self._report_stuck_lanes()

    def _report_stuck_lanes(self) -> None:
        """Say once where each lane stuck past the stall limit waits: a stall's cause."""
        stuck = self._lanes.stuck(self._stall_seconds)
        for key in stuck.keys() - self._reported_stuck:
            log.error("lane_stuck", stage=self.stage, lane=key, awaiting=stuck[key])
        self._reported_stuck = set(stuck)

    @property
    def _own_count(self) -> bool:
        """Whether this worker consumes the service's own partition count's queues."""
        return self.topology.partitions == self._broker.topology.partitions

    def _label(self, partition: int) -> str:
        """A partition as metrics name it: `3`, or `of16.3` for another count's than the
        service's."""
        return str(partition) if self._own_count else self.topology.routing_key(partition)

    def rebalance(self) -> None:
        """Hand over the partitions beyond this worker's fair share (in the background)."""
        if self._stopping:
            return
        held = self.active_partitions - {n for n, s in self._subscriptions.items() if s.holding}
        if self._own_count:
            self._metrics.partitions_held.labels(self.stage).set(len(held))
        partitions, peers = self.topology.partitions, self.presence.peers()
        for partition in surplus(partitions, peers, held, self._parked_partitions()):
            self._spawn(self._hand_off(partition), f"hand-off-{partition}")

    def _forget_parking(self, subscription: Subscription) -> None:
        """The partition's conversations are the next holder's now: whatever this worker
        parked of them is in the store, and in the delay queues, for it to find. Unless the
        partition has a newer subscription here already (its channel died during a
        hand-off, and the worker subscribed again meanwhile): that one's parking stands."""
        self.waiting_room.forget(subscription)
        partition = subscription.partition
        if self._subscriptions.get(partition, subscription) is not subscription:
            return
        partitions = self.topology.partitions
        self.parking.forget(
            c for c in self.parking.conversations() if partition_of(c, partitions) == partition
        )

    def _parked_partitions(self) -> set[int]:
        return {
            partition_of(conversation, self.topology.partitions)
            for conversation in self.parking.away()
        }

    async def _hand_off(self, partition: int) -> None:
        """Finish what this worker holds of the partition, return the rest, queue up again.

        Closing the channel (rather than cancelling the consumer first) returns the unacked
        messages and ends the subscription in one step, so the next consumer starts with
        them, in order, and cannot overtake them.
        """
        subscription = self._subscriptions[partition]
        subscription.holding = True
        self._withdraw(lambda delivery: delivery.subscription is subscription)
        finished = await subscription.settled(self._grace)
        keep = self._parked_partitions() & {partition} and not self._stopping
        if keep and subscription.is_open:
            # A message of the partition went to a retry meanwhile: keep it, take what waited.
            subscription.holding = False
            held, subscription.held = subscription.held, []
            for message in held:
                self._take(subscription, message)
            return
        await self._give_back(subscription)
        self._forget_parking(subscription)
        log.info("partition_handed_off", stage=self.stage, partition=partition, finished=finished)
        await self._resubscribe(partition)

    async def _give_back(self, subscription: Subscription) -> None:
        """Close the subscription, giving back what it holds unstarted; a message that has
        used half its deliveries is renewed first (`relay.pipeline.renewal`), so that
        hand-offs and stops never wear a healthy message out."""
        if subscription.is_open and subscription.held:
            subscription.held = await renew_worn(
                self._broker, self.topology, self.stage, subscription.partition, subscription.held
            )
        await subscription.close()


def _observed(task: asyncio.Future[Any]) -> None:
    """Take a left-behind attempt's outcome, so that it is never reported unretrieved."""
    if not task.cancelled() and (error := task.exception()) is not None:
        log.info("left_attempt_failed", error=f"{type(error).__name__}: {error}")


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
