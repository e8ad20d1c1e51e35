"""Settling: the one place a message's verdict becomes broker actions.

A stage handler's `decide` says what becomes of a message as data (a `Verdict`: an
`Outcome`, with the wait, the reason, a rewritten body, headers); `Settler.settle` publishes
it to a delay or dead-letter queue with a confirm, and only then acks it, keeping the
conversation's parking in step (and waking what waits in memory behind it).
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass, field
from typing import Any

import structlog
from aio_pika.abc import AbstractIncomingMessage
from aiormq.exceptions import ChannelInvalidStateError

from relay.aio import cancelled_from_outside
from relay.broker import BROKER_ERRORS, Broker, BrokerUnavailable, StageName
from relay.broker.topology import Topology
from relay.metrics import Metrics
from relay.pipeline.acks import Acks
from relay.pipeline.parking import Parking
from relay.pipeline.waiting import WaitingRoom
from relay.wire import ATTEMPT_HEADER, DEAD_AT_HEADER, REASON_HEADER

log = structlog.get_logger(__name__)

ACK_TIMEOUT = 5.0  # seconds an ack or nack may take before its connection counts as gone


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


class Settler:
    """Turns each message's verdict into broker actions, for one stage's partition queues
    (those of `topology`), keeping the stage's `parking` and `waiting_room` in step."""

    def __init__(
        self,
        broker: Broker,
        topology: Topology,
        stage: StageName,
        metrics: Metrics,
        parking: Parking,
        waiting_room: WaitingRoom[Any],
    ) -> None:
        self._broker = broker
        self._topology = topology
        self._stage = stage
        self._metrics = metrics
        self._parking = parking
        self._waiting_room = waiting_room

    async def settle(
        self,
        acks: Acks,
        message: AbstractIncomingMessage,
        conversation: str | None,
        message_key: str | None,
        verdict: Verdict,
    ) -> None:
        """The one place a verdict becomes broker actions (the ack through `acks`, its
        channel's)."""
        self._metrics.consumed.labels(self._stage, verdict.outcome.value).inc()
        if verdict.outcome is Outcome.AGAIN:
            # The store is away for a moment: wait in the broker, holding the conversation's
            # order (a requeue would let the next message overtake, and count towards the
            # queue's delivery limit).
            delays = self._topology.stage_delays(self._stage)
            verdict = Verdict(
                Outcome.WAIT,
                delay=delays[0] if delays else 1.0,
                reason=verdict.reason,
                holds_order=True,
            )
        outcome = verdict.outcome
        if not await self._forward_holding_order(message, verdict):
            return
        await quietly(acks.ack(message))
        if conversation and message_key:
            self._track_parking(conversation, message_key, verdict)
        log.info(
            "message_settled",
            stage=self._stage,
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
        topology = self._topology
        body = verdict.body if verdict.body is not None else message.body
        attempt = attempt_of(message)
        if verdict.outcome in (Outcome.RETRY, Outcome.WAIT):
            next_attempt = attempt + 1 if verdict.outcome is Outcome.RETRY else attempt
            await self._broker.publish_to(
                topology.delay_exchange(self._stage, verdict.delay),
                message.routing_key or "",  # the partition: it returns to its own queue
                body,
                message_id=message.message_id or "",
                headers={**verdict.headers, ATTEMPT_HEADER: next_attempt},
            )
        elif verdict.outcome is Outcome.DEAD:
            await dead_letter(
                self._broker,
                self._stage,
                body,
                message.message_id or "",
                verdict.reason,
                attempt=attempt,
                headers=verdict.headers,
            )

    def _track_parking(self, conversation: str, message_key: str, verdict: Verdict) -> None:
        if verdict.outcome is Outcome.RETRY or verdict.holds_order:
            self._parking.delay_head(conversation, message_key, verdict.delay)
        elif verdict.outcome is Outcome.WAIT:
            self._parking.sent_away(conversation, message_key, verdict.delay)
            return
        elif verdict.outcome in (Outcome.DONE, Outcome.DROP, Outcome.DEAD):
            self._parking.done(conversation, message_key)
        # The head went on, or away: what waits in memory behind it looks again (the next
        # one goes now; the others wait for it, or for the head in a delay queue).
        self._waiting_room.release(conversation)


async def dead_letter(
    broker: Broker,
    stage: StageName,
    body: bytes,
    message_id: str,
    reason: str,
    attempt: int = 0,
    headers: Mapping[str, str | int] | None = None,
) -> None:
    """Put a message in its stage's dead-letter queue with why, when and on which attempt
    it died, and wait for the confirm (BrokerUnavailable if not)."""
    await broker.publish_to(
        broker.topology.dead_exchange(),  # one per prefix, whatever the partition count
        stage,
        body,
        message_id=message_id,
        headers={
            ATTEMPT_HEADER: attempt,
            REASON_HEADER: reason[:1000],
            DEAD_AT_HEADER: int(time.time()),
            **(headers or {}),
        },
    )


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


async def quietly(action: Awaitable[None]) -> None:
    """Ack or nack; after a reconnect the old channel's tags are void and the broker
    redelivers, which the handlers' idempotency absorbs.

    Bounded: an ack written while its connection dies can wait for aiormq's write queue,
    which nobody drains any more, for ever, and hold its conversation's lane with it.
    """
    try:
        async with asyncio.timeout(ACK_TIMEOUT):
            await action
    except TimeoutError:
        log.warning("ack_failed", error=f"no answer within {ACK_TIMEOUT}s: its connection is gone")
    except BROKER_ERRORS as error:
        log.warning("ack_failed", error=str(error))
    except asyncio.CancelledError:
        if cancelled_from_outside():
            raise
        log.warning("ack_failed", error="the connection closed")
