"""Adopting the parking another worker left (or this one, before a restart).

A conversation's parking (`relay.pipeline.parking`) is in the memory of the worker that
holds its partition. The first time a worker meets a conversation through a subscription,
it asks the store for the conversation's messages not finished with and lets them lead:
the messages behind them wait as parked. Until that look-up answers, a message waits. A
stage whose messages are numbered per conversation asks again when a number is skipped: the
missing message is still on its way (reordered by the broker, or published late) and leads.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Generic, TypeVar

import structlog
from pydantic import BaseModel

from relay.broker import Broker, StageName
from relay.broker.topology import Topology
from relay.pipeline.delays import first_hop
from relay.pipeline.parking import Parking, still_waiting
from relay.pipeline.settle import Outcome, Verdict
from relay.pipeline.subscription import Subscription
from relay.store import Unfinished
from relay.wire import utcnow

log = structlog.get_logger(__name__)

E = TypeVar("E", bound=BaseModel)  # the stage's envelope model


class ParkingAdoption(ABC, Generic[E]):
    """Finds, on meeting a conversation, the parking it must keep (a part of `StageWorker`,
    whose subclasses give the hooks: `keys`, `unfinished`, `parking_key`)."""

    stage: StageName
    parking: Parking
    _broker: Broker
    topology: Topology  # the partition count this worker consumes, and its queues

    @abstractmethod
    def keys(self, envelope: E) -> tuple[str, str]:
        """(conversation, message) ids of an envelope, for order and parking."""

    @abstractmethod
    async def unfinished(self, envelope: E) -> list[Unfinished]:
        """The conversation's messages not finished with (this one among them, unless it
        was), oldest first: asked the first time this worker meets the conversation, to find
        parking left by another worker, or by itself before a restart."""

    def parking_key(self, message_id: str) -> str:
        """The parking key (see `keys`) of a stored message."""
        return message_id

    def sequence(self, envelope: E) -> int | None:
        """The message's number in its conversation, if the stage numbers them without gaps
        (a skipped number sends the worker to the store again), else None."""
        return None

    async def _recall_parking(
        self, subscription: Subscription, conversation: str, envelope: E
    ) -> bool:
        """On meeting a conversation, adopt the parking another worker left (False: it
        could not be looked up, and the message waits)."""
        if not subscription.first_sight(conversation, self.sequence(envelope)):
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
        delays = self.topology.stage_delays(self.stage)
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
        return None if wait is None else self._parked_for(wait)

    def _parked_for(self, wait: float) -> Verdict:
        """A parked message's wait of `wait` seconds, in the broker."""
        delay = first_hop(wait, self.topology.stage_delays(self.stage))
        return Verdict(Outcome.WAIT, delay=delay, reason="parked")
