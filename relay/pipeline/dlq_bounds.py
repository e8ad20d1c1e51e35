"""Bounds on the dead-letter queues: an age and a length, enforced from each queue's head by
the janitor (`relay.service.janitor`).

Not the broker's own bounds: a TTL or `x-max-length` would drop dead letters silently, and
a quorum queue's arguments cannot change once it exists. Here each dead letter that goes is
counted (`relay_dead_letters_expired_total{stage,reason}`) and logged with its ids
(`dead_letter_expired`) before it is acked; the first one young enough, with the queue short
enough, ends the pass and goes back to the head unacked (the channel's close returns it).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime

import structlog
from aio_pika.abc import AbstractConnection, AbstractIncomingMessage

from relay.broker import STAGES, StageName, Topology
from relay.metrics import Metrics
from relay.pipeline.dlq import DeadLetter, read

log = structlog.get_logger(__name__)

# A dead inbound message is known by its relay message id, a dead response by its delivery.
_ID_FIELD: dict[StageName, str] = {"inbound": "message_id", "outbound": "delivery_id"}


@dataclass(frozen=True)
class Bounds:
    """How long a dead letter is kept and how many a stage keeps (0: no bound)."""

    max_age: float  # seconds since it was dead-lettered
    max_length: int

    def excess(self, count: int) -> int:
        """How many of `count` dead letters are beyond the length bound."""
        return max(0, count - self.max_length) if self.max_length else 0

    def reason(self, age: float | None, over_length: bool) -> str | None:
        """Why a dead letter of that age (None: unknown) goes, or None if it stays."""
        if self.max_age and age is not None and age > self.max_age:
            return "age"
        return "length" if over_length else None


async def enforce(
    connection: AbstractConnection, topology: Topology, bounds: Bounds, metrics: Metrics
) -> dict[StageName, int]:
    """Expire the dead letters beyond the bounds in each stage; how many, by stage."""
    return {
        stage: await _trim(connection, topology.dead_queue(stage), stage, bounds, metrics)
        for stage in STAGES
    }


async def _trim(
    connection: AbstractConnection, name: str, stage: StageName, bounds: Bounds, metrics: Metrics
) -> int:
    channel = await connection.channel()
    try:
        queue = await channel.declare_queue(name, passive=True)
        count = queue.declaration_result.message_count or 0
        excess = bounds.excess(count)
        if not count or not (excess or bounds.max_age):
            return 0  # nothing taken off the queue, even for a moment
        expired, now = 0, time.time()
        while (message := await queue.get(no_ack=False, fail=False)) is not None:
            letter = read(stage, message)
            age = _age(letter, message, now)
            reason = bounds.reason(age, over_length=expired < excess)
            if reason is None:
                break
            _count(letter, reason, age, metrics)
            await message.ack()
            expired += 1
        return expired
    finally:
        await channel.close()  # returns the one that ended the pass, unacked


def _age(letter: DeadLetter, message: AbstractIncomingMessage, now: float) -> float | None:
    """Seconds since the message was dead-lettered: Relay's own header, else the broker's
    (a message over its delivery limit), else when it was published; None if unknown."""
    if letter.dead_at is not None:
        return now - letter.dead_at
    deaths = (message.headers or {}).get("x-death")
    first = deaths[0] if isinstance(deaths, list) and deaths else None
    died = first.get("time") if isinstance(first, dict) else None
    if isinstance(died, datetime):
        return now - died.timestamp()
    return now - message.timestamp.timestamp() if message.timestamp else None


def _count(letter: DeadLetter, reason: str, age: float | None, metrics: Metrics) -> None:
    metrics.dead_letters_expired.labels(letter.stage, reason).inc()
    log.warning(
        "dead_letter_expired",
        **{_ID_FIELD[letter.stage]: letter.id},
        stage=letter.stage,
        integration_id=letter.integration_id,
        conversation_id=letter.conversation_id,
        reason=reason,
        dead_reason=letter.reason,
        age=None if age is None else round(age),
    )
