"""Adopting the parking another worker left (or this one, before a restart).

A conversation's parking (`relay.pipeline.parking`) is in the memory of the worker that
holds its partition. The first time a worker meets a conversation through a subscription,
it asks the store for the conversation's messages not finished with and lets them lead:
the messages behind them wait as parked. Until that look-up answers, a message waits. A
stage whose messages are numbered per conversation asks again when a number is skipped: the
missing message is still on its way (reordered by the broker, or published late) and leads.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Generic, TypeVar

import structlog
from pydantic import BaseModel

from relay.pipeline.delays import first_hop
from relay.pipeline.handler import StageHandler
from relay.pipeline.parking import Parking, still_waiting
from relay.pipeline.settle import Outcome, Verdict
from relay.pipeline.subscription import Subscription
from relay.wire import utcnow

log = structlog.get_logger(__name__)

E = TypeVar("E", bound=BaseModel)  # the stage's envelope model


class Adoption(Generic[E]):
    """Finds, on meeting a conversation, the parking it must keep: asks the stage's
    `handler` what is unfinished, and parks in `parking`; waits are spent in the stage's
    delay queues (`delays`, in seconds)."""

    def __init__(self, handler: StageHandler[E], parking: Parking, delays: Sequence[float]) -> None:
        self._handler = handler
        self._parking = parking
        self._delays = delays

    async def recall(self, subscription: Subscription, conversation: str, envelope: E) -> bool:
        """On meeting a conversation, adopt the parking another worker left (False: it
        could not be looked up, and the message waits)."""
        if not subscription.first_sight(conversation, self._handler.sequence(envelope)):
            return True
        try:
            unfinished = await self._handler.unfinished(envelope)
        except Exception as error:
            subscription.unsee(conversation)
            log.warning("parking_lookup_failed", error=f"{type(error).__name__}: {error}")
            return False
        now = utcnow()
        due, waiting = still_waiting(unfinished, now, self._parking.grace) or (now, [])
        keys = [self._handler.parking_key(row.message_id) for row in waiting]
        own = self._handler.keys(envelope)[1]
        if keys == [own]:
            keys = []  # only this message: nothing to wait for
        remaining = (due - now).total_seconds()
        if keys:
            log.info("parking_adopted", unfinished=len(keys), due_in=round(remaining, 3))
        # Led by this very message, the list only orders what comes after it: nothing is
        # away, and the partition may be handed over meanwhile (the next holder asks too).
        head_away = bool(keys) and keys[0] != own
        self._parking.adopt(conversation, keys, first_hop(remaining, self._delays), head_away)
        return True

    def unrecalled(self, conversation: str, message_key: str) -> Verdict:
        """The parking look-up failed: a message behind a parked one waits as parked; only
        the head (or a message of an unparked conversation) waits holding the order."""
        wait = self._parking.wait_behind(conversation, message_key)
        if wait is None:
            return Verdict(Outcome.AGAIN, reason="the parking look-up failed")
        return self.parked_for(wait)

    def parked_for(self, wait: float) -> Verdict:
        """A parked message's wait of `wait` seconds, in the broker."""
        return Verdict(Outcome.WAIT, delay=first_hop(wait, self._delays), reason="parked")
