"""Keeping a conversation's order while one of its messages waits in a delay queue.

When a conversation's head message fails and goes to a delay queue, the messages behind it
must not overtake it: they join it in the delay loop ("parked"), in arrival order, each
timed to come back when the messages ahead of it are back (the head's retry, or a message
parked earlier), so that the whole list returns together and drains at once when the head
is done (delivered, or dead-lettered): the next parked message becomes the head.

The state is in the worker's memory. A worker that meets a conversation for the first time
(it took the partition over, or restarted) may find it parked by another worker: the
worker asks the store for the conversation's earlier messages not finished with (tried or
not: a message parked behind a failing head has never been tried) and lets them lead
(`adopt`, `still_waiting`). Pure logic, no I/O.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta

from relay.store import Unfinished


class Parking:
    """The parked messages of each conversation, head first.

    A head that does not come back by its deadline (the broker dead-lettered it, or its
    partition moved to another worker) is given up, so the conversation cannot stall. The
    grace is long: behind a deep backlog a delayed message takes minutes to come round
    again, and giving up on it too early would let the messages behind it overtake it.
    """

    def __init__(self, grace: float = 600.0, clock: Callable[[], float] = time.monotonic):
        self._queues: dict[str, list[str]] = {}
        self._delays: dict[str, float] = {}
        self._deadlines: dict[str, float] = {}
        # When each message sent to a delay queue is back (by the clock), if this worker sent it.
        self._back_at: dict[str, float] = {}
        # Conversations whose head is away in a delay queue (not merely listed first).
        self._away: set[str] = set()
        self.grace = grace
        self._clock = clock

    def wait_behind(self, conversation: str, message: str) -> float | None:
        """If `message` must wait behind its conversation's head: for how long.

        Until every message ahead of it is back from its delay queue. If they should all be
        back already (the one ahead is being tried right now), as long again as that has
        taken so far (at most the head's last delay): a quick delivery lets the list drain
        through the shortest delay queue, a slow one is not polled in a busy loop.
        """
        queue = self._queues.get(conversation)
        if queue and queue[0] != message and self._clock() > self._deadlines[conversation]:
            self._back_at.pop(queue.pop(0), None)  # the head is overdue: the next one leads
            self._deadlines[conversation] = self._clock() + self._delays[conversation] + self.grace
        if not queue or queue[0] == message:
            return None
        if message not in queue:
            queue.append(message)
        ahead = queue[: queue.index(message)]
        back = max((self._back_at[m] for m in ahead if m in self._back_at), default=None)
        if back is None or back > self._clock():
            return self._delays[conversation] if back is None else back - self._clock()
        return min(self._clock() - back, self._delays[conversation])

    def sent_away(self, conversation: str, message: str, delay: float) -> None:
        """`message` went to a delay queue of `delay` seconds (noted if it is parked)."""
        if message in self._queues.get(conversation, []):
            self._back_at[message] = self._clock() + delay

    def adopt(
        self, conversation: str, messages: list[str], delay: float, head_away: bool = True
    ) -> None:
        """The conversation's parking as the store shows it (every message not finished
        with, head first, the head due in `delay`), in place of what this worker remembered:
        that is stale once the partition was elsewhere, a head finished by another worker
        would hold the conversation until the grace ran out."""
        self.forget([conversation])
        if messages:
            self._queues[conversation] = list(messages)
            self._delays[conversation] = delay
            self._deadlines[conversation] = self._clock() + delay + self.grace
            if head_away:
                self._away.add(conversation)
                self._back_at[messages[0]] = self._clock() + delay

    def forget(self, conversations: Iterable[str]) -> None:
        """Drop these conversations' parking (their partition went to another worker)."""
        for conversation in conversations:
            for message in self._queues.get(conversation, []):
                self._back_at.pop(message, None)
            self._queues.pop(conversation, None)
            self._delays.pop(conversation, None)
            self._deadlines.pop(conversation, None)
            self._away.discard(conversation)

    def delay_head(self, conversation: str, message: str, delay: float) -> None:
        """`message` (the head, or a message of an unparked conversation) goes to a delay."""
        queue = self._queues.setdefault(conversation, [])
        if not queue or queue[0] != message:
            if message in queue:  # never twice: `done` takes out one
                queue.remove(message)
            queue.insert(0, message)
        self._delays[conversation] = delay
        self._deadlines[conversation] = self._clock() + delay + self.grace
        self._back_at[message] = self._clock() + delay
        self._away.add(conversation)

    def done(self, conversation: str, message: str) -> None:
        """`message` is finished for good: the next parked one becomes the head."""
        queue = self._queues.get(conversation)
        if queue and queue[0] == message:
            queue.pop(0)
        self._back_at.pop(message, None)
        if not queue:
            self.forget([conversation])

    def conversations(self) -> list[str]:
        """The conversations with parked messages."""
        return list(self._queues)

    def away(self) -> list[str]:
        """The conversations whose head waits in a delay queue (a retry, or a wait holding
        the order): their partition is better kept until it is back."""
        return [c for c in self._queues if c in self._away]

    def place(self, conversation: str, message: str) -> int:
        """How many messages of the conversation go before `message` (0: it leads)."""
        queue = self._queues.get(conversation, [])
        return queue.index(message) if message in queue else len(queue)

    def parked(self, conversation: str) -> list[str]:
        """The conversation's parked messages, head first."""
        return list(self._queues.get(conversation, []))


def still_waiting(
    unfinished: list[Unfinished], now: datetime, grace: float
) -> tuple[datetime, list[Unfinished]] | None:
    """Parking left by another worker (or by this one before a restart), as the store shows
    it: every earlier message not finished with, tried or not, head first, with the time the
    head is due (now for one never tried: it is on its way, parked or queued). A message whose
    retry is overdue by more than `grace` is given up, as `Parking` gives up a head."""
    horizon = now - timedelta(seconds=grace)
    waiting = [row for row in unfinished if row.retry_at is None or row.retry_at >= horizon]
    if not waiting:
        return None
    return waiting[0].retry_at or now, waiting
