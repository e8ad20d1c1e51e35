"""One message's way from its conversation's lane to its settling.

A message that is not an envelope is dead. On meeting its conversation the worker adopts
the parking the store shows (`relay.pipeline.adoption`); a message behind a parked one
waits, in memory if its turn is near (`relay.pipeline.waiting`), else in a delay queue;
any other goes to the stage's handler, whose verdict the `Settler` carries out. Whatever
goes wrong, the lane goes on: the message goes back to its queue.
"""

from __future__ import annotations

import asyncio
from typing import Generic, TypeVar

import structlog
from aio_pika.abc import AbstractIncomingMessage
from pydantic import BaseModel

from relay.aio import cancelled_from_outside
from relay.metrics import Metrics
from relay.pipeline.adoption import Adoption
from relay.pipeline.handler import StageHandler
from relay.pipeline.parking import Parking
from relay.pipeline.settle import Outcome, Settler, Verdict, attempt_of, quietly, stale
from relay.pipeline.subscription import Delivery
from relay.pipeline.waiting import WaitingRoom
from relay.tracing import OUTCOME, Tracing, ids, note
from relay.wire import utcnow

log = structlog.get_logger(__name__)

E = TypeVar("E", bound=BaseModel)  # the stage's envelope model


class Handling(Generic[E]):
    """Handles each delivery a lane gives it (`process`): a verdict, settled."""

    def __init__(
        self,
        handler: StageHandler[E],
        metrics: Metrics,
        parking: Parking,
        waiting_room: WaitingRoom[Delivery[E]],
        adoption: Adoption[E],
        settler: Settler,
        tracing: Tracing,
    ) -> None:
        self._handler = handler
        self._metrics = metrics
        self._parking = parking
        self._waiting_room = waiting_room
        self._adoption = adoption
        self._settler = settler
        self._tracing = tracing

    async def process(self, delivery: Delivery[E]) -> None:
        """Handle one delivery; never fail, so its lane goes on."""
        delivery.subscription.started(delivery.message)
        try:
            await self._handle(delivery)
        except Exception:
            # Never let one message's failure end its lane: the messages behind it would be
            # stranded unacked. This one goes back to its queue.
            log.exception("message_handling_failed", message_id=delivery.message.message_id)
            await quietly(delivery.subscription.acks.nack(delivery.message))
        except asyncio.CancelledError:
            if cancelled_from_outside():
                raise
            # A future aiormq cancelled as its connection closed: not the end of the lane.
            log.error("message_handling_cancelled", message_id=delivery.message.message_id)
            await quietly(delivery.subscription.acks.nack(delivery.message))
        finally:
            delivery.subscription.done()

    async def _handle(self, delivery: Delivery[E]) -> None:
        message, envelope = delivery.message, delivery.envelope
        stage = self._handler.stage
        if stale(message):
            # Delivered on a channel that has since died (a broker restart): the broker has
            # it back and redelivers it. Handling it now could overtake that redelivery.
            log.info("stale_delivery_skipped", stage=stage, message_id=message.message_id)
            return
        conversation, message_key = self._handler.keys(envelope) if envelope else (None, None)
        attempt = attempt_of(message)
        traced = ids(None, conversation, message.message_id, attempt)
        with (
            structlog.contextvars.bound_contextvars(
                message_id=message.message_id, conversation_id=conversation, attempt=attempt
            ),
            # The bot turn or the delivery attempt, its parent in the message's headers; it
            # spans the settling too, so what that publishes (a retry, a dead letter) and
            # what the handler publishes (the replies) carry its context on.
            self._tracing.consumed(stage, message.headers, traced),
        ):
            if envelope is None:
                verdict: Verdict | None = await self._dead_unread(message)
            else:
                age = (utcnow() - self._handler.created_at(envelope)).total_seconds()
                self._metrics.message_age.labels(stage).observe(max(age, 0.0))
                verdict = await self._verdict(
                    delivery, envelope, conversation or "", message_key or ""
                )
            if verdict is not None:
                note({OUTCOME: verdict.outcome.value})
                await self._settler.settle(
                    delivery.subscription.acks, message, conversation, message_key, verdict
                )

    async def _verdict(
        self, delivery: Delivery[E], envelope: E, conversation: str, message_key: str
    ) -> Verdict | None:
        """What becomes of a readable message (None: it waits in memory, unsettled)."""
        if not await self._adoption.recall(delivery.subscription, conversation, envelope):
            return self._adoption.unrecalled(conversation, message_key)
        wait = self._parking.wait_behind(conversation, message_key)
        if wait is None:
            return await self._decide_safely(delivery.message, envelope)
        if self._wait_in_memory(delivery, conversation, message_key, wait):
            return None
        return self._adoption.parked_for(wait)

    def _wait_in_memory(
        self, delivery: Delivery[E], conversation: str, message_key: str, wait: float
    ) -> bool:
        """Keep a parked message whose turn is near, unacked, rather than bounce it through
        a delay queue (False: it goes to one; so it does once the worker stops, as the
        waiting room is closed then)."""
        subscription = delivery.subscription
        if subscription.holding:
            return False
        place = self._parking.place(conversation, message_key)
        return self._waiting_room.hold(
            conversation, subscription.partition, subscription, delivery, wait, place
        )

    async def _dead_unread(self, message: AbstractIncomingMessage) -> Verdict:
        """A message that is not a valid envelope: dead-lettered, and dead in the store."""
        try:
            await self._handler.unreadable(message.message_id or "")
        except Exception as error:
            return Verdict(Outcome.AGAIN, reason=f"{type(error).__name__}: {error}")
        return Verdict(Outcome.DEAD, reason="not a valid envelope")

    async def _decide_safely(self, message: AbstractIncomingMessage, envelope: E) -> Verdict:
        try:
            return await self._handler.decide(message, envelope)
        except Exception as error:
            # A bug must not strand the message unacked in a dead lane: it is tried again.
            log.exception("decide_failed")
            return Verdict(Outcome.AGAIN, reason=f"{type(error).__name__}: {error}")
