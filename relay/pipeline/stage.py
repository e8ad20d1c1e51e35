"""What both workers share: consume a stage's partitions in order, one lane per
conversation, and turn each message's verdict into broker actions in one place.

A subclass says how to read an envelope and what to do with it (`decide`); this class
keeps the order (lanes, and parking behind a message that waits to retry), publishes to
delay and dead-letter queues with confirms before acking, and stops gracefully.

The class is put together from one module per job, each read on its own: `partitions`
(subscribing, resubscribing, rebalancing, handing partitions over), `adoption` (adopting
the parking another worker left) and `settle` (a verdict into broker actions). Here are the
start, the stop, and the dispatch of each delivery into its conversation's lane.
"""

from __future__ import annotations

import asyncio
from abc import abstractmethod
from collections import defaultdict
from collections.abc import Callable
from datetime import datetime
from typing import TypeVar

import structlog
from aio_pika.abc import AbstractIncomingMessage
from pydantic import BaseModel, ValidationError

from relay.aio import cancelled_from_outside
from relay.broker import Broker, BrokerUnavailable, StageName
from relay.broker.presence import Presence
from relay.broker.topology import Topology
from relay.metrics import Metrics
from relay.pipeline.adoption import ParkingAdoption
from relay.pipeline.lanes import Lanes
from relay.pipeline.parking import Parking
from relay.pipeline.partitions import START_ERRORS, SUBSCRIBE_TIMEOUT, Partitions
from relay.pipeline.settle import Outcome, Settling, Verdict, _quietly, attempt_of, stale
from relay.pipeline.subscription import Delivery, Subscription
from relay.pipeline.waiting import WaitingRoom
from relay.retry import pauses
from relay.settings import Settings
from relay.wire import utcnow

log = structlog.get_logger(__name__)

E = TypeVar("E", bound=BaseModel)  # the stage's envelope model


class StageWorker(Partitions[E], ParkingAdoption[E], Settling):
    """Consumes the partitions of one stage it is the active consumer of, and hands over
    those beyond its fair share; subclasses decide per message.

    A subclass gives `envelope_type`, `stage` and the hooks: `decide` and `created_at` here,
    `keys`, `unfinished` and `parking_key` (see `ParkingAdoption`)."""

    stage: StageName
    envelope_type: type[E]  # the versioned model of the stage's messages

    def __init__(
        self,
        broker: Broker,
        metrics: Metrics,
        concurrency: int,
        settings: Settings,
        topology: Topology | None = None,
    ) -> None:
        self._broker = broker
        # The generation of partition queues consumed: this service's count by default.
        self.topology = topology or broker.topology
        self._metrics = metrics
        self._lanes: Lanes[Delivery[E]] = Lanes(self._process, concurrency)
        self._reported_stuck = set()
        # Per partition channel: as many messages as the lanes handle at once, and as many
        # again waiting in memory for their turn (so a full waiting room never keeps the
        # heads they wait for from being delivered).
        self._prefetch = 2 * concurrency
        self.parking = Parking()
        self.waiting_room: WaitingRoom[Delivery[E]] = WaitingRoom(self._resume, concurrency)
        self.presence = Presence(broker, self.stage, settings.presence_interval, self.topology)
        self._interval = settings.presence_interval
        self._grace = settings.shutdown_timeout  # for a hand-off's messages in hand
        self._stall_seconds = settings.stall_seconds
        self._subscriptions: dict[int, Subscription] = {}
        # One (re)subscription of a partition at a time.
        self._subscribing: defaultdict[int, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopping = False

    @property
    def metrics(self) -> Metrics:
        """The worker's metrics (what it consumed, by outcome)."""
        return self._metrics

    def parse(self, message: AbstractIncomingMessage) -> E | None:
        """The envelope, or None (logged) if it is not one: it is then dead-lettered."""
        try:
            return self.envelope_type.model_validate_json(message.body)
        except ValidationError:
            log.error("invalid_envelope", stage=self.stage, message_id=message.message_id)
            return None

    async def unreadable(self, message_id: str) -> None:
        """Note in the store that the message `message_id` (its id on the stage's queues) is
        dead, its envelope unreadable: nothing may wait behind it. Nothing by default."""

    @abstractmethod
    def created_at(self, envelope: E) -> datetime:
        """When the message came into being (its age is watched)."""

    @abstractmethod
    async def decide(self, message: AbstractIncomingMessage, envelope: E) -> Verdict:
        """Do the work for one message and say what becomes of it."""

    async def start(self, wait: float = 60.0) -> None:
        """Join the stage's workers and subscribe to every partition (waits for the broker).

        Each partition has a channel of its own, so one can be handed over without the
        others; the broker makes one subscriber per partition the active one. A broker lost
        while starting is waited for (up to `wait` seconds), not fatal.
        """
        await self._broker.wait_connected()
        deadline = asyncio.get_running_loop().time() + wait
        for delay in pauses(0.5, 5.0):
            try:
                await self._start_once()
                return
            except START_ERRORS as error:
                await self._undo_start()
                if asyncio.get_running_loop().time() + delay > deadline:
                    raise
                log.warning("worker_start_failed", error=str(error), retry_in=delay)
                await asyncio.sleep(delay)

    async def _start_once(self) -> None:
        if self._broker.connection is None:
            raise BrokerUnavailable("no broker connection")
        async with asyncio.timeout(SUBSCRIBE_TIMEOUT):
            await self.presence.start()
        for partition in range(self.topology.partitions):
            await self._subscribe_within(partition, 2 * SUBSCRIBE_TIMEOUT)
        self._spawn(self._balance_forever(), f"balance-{self.stage}")
        log.info(
            "worker_started",
            stage=self.stage,
            partitions=self.topology.partitions,
            worker=self.presence.worker_id,
        )

    async def _undo_start(self) -> None:
        await self.presence.stop()
        for subscription in self._subscriptions.values():
            await subscription.close()
        self._subscriptions.clear()

    async def stop(self, grace: float) -> None:
        """Stop taking messages, finish those being handled (bounded), return the rest."""
        self._stopping = True
        self.waiting_room.close()
        await self.presence.stop()
        self._withdraw(lambda _: True)
        finished = await self._lanes.drain(grace)
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for subscription in self._subscriptions.values():
            await self._give_back(subscription)
        log.info("worker_stopped", stage=self.stage, finished=finished)

    async def _on_delivery(
        self, subscription: Subscription, message: AbstractIncomingMessage
    ) -> None:
        # Each delivery runs as a task started in delivery order; nothing here awaits before
        # `submit`, which fixes the order.
        if subscription.closing:
            return  # unacked: the closing channel returns it to the queue
        if self._subscriptions.get(subscription.partition) is not subscription:
            # Impossible by construction; should it happen, the messages go back and the
            # consumer ends rather than keep the partition with nobody handling it.
            log.error("delivery_to_unknown_subscription", partition=subscription.partition)
            self._spawn(subscription.close(), "close-unknown")
            return
        subscription.arrived(message)
        if subscription.holding or self._stopping:
            subscription.held.append(message)  # unacked: a close returns it to the head
            return
        self._take(subscription, message)

    def _take(self, subscription: Subscription, message: AbstractIncomingMessage) -> None:
        subscription.take()
        envelope = self.parse(message)
        key = self.keys(envelope)[0] if envelope is not None else message.message_id
        self._lanes.submit(str(key), Delivery(message, envelope, subscription))

    def _withdraw(self, predicate: Callable[[Delivery[E]], bool]) -> None:
        """Take back deliveries not yet started: they wait with the held ones (returned on
        close), so only the messages being handled right now have to finish."""
        for delivery in self._lanes.withdraw(predicate):
            delivery.subscription.done()
            delivery.subscription.held.append(delivery.message)

    async def _process(self, delivery: Delivery[E]) -> None:
        delivery.subscription.started(delivery.message)
        try:
            await self._handle(delivery)
        except Exception:
            # Never let one message's failure end its lane: the messages behind it would be
            # stranded unacked. This one goes back to its queue.
            log.exception("message_handling_failed", message_id=delivery.message.message_id)
            await _quietly(delivery.message.nack(requeue=True))
        except asyncio.CancelledError:
            if cancelled_from_outside():
                raise
            # A future aiormq cancelled as its connection closed: not the end of the lane.
            log.error("message_handling_cancelled", message_id=delivery.message.message_id)
            await _quietly(delivery.message.nack(requeue=True))
        finally:
            delivery.subscription.done()

    async def _handle(self, delivery: Delivery[E]) -> None:
        message, envelope = delivery.message, delivery.envelope
        if stale(message):
            # Delivered on a channel that has since died (a broker restart): the broker has
            # it back and redelivers it. Handling it now could overtake that redelivery.
            log.info("stale_delivery_skipped", stage=self.stage, message_id=message.message_id)
            return
        conversation, message_key = self.keys(envelope) if envelope else (None, None)
        with structlog.contextvars.bound_contextvars(
            message_id=message.message_id,
            conversation_id=conversation,
            attempt=attempt_of(message),
        ):
            if envelope is not None:
                age = (utcnow() - self.created_at(envelope)).total_seconds()
                self._metrics.message_age.labels(self.stage).observe(max(age, 0.0))
            if envelope is None:
                verdict = await self._dead_unread(message)
            elif not await self._recall_parking(
                delivery.subscription, conversation or "", envelope
            ):
                verdict = self._unrecalled(conversation or "", message_key or "")
            elif (
                wait := self.parking.wait_behind(conversation or "", message_key or "")
            ) is not None:
                if self._wait_in_memory(delivery, conversation or "", message_key or "", wait):
                    return
                verdict = self._parked_for(wait)
            else:
                verdict = await self._decide_safely(message, envelope)
            await self._settle(message, conversation, message_key, verdict)

    def _wait_in_memory(
        self, delivery: Delivery[E], conversation: str, message_key: str, wait: float
    ) -> bool:
        """Keep a parked message whose turn is near, unacked, rather than bounce it through
        a delay queue (False: it goes to one)."""
        if self._stopping or delivery.subscription.holding:
            return False
        subscription = delivery.subscription
        place = self.parking.place(conversation, message_key)
        return self.waiting_room.hold(
            conversation, subscription.partition, subscription, delivery, wait, place
        )

    def _resume(self, conversation: str, delivery: Delivery[E]) -> None:
        """A message back from the waiting room: into its lane again (or with the held ones,
        during a hand-off; nowhere if its channel is gone: the broker has it back)."""
        subscription = delivery.subscription
        if subscription.closing:
            return
        if subscription.holding or self._stopping:
            subscription.held.append(delivery.message)
            return
        subscription.take()
        self._lanes.submit(conversation, delivery)

    async def _dead_unread(self, message: AbstractIncomingMessage) -> Verdict:
        """A message that is not a valid envelope: dead-lettered, and dead in the store."""
        try:
            await self.unreadable(message.message_id or "")
        except Exception as error:
            return Verdict(Outcome.AGAIN, reason=f"{type(error).__name__}: {error}")
        return Verdict(Outcome.DEAD, reason="not a valid envelope")

    async def _decide_safely(self, message: AbstractIncomingMessage, envelope: E) -> Verdict:
        try:
            return await self.decide(message, envelope)
        except Exception as error:
            # A bug must not strand the message unacked in a dead lane: it is tried again.
            log.exception("decide_failed")
            return Verdict(Outcome.AGAIN, reason=f"{type(error).__name__}: {error}")
