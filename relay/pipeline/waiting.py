"""Short waits of parked messages, in the worker's memory rather than in a delay queue.

A parked message whose turn is near (one of the first few behind its conversation's head,
and what it waits for is being handled, or due back within two seconds) waits here,
unacked, and is handed back to its conversation's lane the moment the conversation's head
is done, or when its wait is over. A delay queue would return it up to a whole hop later,
and a list draining behind a recovered endpoint would then move one message per hop, the
broker busy with messages bouncing round. Long waits, and the messages further back, still
go to the delay queues: memory holds only what the prefetch allows, and a worker's memory
does not survive it (unacked, these messages go back to the queue when it dies).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

Item = TypeVar("Item")

MAX_WAIT = 2.0  # seconds: a longer wait goes to a delay queue
MIN_WAIT = 0.05  # seconds: no busy loop while the message ahead is being handled
# Only the first few behind a head wait here: the room is for the messages that go next,
# not for a whole list that would fill it while the next in line bounces in the broker.
NEAR = 8


@dataclass(eq=False)
class _Waiting(Generic[Item]):
    item: Item
    partition: int
    owner: object  # the subscription it came through
    timer: asyncio.TimerHandle | None = None

    def cancel(self) -> None:
        if self.timer is not None:
            self.timer.cancel()


class WaitingRoom(Generic[Item]):
    """Items waiting a short while per conversation, at most `capacity` per partition."""

    def __init__(self, resume: Callable[[str, Item], None], capacity: int) -> None:
        self._resume = resume
        self._capacity = capacity
        self._by_conversation: dict[str, list[_Waiting[Item]]] = {}
        self._closed = False

    def hold(
        self, conversation: str, partition: int, owner: object, item: Item, wait: float, place: int
    ) -> bool:
        """Keep `item` (of `owner`, the subscription it came through; `place` messages go
        before it) for `wait` seconds at most (False: too long, too far back, no room left
        in the partition, or the room is closed)."""
        if (
            self._closed
            or wait > MAX_WAIT
            or place > NEAR
            or self.count(partition) >= self._capacity
        ):
            return False
        waiting: _Waiting[Item] = _Waiting(item, partition, owner)
        waiting.timer = asyncio.get_running_loop().call_later(
            max(wait, MIN_WAIT), self._time_up, conversation, waiting
        )
        self._by_conversation.setdefault(conversation, []).append(waiting)
        return True

    def release(self, conversation: str) -> None:
        """The conversation's head moved on: every item waiting in it resumes, in order."""
        for waiting in self._by_conversation.pop(conversation, []):
            waiting.cancel()
            self._resume(conversation, waiting.item)

    def forget(self, owner: object) -> None:
        """Drop what waits of a subscription (its channel is gone: the broker has it back).
        By subscription, not partition: the partition's next subscription may have its own
        messages waiting already."""
        for conversation, entries in list(self._by_conversation.items()):
            kept = [w for w in entries if w.owner is not owner]
            for waiting in entries:
                if waiting.owner is owner:
                    waiting.cancel()
            if kept:
                self._by_conversation[conversation] = kept
            else:
                del self._by_conversation[conversation]

    def count(self, partition: int) -> int:
        """How many items of a partition wait."""
        return sum(
            w.partition == partition for entries in self._by_conversation.values() for w in entries
        )

    def close(self) -> None:
        """Cancel every wait and hold nothing more (stop: the channels' close returns the
        messages)."""
        self._closed = True
        for entries in self._by_conversation.values():
            for waiting in entries:
                waiting.cancel()
        self._by_conversation.clear()

    def _time_up(self, conversation: str, waiting: _Waiting[Item]) -> None:
        entries = self._by_conversation.get(conversation, [])
        if waiting in entries:
            entries.remove(waiting)
            if not entries:
                del self._by_conversation[conversation]
            self._resume(conversation, waiting.item)
