"""A partition queue as a worker consumes it: a `Subscription` on a channel of its own, and
each `Delivery` taken from it.

A subscription's channel is a plain one, never restored by the robust connection: once
closed (by the worker, or by a lost connection) it stays closed, and the worker subscribes
anew on purpose. A consumer restored behind the worker's back would keep a partition with
nobody handling its messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Generic, TypeVar

from aio_pika.abc import AbstractChannel, AbstractIncomingMessage
from pydantic import BaseModel

from relay.broker.channels import close_channel
from relay.broker.errors import BROKER_ERRORS
from relay.lru import Lru
from relay.pipeline.acks import Acks

SEEN_LIMIT = 50_000
CLOSE_TIMEOUT = 5.0  # seconds a channel's close may take
E = TypeVar("E", bound=BaseModel)  # the stage's envelope model


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
        # The conversations met, with the highest sequence number seen of each.
        self._seen: Lru[str, int | None] = Lru(SEEN_LIMIT)
        # Closed, or being closed, by this worker: nothing of it is to be taken any more.
        self.closing = False
        # Deliveries not started yet (in a lane, or held), by tag: when each arrived.
        self._unstarted: OrderedDict[int, float] = OrderedDict()
        # Every delivery is acked (or given back) through here.
        self.acks = Acks()

    @property
    def is_open(self) -> bool:
        """The channel is open and this worker has not begun to close it."""
        return not self.closing and not self.channel.is_closed

    def arrived(self, message: AbstractIncomingMessage) -> None:
        """A delivery came and waits to be started."""
        self._unstarted[message.delivery_tag or 0] = time.monotonic()
        self.acks.delivered(message)

    def started(self, message: AbstractIncomingMessage) -> None:
        """A delivery's handling began (or it was dropped)."""
        self._unstarted.pop(message.delivery_tag or 0, None)

    def oldest_unstarted(self) -> float:
        """Seconds the oldest delivery not yet started has waited (0 when none)."""
        for since in self._unstarted.values():
            return time.monotonic() - since
        return 0.0

    def first_sight(self, conversation: str, sequence: int | None = None) -> bool:
        """True when the store must be asked what comes before this message: the first time
        a conversation's message comes through this subscription (since the broker last
        chose it as the active one), or when its `sequence` (if the stage numbers its
        messages) skips a number not seen here yet. The broker's order is not enough: a
        quorum queue may deliver out of order after its leader or a consumer was lost, and
        a message can be published after a later one (its first publish failed).
        Remembers the most recent `SEEN_LIMIT` conversations: one forgotten costs one more
        look in the store."""
        if conversation in self._seen:
            last = self._seen.get(conversation)
            if sequence is None or last is None:
                return False
            self._seen.put(conversation, max(last, sequence))
            return sequence > last + 1
        self._seen.put(conversation, sequence)
        return True

    def unsee(self, conversation: str) -> None:
        """Meet the conversation for the first time again (its look-up failed)."""
        self._seen.pop(conversation)

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

    def abandon(self) -> None:
        """Take nothing more of this subscription: what it holds is the broker's again
        (returned when the channel closes, or already returned with a lost connection)."""
        self.closing = True
        self.held.clear()
        self._unstarted.clear()

    async def close(self) -> None:
        """Close the channel: its consumer ends and its unacked messages go back. Marked
        closed first, whatever the channel's state, so that nothing of it is taken again."""
        self.abandon()
        if not self.channel.is_closed:
            # RuntimeError: aiormq's word for a connection that closed meanwhile. Bounded: on
            # a connection gone silent the close waits for an answer that never comes (the
            # channel dies with the connection anyway). Shielded: a bound or a stop that cut
            # the close would break the whole connection (`close_channel`).
            with contextlib.suppress(*BROKER_ERRORS, RuntimeError):
                async with asyncio.timeout(CLOSE_TIMEOUT):
                    await close_channel(self.channel)


@dataclass(frozen=True)
class Delivery(Generic[E]):
    """A message in a lane: its envelope (None if it is not one), and the subscription it
    came through."""

    message: AbstractIncomingMessage
    envelope: E | None
    subscription: Subscription
