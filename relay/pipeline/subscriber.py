"""Subscribing to one partition queue: a channel of its own, its prefetch, its consumer.

The channel is a plain one (see `relay.pipeline.subscription`), opened and consumed within
bounds: on a connection gone silent each step would otherwise wait for ever. The
subscriptions made are kept here, one current per partition.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import aio_pika
import structlog
from aio_pika.abc import AbstractIncomingMessage

from relay.broker import Broker, BrokerUnavailable, StageName
from relay.broker.topology import Topology
from relay.pipeline.subscription import Subscription

log = structlog.get_logger(__name__)

SUBSCRIBE_TIMEOUT = 10.0  # seconds for each step of subscribing to a partition

OnDelivery = Callable[[Subscription, AbstractIncomingMessage], Awaitable[None]]
OnLost = Callable[[Subscription], None]


class Subscriber:
    """Makes each partition's current subscription; tells `on_delivery` of each message it
    brings, and `on_lost` of a channel that closed without this worker closing it."""

    def __init__(
        self,
        broker: Broker,
        topology: Topology,
        stage: StageName,
        prefetch: int,
        on_delivery: OnDelivery,
        on_lost: OnLost,
    ) -> None:
        self._broker = broker
        self._topology = topology
        self._stage = stage
        self._prefetch = prefetch  # per partition channel
        self._on_delivery = on_delivery
        self._on_lost = on_lost
        self._current: dict[int, Subscription] = {}

    @property
    def current(self) -> Mapping[int, Subscription]:
        """Each partition's latest subscription (open or not)."""
        return self._current

    def is_current(self, subscription: Subscription) -> bool:
        """Whether `subscription` is its partition's latest subscription."""
        return self._current.get(subscription.partition) is subscription

    async def close_all(self) -> None:
        """Close every subscription and forget them (a start that failed)."""
        for subscription in self._current.values():
            await subscription.close()
        self._current.clear()

    async def subscribe_within(self, partition: int, seconds: float) -> None:
        """Subscribe, or raise TimeoutError after `seconds` without waiting for the attempt.

        On a connection gone silent an attempt can outlive its own timeouts (a library's
        clean-up after the cancel waits for the broker's answer): it is left to end with the
        connection. Should it succeed after all, it is the partition's subscription, and
        one made meanwhile replaces it (its deliveries are then returned: the stage worker
        takes only those of a current subscription).
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
        self._current[partition] = subscription
        channel.close_callbacks.add(functools.partial(self._closed, subscription))
        try:
            async with asyncio.timeout(SUBSCRIBE_TIMEOUT):
                await channel.set_qos(prefetch_count=self._prefetch)
                queue = await channel.get_queue(self._topology.queue(self._stage, partition))
                await queue.consume(functools.partial(self._on_delivery, subscription))
        except BaseException:
            await subscription.close()
            raise
        return subscription

    def _closed(self, subscription: Subscription, *_: Any) -> None:
        if not subscription.closing:  # not closed by this worker
            self._on_lost(subscription)


def _observed(task: asyncio.Future[Any]) -> None:
    """Take a left-behind attempt's outcome, so that it is never reported unretrieved."""
    if not task.cancelled() and (error := task.exception()) is not None:
        log.info("left_attempt_failed", error=f"{type(error).__name__}: {error}")
