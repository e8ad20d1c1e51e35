"""What both workers share: consume a stage's partitions in order, one lane per
conversation, and turn each message's verdict into broker actions in one place.

A subclass says how to read an envelope and what to do with it (`decide`); this class
keeps the order (lanes, and parking behind a message that waits to retry), publishes to
delay and dead-letter queues with confirms before acking, and stops gracefully.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import time
from abc import ABC, abstractmethod
from collections import defaultdict
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Generic, TypeVar

import aio_pika
import structlog
from aio_pika.abc import AbstractIncomingMessage
from aiormq.exceptions import ChannelInvalidStateError
from pydantic import BaseModel, ValidationError

from relay.aio import cancelled_from_outside
from relay.backoff import first_hop
from relay.broker import (
    BROKER_ERRORS,
    CONNECTION_ERRORS,
    Broker,
    BrokerUnavailable,
    StageName,
    partition_of,
)
from relay.broker.presence import Presence
from relay.handoff import Subscription, surplus
from relay.lanes import Lanes
from relay.metrics import Metrics
from relay.parking import Parking, still_waiting
from relay.settings import Settings
from relay.store import Unfinished
from relay.wire import ATTEMPT_HEADER, DEAD_AT_HEADER, REASON_HEADER, utcnow

log = structlog.get_logger(__name__)

START_ERRORS: tuple[type[BaseException], ...] = (*CONNECTION_ERRORS, BrokerUnavailable)
SUBSCRIBE_TIMEOUT = 10.0  # seconds for each step of subscribing to a partition
E = TypeVar("E", bound=BaseModel)


class Outcome(enum.Enum):
    """What becomes of a message; `settle` maps each to broker actions."""

    DONE = "done"  # ack
    DROP = "drop"  # ack: nothing to do (e.g. never accepted)
    RETRY = "retry"  # to a delay queue as the next attempt, then ack
    WAIT = "wait"  # to a delay queue, same attempt (parked, not due, endpoint busy)
    DEAD = "dead"  # to the stage's dead-letter queue with the reason, then ack
    AGAIN = "again"  # nack with requeue: the store or broker is away right now


@dataclass(frozen=True)
class Verdict:
    """An outcome with what it needs: the wait, the reason, a rewritten body, headers."""

    outcome: Outcome
    delay: float = 0.0
    reason: str = ""
    body: bytes | None = None
    headers: dict[str, str | int] = field(default_factory=dict)
    # The conversation waits with this message (always so for a retry).
    holds_order: bool = False


@dataclass(frozen=True)
class Delivery(Generic[E]):
    """A message in a lane: its envelope (None if it is not one), and the subscription it
    came through."""

    message: AbstractIncomingMessage
    envelope: E | None
    subscription: Subscription


class StageWorker(ABC, Generic[E]):
    """Consumes the partitions of one stage it is the active consumer of, and hands over
    those beyond its fair share; subclasses decide per message."""

    stage: StageName
    envelope_type: type[E]  # the versioned model of the stage's messages

    def __init__(
        self,
        broker: Broker,
        metrics: Metrics,
        concurrency: int,
        settings: Settings,
    ) -> None:
        self._broker = broker
        self._metrics = metrics
        self._lanes: Lanes[Delivery[E]] = Lanes(self._process, concurrency)
        self._prefetch = concurrency  # per partition channel
        self.parking = Parking()
        self.presence = Presence(broker, self.stage, settings.presence_interval)
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

    @abstractmethod
    def keys(self, envelope: E) -> tuple[str, str]:
        """(conversation, message) ids of an envelope, for order and parking."""

    @abstractmethod
    def created_at(self, envelope: E) -> datetime:
        """When the message came into being (its age is watched)."""

    @abstractmethod
    async def decide(self, message: AbstractIncomingMessage, envelope: E) -> Verdict:
        """Do the work for one message and say what becomes of it."""

    @abstractmethod
    async def unfinished(self, envelope: E) -> list[Unfinished]:
        """The conversation's messages not finished with (this one among them, unless it
        was), oldest first: asked the first time this worker meets the conversation, to find
        parking left by another worker, or by itself before a restart."""

    def parking_key(self, message_id: str) -> str:
        """The parking key (see `keys`) of a stored message."""
        return message_id

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

    async def start(self, wait: float = 60.0) -> None:
        """Join the stage's workers and subscribe to every partition (waits for the broker).

        Each partition has a channel of its own, so one can be handed over without the
        others; the broker makes one subscriber per partition the active one. A broker lost
        while starting is waited for (up to `wait` seconds), not fatal.
        """
        await self._broker.wait_connected()
        deadline = asyncio.get_running_loop().time() + wait
        delay = 0.5
        while True:
            try:
                await self._start_once()
                return
            except START_ERRORS as error:
                await self._undo_start()
                if asyncio.get_running_loop().time() + delay > deadline:
                    raise
                log.warning("worker_start_failed", error=str(error), retry_in=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _start_once(self) -> None:
        if self._broker.connection is None:
            raise BrokerUnavailable("no broker connection")
        async with asyncio.timeout(SUBSCRIBE_TIMEOUT):
            await self.presence.start()
        for partition in range(self._broker.topology.partitions):
            await self._subscribe_within(partition, 2 * SUBSCRIBE_TIMEOUT)
        self._spawn(self._balance_forever(), f"balance-{self.stage}")
        log.info(
            "worker_started",
            stage=self.stage,
            partitions=self._broker.topology.partitions,
            worker=self.presence.worker_id,
        )

    async def _undo_start(self) -> None:
        await self.presence.stop()
        for subscription in self._subscriptions.values():
            await subscription.close()
        self._subscriptions.clear()

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
                queue = await channel.get_queue(self._broker.topology.queue(self.stage, partition))
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
        self._forget_parking(subscription.partition)
        if self._subscriptions.get(subscription.partition) is subscription:
            log.warning("partition_lost", stage=self.stage, partition=subscription.partition)
            self._spawn(self._resubscribe(subscription.partition), "resubscribe")

    async def _resubscribe(self, partition: int) -> None:
        """Make sure the partition has an open subscription, trying until it has one."""
        async with self._subscribing[partition]:
            delay = 0.2
            while not self._stopping:
                current = self._subscriptions.get(partition)
                if current is not None and current.is_open:
                    return
                try:
                    await self._subscribe_within(partition, 2 * SUBSCRIBE_TIMEOUT)
                    log.info("partition_subscribed", stage=self.stage, partition=partition)
                    return
                except START_ERRORS as error:
                    log.warning("resubscribe_failed", partition=partition, error=str(error))
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

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
            await asyncio.sleep(self._interval)
            try:
                self.rebalance()
                self.watch()
            except Exception:
                log.exception("rebalance_failed", stage=self.stage)

    def watch(self) -> None:
        """Export each partition's oldest unstarted message; say when one stalls, or when
        messages wait on a subscription that is not being handed over."""
        for partition, subscription in self._subscriptions.items():
            age = subscription.oldest_unstarted()
            self._metrics.oldest_unstarted.labels(self.stage, str(partition)).set(age)
            if age > self._stall_seconds:
                log.error("partition_stalled", stage=self.stage, partition=partition, age=age)
            if subscription.held and not subscription.holding and not self._stopping:
                log.error("messages_held_without_hand_off", partition=partition)

    def rebalance(self) -> None:
        """Hand over the partitions beyond this worker's fair share (in the background)."""
        if self._stopping:
            return
        held = self.active_partitions - {n for n, s in self._subscriptions.items() if s.holding}
        self._metrics.partitions_held.labels(self.stage).set(len(held))
        partitions, peers = self._broker.topology.partitions, self.presence.peers()
        for partition in surplus(partitions, peers, held, self._parked_partitions()):
            self._spawn(self._hand_off(partition), f"hand-off-{partition}")

    def _forget_parking(self, partition: int) -> None:
        """The partition's conversations are the next holder's now: whatever this worker
        parked of them is in the store, and in the delay queues, for it to find."""
        partitions = self._broker.topology.partitions
        self.parking.forget(
            c for c in self.parking.conversations() if partition_of(c, partitions) == partition
        )

    def _parked_partitions(self) -> set[int]:
        return {
            partition_of(conversation, self._broker.topology.partitions)
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
        await subscription.close()
        self._forget_parking(partition)
        log.info("partition_handed_off", stage=self.stage, partition=partition, finished=finished)
        await self._resubscribe(partition)

    def _withdraw(self, predicate: Callable[[Delivery[E]], bool]) -> None:
        """Take back deliveries not yet started: they wait with the held ones (returned on
        close), so only the messages being handled right now have to finish."""
        for delivery in self._lanes.withdraw(predicate):
            delivery.subscription.done()
            delivery.subscription.held.append(delivery.message)

    async def stop(self, grace: float) -> None:
        """Stop taking messages, finish those being handled (bounded), return the rest."""
        self._stopping = True
        await self.presence.stop()
        self._withdraw(lambda _: True)
        finished = await self._lanes.drain(grace)
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for subscription in self._subscriptions.values():
            await subscription.close()
        log.info("worker_stopped", stage=self.stage, finished=finished)

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
                verdict = Verdict(Outcome.DEAD, reason="not a valid envelope")
            elif not await self._recall_parking(
                delivery.subscription, conversation or "", envelope
            ):
                verdict = self._unrecalled(conversation or "", message_key or "")
            elif (parked := self._parked(conversation or "", message_key or "")) is not None:
                verdict = parked
            else:
                verdict = await self._decide_safely(message, envelope)
            await self._settle(message, conversation, message_key, verdict)

    async def _recall_parking(
        self, subscription: Subscription, conversation: str, envelope: E
    ) -> bool:
        """On meeting a conversation, adopt the parking another worker left (False: it
        could not be looked up, and the message waits)."""
        if not subscription.first_sight(conversation):
            return True
        try:
            unfinished = await self.unfinished(envelope)
        except Exception as error:
            subscription.unsee(conversation)
            log.warning("parking_lookup_failed", error=f"{type(error).__name__}: {error}")
            return False
        now = utcnow()
        due, waiting = still_waiting(unfinished, now, self.parking.grace) or (now, [])
        keys = [self.parking_key(row.message_id) for row in waiting]
        own = self.keys(envelope)[1]
        if keys == [own]:
            keys = []  # only this message: nothing to wait for
        remaining = (due - now).total_seconds()
        if keys:
            log.info("parking_adopted", unfinished=len(keys), due_in=round(remaining, 3))
        delays = self._broker.topology.stage_delays(self.stage)
        # Led by this very message, the list only orders what comes after it: nothing is
        # away, and the partition may be handed over meanwhile (the next holder asks too).
        head_away = bool(keys) and keys[0] != own
        self.parking.adopt(conversation, keys, first_hop(remaining, delays), head_away)
        return True

    def _unrecalled(self, conversation: str, message_key: str) -> Verdict:
        """The parking look-up failed: a message behind a parked one waits as parked; only
        the head (or a message of an unparked conversation) waits holding the order."""
        return self._parked(conversation, message_key) or Verdict(
            Outcome.AGAIN, reason="the parking look-up failed"
        )

    def _parked(self, conversation: str, message_key: str) -> Verdict | None:
        """The wait of a message parked behind its conversation's head (None: it goes)."""
        wait = self.parking.wait_behind(conversation, message_key)
        if wait is None:
            return None
        delay = first_hop(wait, self._broker.topology.stage_delays(self.stage))
        return Verdict(Outcome.WAIT, delay=delay, reason="parked")

    async def _decide_safely(self, message: AbstractIncomingMessage, envelope: E) -> Verdict:
        try:
            return await self.decide(message, envelope)
        except Exception as error:
            # A bug must not strand the message unacked in a dead lane: it is tried again.
            log.exception("decide_failed")
            return Verdict(Outcome.AGAIN, reason=f"{type(error).__name__}: {error}")

    async def _settle(
        self,
        message: AbstractIncomingMessage,
        conversation: str | None,
        message_key: str | None,
        verdict: Verdict,
    ) -> None:
        """The one place a verdict becomes broker actions."""
        self._metrics.consumed.labels(self.stage, verdict.outcome.value).inc()
        if verdict.outcome is Outcome.AGAIN:
            # The store is away for a moment: wait in the broker, holding the conversation's
            # order (a requeue would let the next message overtake, and count towards the
            # queue's delivery limit).
            delays = self._broker.topology.stage_delays(self.stage)
            verdict = Verdict(
                Outcome.WAIT,
                delay=delays[0] if delays else 1.0,
                reason=verdict.reason,
                holds_order=True,
            )
        outcome = verdict.outcome
        if not await self._forward_holding_order(message, verdict):
            return
        await _quietly(message.ack())
        if conversation and message_key:
            self._track_parking(conversation, message_key, verdict)
        log.info(
            "message_settled",
            stage=self.stage,
            outcome=outcome.value,
            reason=verdict.reason or None,
        )

    async def _forward_holding_order(
        self, message: AbstractIncomingMessage, verdict: Verdict
    ) -> bool:
        """Forward the message; while the broker is away, keep trying, holding its lane.

        Giving the message back (a requeue) would let the conversation's next message, already
        in the lane, overtake it. False once its channel is gone: the broker then has it back
        and delivers it again ahead of the ones behind it, which are stale as well.
        """
        while True:
            try:
                await self._forward(message, verdict)
                return True
            except BrokerUnavailable as error:
                log.warning("settle_failed", outcome=verdict.outcome.value, error=str(error))
                await asyncio.sleep(1)  # the broker is away: do not spin on it
                if stale(message):
                    return False

    async def _forward(self, message: AbstractIncomingMessage, verdict: Verdict) -> None:
        """Publish the message where the verdict sends it (nothing for done and drop)."""
        topology = self._broker.topology
        body = verdict.body if verdict.body is not None else message.body
        attempt = attempt_of(message)
        if verdict.outcome in (Outcome.RETRY, Outcome.WAIT):
            next_attempt = attempt + 1 if verdict.outcome is Outcome.RETRY else attempt
            await self._broker.publish_to(
                topology.delay_exchange(self.stage, verdict.delay),
                message.routing_key or "",  # the partition: it returns to its own queue
                body,
                message_id=message.message_id or "",
                headers={**verdict.headers, ATTEMPT_HEADER: next_attempt},
            )
        elif verdict.outcome is Outcome.DEAD:
            await self._broker.publish_to(
                topology.dead_exchange(),
                self.stage,
                body,
                message_id=message.message_id or "",
                headers={
                    ATTEMPT_HEADER: attempt,
                    REASON_HEADER: verdict.reason[:1000],
                    DEAD_AT_HEADER: int(time.time()),
                    **verdict.headers,
                },
            )

    def _track_parking(self, conversation: str, message_key: str, verdict: Verdict) -> None:
        if verdict.outcome is Outcome.RETRY or verdict.holds_order:
            self.parking.delay_head(conversation, message_key, verdict.delay)
        elif verdict.outcome is Outcome.WAIT:
            self.parking.sent_away(conversation, message_key, verdict.delay)
        elif verdict.outcome in (Outcome.DONE, Outcome.DROP, Outcome.DEAD):
            self.parking.done(conversation, message_key)


def _observed(task: asyncio.Future[Any]) -> None:
    """Take a left-behind attempt's outcome, so that it is never reported unretrieved."""
    if not task.cancelled() and (error := task.exception()) is not None:
        log.info("left_attempt_failed", error=f"{type(error).__name__}: {error}")


def stale(message: AbstractIncomingMessage) -> bool:
    """True when the message's channel is gone: it can no longer be acked, and the broker
    has given it (or will give it) to a consumer again."""
    try:
        message.channel  # noqa: B018 (the property raises once the channel is closed)
    except ChannelInvalidStateError:
        return True
    return False


def attempt_of(message: AbstractIncomingMessage) -> int:
    """The attempt number a message carries (0 for the first)."""
    value = (message.headers or {}).get(ATTEMPT_HEADER, 0)
    return value if isinstance(value, int) and value >= 0 else 0


async def _quietly(action: object) -> None:
    """Ack or nack; after a reconnect the old channel's tags are void and the broker
    redelivers, which the handlers' idempotency absorbs."""
    try:
        await action  # type: ignore[misc]
    except BROKER_ERRORS as error:
        log.warning("ack_failed", error=str(error))
    except asyncio.CancelledError:
        if cancelled_from_outside():
            raise
        log.warning("ack_failed", error="the connection closed")
