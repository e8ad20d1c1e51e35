"""The keeper of a stage's dead letters: takes each one off the stage's dead-letter queue
into the store (`relay.pipeline.dlq`), where it is listed, replayed and purged.

A letter is acked only once the store has it; while the store is away the keeper holds it
and tries again, rather than giving it back: a message given back counts towards the
queue's delivery limit on RabbitMQ 4. Every worker service of the stage runs one (they
share the queue as competing consumers: the store's upsert makes a letter carried twice
one row).

A letter the broker dead-lettered (past a partition queue's delivery limit) was told to no
one on its way there: a keeper given a `Telling` tells of it once it is kept (the delivery
worker's tells the integration's operations URL). Those a stage dead-lettered itself it told
of when it gave them up.
"""

from __future__ import annotations

import asyncio
import time
from typing import Protocol

import structlog
from aio_pika.abc import AbstractIncomingMessage

from relay.aio import cancel_and_wait
from relay.broker import CONNECTION_ERRORS, Broker, BrokerUnavailable, StageName
from relay.broker.consuming import consuming
from relay.metrics import Metrics
from relay.pipeline.dlq import read
from relay.retry import keep_trying, pauses
from relay.store import DeadLetter, DeadLetterStore, StoreError
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


class Telling(Protocol):
    """Who hears of a letter the broker dead-lettered."""

    async def broker_dead(self, message: AbstractIncomingMessage, letter: DeadLetter) -> None:
        """Tell of `letter` (read from `message`), kept in the store; BrokerUnavailable if
        what tells of it could not be queued."""


class Keeper:
    """Keeps one stage's dead letters while started (telling `telling` of those the broker
    dead-lettered)."""

    def __init__(
        self,
        store: DeadLetterStore,
        broker: Broker,
        stage: StageName,
        metrics: Metrics,
        telling: Telling | None = None,
    ) -> None:
        self._store = store
        self._broker = broker
        self._stage = stage
        self._metrics = metrics
        self._telling = telling
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
        cause = cause_of(message)
        if cause == "broker":
            # Told before the ack: a keeper stopped in between leaves the letter to be kept
            # and told again, under the same event id (its receiver deduplicates).
            await self._tell(message, letter)
        await message.ack()
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

    async def _tell(self, message: AbstractIncomingMessage, letter: DeadLetter) -> None:
        if self._telling is None:
            return
        try:
            await self._telling.broker_dead(message, letter)
        except BrokerUnavailable as error:
            # The letter is kept all the same (the store has it): only its event is lost,
            # as any event is while the broker is away.
            log.warning(
                "dead_letter_not_told",
                **{ID_FIELD[self._stage]: letter.id},
                integration_id=letter.integration_id,
                error=str(error),
            )
