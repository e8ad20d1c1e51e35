"""The keeper of a stage's dead letters: takes each one off the stage's dead-letter queue
into the store (`relay.pipeline.dlq`), where it is listed, replayed and purged.

A letter is acked only once the store has it; while the store is away the keeper holds it
and tries again, rather than giving it back: a message given back counts towards the
queue's delivery limit on RabbitMQ 4. Every worker service of the stage runs one (they
share the queue as competing consumers: the store's upsert makes a letter carried twice
one row).
"""

from __future__ import annotations

import asyncio
import time

import structlog
from aio_pika.abc import AbstractIncomingMessage

from relay.aio import cancel_and_wait
from relay.broker import CONNECTION_ERRORS, Broker, StageName
from relay.broker.consuming import consuming
from relay.metrics import Metrics
from relay.pipeline.dlq import read
from relay.retry import keep_trying, pauses
from relay.store import DeadLetterStore, StoreError
from relay.wire import REASON_HEADER

log = structlog.get_logger(__name__)

# Letters in hand at once: the store takes them one by one; dead letters come rarely.
PREFETCH = 32

# A dead inbound message is known by its relay message id, a dead response by its delivery.
ID_FIELD: dict[StageName, str] = {"inbound": "message_id", "outbound": "delivery_id"}


def cause_of(message: AbstractIncomingMessage) -> str:
    """`relay` for a letter a stage gave up on (with its own reason), else `broker` (the
    broker dead-lettered it: past its delivery limit)."""
    return "relay" if REASON_HEADER in (message.headers or {}) else "broker"


class Keeper:
    """Keeps one stage's dead letters while started."""

    def __init__(
        self, store: DeadLetterStore, broker: Broker, stage: StageName, metrics: Metrics
    ) -> None:
        self._store = store
        self._broker = broker
        self._stage = stage
        self._metrics = metrics
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(
            keep_trying(self._keep_forever, CONNECTION_ERRORS, "dead_letter_keeper_failed"),
            name=f"dead-letter-keeper-{self._stage}",
        )

    async def stop(self) -> None:
        """Stop; a letter in hand but not kept goes back to the queue with the channel."""
        task, self._task = self._task, None
        await cancel_and_wait(task)

    async def _keep_forever(self) -> None:
        queue = self._broker.topology.dead_queue(self._stage)
        async with consuming(self._broker, queue, PREFETCH) as messages:
            async for message in messages:
                await self._keep(message)

    async def _keep(self, message: AbstractIncomingMessage) -> None:
        letter = read(self._stage, message, time.time())
        for delay in pauses(0.2, 10.0):
            try:
                await self._store.keep_dead_letter(letter)
                break
            except StoreError as error:
                log.warning("dead_letter_keep_failed", error=str(error), retry_in=delay)
            await asyncio.sleep(delay)
        await message.ack()
        cause = cause_of(message)
        self._metrics.dead_letters_kept.labels(self._stage, cause).inc()
        log.info(
            "dead_letter_kept",
            **{ID_FIELD[self._stage]: letter.id},
            stage=self._stage,
            integration_id=letter.integration_id,
            conversation_id=letter.conversation_id,
            reason=letter.reason,
            cause=cause,
        )
