"""Acks of one channel's deliveries, coalesced: where every earlier delivery on the channel
is settled, one `multiple` ack settles them all.

The lanes of a partition settle their messages close together (their store writes commit
in one batch, their publishes' confirms come back in one frame), so the acks asked for in
one turn of the event loop go out together: the run of settled deliveries at the head of
the channel as one `basic.ack` with `multiple`, each one behind a delivery still in hand
on its own. Nothing waits for company: an ack is sent in the turn of the loop it was asked
for, and its caller returns once it is written, as with a plain ack.

The channel's acks and nacks are written in the order they were decided, each once the one
before it is written. aiormq writes a channel's acks without its lock, into a connection
queue of ten frames; while that queue is full, a later ack can take a freed place before
an earlier one wakes to take it. A `multiple` ack overtaking the one before it settles
that one's delivery too, and the broker then closes the channel on the earlier ack
("unknown delivery tag"), returning every delivery in hand to be delivered again.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable

from aio_pika.abc import AbstractIncomingMessage

Settled = tuple[AbstractIncomingMessage, asyncio.Future[None]]


class Acks:
    """The deliveries of one channel not acked or nacked yet, in delivery order."""

    def __init__(self) -> None:
        # By delivery tag, in delivery order (tags grow): None while in hand, else settled.
        self._open: dict[int, Settled | None] = {}
        self._flushing = False
        self._sending: set[asyncio.Task[None]] = set()
        self._last: asyncio.Task[None] | None = None  # the latest ack or nack to go out

    def delivered(self, message: AbstractIncomingMessage) -> None:
        """A delivery came on the channel: acks behind it wait for it to be settled."""
        if message.delivery_tag is not None:
            self._open.setdefault(message.delivery_tag, None)

    async def ack(self, message: AbstractIncomingMessage) -> None:
        """Ack `message`, with the deliveries settled in this turn of the loop where they
        are all that is before it; returns once its ack is written (or raises why not)."""
        tag = message.delivery_tag
        if tag is None or tag not in self._open:
            # Not met on arrival: on its own, as it always was (in its turn).
            await self._in_order(message.ack)
            return
        written: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._open[tag] = (message, written)
        if not self._flushing:
            self._flushing = True
            asyncio.get_running_loop().call_soon(self._flush)
        await written

    def nack(self, message: AbstractIncomingMessage) -> Awaitable[None]:
        """Give `message` back to the queue (requeued): it is no longer awaited."""
        if message.delivery_tag is not None:
            self._open.pop(message.delivery_tag, None)
        return self._in_order(lambda: message.nack(requeue=True))

    def _flush(self) -> None:
        self._flushing = False
        head: list[Settled] = []  # settled, nothing in hand before them
        behind: list[Settled] = []  # settled, behind a delivery still in hand
        in_hand = False
        for entry in self._open.values():
            if entry is None:
                in_hand = True
            else:
                (behind if in_hand else head).append(entry)
        for message, _ in [*head, *behind]:
            del self._open[message.delivery_tag or 0]
        if head:
            last, multiple = head[-1][0], len(head) > 1
            self._send(lambda: last.ack(multiple=multiple), head)
        for settled in behind:
            self._send(settled[0].ack, [settled])

    def _in_order(self, action: Callable[[], Awaitable[None]]) -> asyncio.Task[None]:
        """Run `action` (an ack or a nack) once every one decided before it is written."""
        task = asyncio.ensure_future(_after(self._last, action))
        self._last = task
        self._sending.add(task)  # held: a task only weakly referenced may be collected
        task.add_done_callback(self._sending.discard)
        return task

    def _send(self, action: Callable[[], Awaitable[None]], waiting: Iterable[Settled]) -> None:
        task = self._in_order(action)
        futures = [written for _, written in waiting]

        def sent(done: asyncio.Task[None]) -> None:
            error = None if done.cancelled() else done.exception()
            for written in futures:
                if written.done():
                    continue
                if done.cancelled():
                    written.cancel()
                elif error is not None:
                    written.set_exception(error)
                else:
                    written.set_result(None)

        task.add_done_callback(sent)


async def _after(
    previous: asyncio.Task[None] | None, action: Callable[[], Awaitable[None]]
) -> None:
    """`action`, once `previous` is done (whatever its outcome: its caller hears of it)."""
    if previous is not None and not previous.done():
        await asyncio.wait([previous])
    await action()
