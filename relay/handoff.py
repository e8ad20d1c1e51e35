"""Spreading a stage's partitions over its workers.

Every worker subscribes to every partition queue; with single active consumer the broker
delivers each partition to one of them, the first to subscribe, so a worker that starts
first takes them all. Each worker therefore counts its live peers (`Presence`) and hands
over the partitions beyond its fair share: it stops taking messages of the partition,
finishes those it holds, closes the partition's channel (the broker returns what was
prefetched to the head of the queue and activates the next subscriber) and subscribes
again, at the back of the line.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections import OrderedDict

from aio_pika.abc import AbstractChannel, AbstractIncomingMessage

from relay.broker.client import BROKER_ERRORS

SEEN_LIMIT = 50_000


class Subscription:
    """One partition queue as this worker consumes it, on a channel of its own."""

    def __init__(self, partition: int, channel: AbstractChannel) -> None:
        self.partition = partition
        self.channel = channel
        # A delivery came: this worker is the partition's active consumer (until the channel
        # closes, or a reconnect lets the broker choose again).
        self.active = False
        # Handing over (or stopping): deliveries wait here unacked, to be returned on close
        # (or taken after all, in order, if the hand-off is called off).
        self.holding = False
        self.held: list[AbstractIncomingMessage] = []
        self._in_hand = 0
        self._settled = asyncio.Event()
        self._settled.set()
        self._seen: OrderedDict[str, None] = OrderedDict()

    def first_sight(self, conversation: str) -> bool:
        """True the first time a conversation's message comes through this subscription
        (since the broker last chose it as the active one). Remembers the most recent
        `SEEN_LIMIT` conversations: one forgotten costs one more look in the store."""
        if conversation in self._seen:
            self._seen.move_to_end(conversation)
            return False
        self._seen[conversation] = None
        if len(self._seen) > SEEN_LIMIT:
            self._seen.popitem(last=False)
        return True

    def unsee(self, conversation: str) -> None:
        """Meet the conversation for the first time again (its look-up failed)."""
        self._seen.pop(conversation, None)

    def forget(self) -> None:
        """The broker may have given the partition to another worker meanwhile."""
        self.active = False
        self._seen.clear()

    def take(self) -> None:
        """A delivery went to a lane."""
        self.active = True
        self._in_hand += 1
        self._settled.clear()

    def done(self) -> None:
        """A delivery taken from this subscription was acked, nacked or abandoned."""
        self._in_hand -= 1
        if self._in_hand <= 0:
            self._in_hand = 0
            self._settled.set()

    async def settled(self, seconds: float) -> bool:
        """Wait until every delivery taken is finished (True), or `seconds` passed."""
        try:
            await asyncio.wait_for(self._settled.wait(), seconds)
        except TimeoutError:
            return False
        return True

    async def close(self) -> None:
        """Close the channel: its consumer ends and its unacked messages go back."""
        if not self.channel.is_closed:
            with contextlib.suppress(*BROKER_ERRORS):
                await self.channel.close()


def fair_share(partitions: int, workers: int) -> int:
    """The most partitions one of `workers` should hold."""
    return math.ceil(partitions / max(workers, 1))


def surplus(partitions: int, workers: int, held: set[int], parked: set[int]) -> list[int]:
    """The partitions to hand over: those beyond the fair share, if any.

    Partitions with a conversation waiting on a retry (`parked`) stay: the next worker would
    find the parking in the store, but only after messages bounced through delay queues.
    """
    extra = len(held) - fair_share(partitions, workers)
    if extra <= 0:
        return []
    return sorted(held - parked, reverse=True)[:extra]
