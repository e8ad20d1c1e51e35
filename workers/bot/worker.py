"""The bot worker: takes inbound messages, runs the bot, stores and queues its replies.

Per message: check the store (the arbiter of what was accepted), run one bot turn, store
the turn's replies with their sequence numbers and the mark "handled" in one transaction,
publish them with confirms, and only then ack. A redelivered message whose replies are
stored is not shown to the bot again; its replies are (re)published if need be.

Order: each partition queue has a single active consumer, and within a worker the messages
of one conversation run one at a time in arrival order (`Lanes`). A message whose bot fails
waits in a delay queue; the messages behind it wait with it (`Parking`).
"""

from __future__ import annotations

import asyncio
import enum
import json
import time
from dataclasses import dataclass

import structlog
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue
from pydantic import ValidationError

from relay.auth import reply_token
from relay.broker import BROKER_ERRORS, Broker, BrokerUnavailable
from relay.lanes import Lanes
from relay.metrics import Metrics
from relay.models import InboundEnvelope
from relay.parking import Parking
from relay.replies import ReplyPublisher
from relay.settings import Settings
from relay.store import ConversationRecord, InboundState, Store, StoreError
from workers.bot.adapters.base import BotAdapter, BotContext, BotFailure

log = structlog.get_logger(__name__)

ATTEMPT_HEADER = "x-relay-attempt"
REPLY_TOKEN_SECONDS = 24 * 3600


class Outcome(enum.Enum):
    """What becomes of a delivery; `settle` maps each to broker actions in one place."""

    DONE = "done"  # ack
    DROP = "drop"  # ack: never accepted (its row does not exist)
    RETRY = "retry"  # to a delay queue with attempt + 1, then ack
    WAIT = "wait"  # to a delay queue, attempt unchanged (parked, or not yet settled)
    DEAD = "dead"  # to the dead-letter queue with the reason, then ack
    AGAIN = "again"  # nack with requeue: the store or broker is away right now


@dataclass(frozen=True)
class Verdict:
    """An outcome with what it needs."""

    outcome: Outcome
    delay: float = 0.0
    reason: str = ""


class BotWorker:
    """Consumes every inbound partition; one instance per process."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        broker: Broker,
        adapter: BotAdapter,
        metrics: Metrics,
    ) -> None:
        self._settings = settings
        self._store = store
        self._broker = broker
        self._adapter = adapter
        self._metrics = metrics
        self._replies = ReplyPublisher(store, broker, metrics)
        self._lanes: Lanes[AbstractIncomingMessage] = Lanes(self._process, settings.bot_concurrency)
        self._parking = Parking()
        self._delays = sorted(settings.bot_retry_delays)
        self._channel: AbstractChannel | None = None
        self._consumers: list[asyncio.Task[None]] = []

    @property
    def metrics(self) -> Metrics:
        """The worker's metrics (what it consumed, by outcome)."""
        return self._metrics

    async def start(self) -> None:
        """Start consuming every inbound partition (waits for the broker connection)."""
        await self._broker.wait_connected()
        connection = self._broker.connection
        assert connection is not None
        self._channel = await connection.channel()
        await self._channel.set_qos(prefetch_count=self._settings.bot_concurrency * 2)
        topology = self._broker.topology
        for partition in range(topology.partitions):
            queue = await self._channel.get_queue(topology.queue("inbound", partition))
            self._consumers.append(asyncio.create_task(self._consume(queue)))
        log.info("bot_worker_started", partitions=topology.partitions)

    async def _consume(self, queue: AbstractQueue) -> None:
        # The iterator yields in delivery order; `submit` fixes that order synchronously.
        async with queue.iterator() as messages:
            async for message in messages:
                self._lanes.submit(_lane_key(message), message)

    async def stop(self, grace: float) -> None:
        """Stop taking messages, finish those in hand (bounded), return the rest."""
        for consumer in self._consumers:
            consumer.cancel()
        await asyncio.gather(*self._consumers, return_exceptions=True)
        finished = await self._lanes.drain(grace)
        if self._channel is not None and not self._channel.is_closed:
            # Closing returns every unacked message to its queue, in order.
            await self._channel.close()
        log.info("bot_worker_stopped", finished=finished)

    async def _process(self, message: AbstractIncomingMessage) -> None:
        envelope = _parse(message)
        with structlog.contextvars.bound_contextvars(
            message_id=message.message_id,
            conversation_id=envelope.bundle.conversation.id if envelope else None,
            attempt=_attempt(message),
        ):
            verdict = await self._decide(message, envelope)
            await self._settle(message, envelope, verdict)

    async def _decide(
        self, message: AbstractIncomingMessage, envelope: InboundEnvelope | None
    ) -> Verdict:
        if envelope is None:
            return Verdict(Outcome.DEAD, reason="not a valid inbound envelope")
        conversation, message_id = envelope.bundle.conversation.id, envelope.bundle.message.id
        delay = self._parking.wait_behind(conversation, message_id)
        if delay is not None:
            return Verdict(Outcome.WAIT, delay=delay)
        try:
            return await self._turn_or_republish(envelope, _attempt(message))
        except (StoreError, BrokerUnavailable) as error:
            log.warning("bot_turn_interrupted", error=str(error))
            return Verdict(Outcome.AGAIN, reason=str(error))

    async def _turn_or_republish(self, envelope: InboundEnvelope, attempt: int) -> Verdict:
        message_id = envelope.bundle.message.id
        state = await self._settled_state(message_id)
        if state == "missing":
            return Verdict(Outcome.DROP, reason="never accepted")
        if state == "pending":
            # Still pending after a lease: its ingress died; the outbox will settle it.
            return Verdict(Outcome.WAIT, delay=self._delays[0], reason="not yet accepted")
        if state == "queued":
            try:
                replies = await self._run_turn(envelope)
            except BotFailure as failure:
                return self._failed(failure, attempt)
        else:
            replies = []  # handled before: the stored replies are all there is
        records = await self._store.record_replies(message_id, replies)
        await self._replies.publish(records)
        return Verdict(Outcome.DONE)

    async def _settled_state(self, message_id: str) -> InboundState:
        """The message's state once the ingress has settled it.

        The worker often gets a message in the moment between the broker's confirm and the
        ingress marking it queued. Waiting here, in the conversation's lane, keeps the
        order; a delay queue would let later messages overtake it.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._settings.outbox_lease + self._settings.publish_timeout
        pause = 0.005
        state = await self._store.inbound_state(message_id)
        while state == "pending" and loop.time() < deadline:
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.25)
            state = await self._store.inbound_state(message_id)
        return state

    def _failed(self, failure: BotFailure, attempt: int) -> Verdict:
        self._metrics.bot_failures.inc()
        if failure.permanent or attempt >= len(self._delays):
            return Verdict(Outcome.DEAD, reason=str(failure))
        return Verdict(Outcome.RETRY, delay=self._delays[attempt], reason=str(failure))

    async def _run_turn(self, envelope: InboundEnvelope) -> list[tuple[str, dict[str, object]]]:
        context = await self._context(envelope)
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self._settings.bot_timeout):
                await self._adapter.handle(envelope, context)
        except TimeoutError as error:
            raise BotFailure(f"the bot took longer than {self._settings.bot_timeout}s") from error
        except BotFailure:
            raise
        except Exception as error:
            log.exception("bot_error")
            raise BotFailure(f"the bot raised {error!r}") from error
        finally:
            self._metrics.bot_latency.observe(time.perf_counter() - started)
        return context.finish()

    async def _context(self, envelope: InboundEnvelope) -> BotContext:
        bundle = envelope.bundle
        conversation = ConversationRecord(
            id=bundle.conversation.id,
            integration_id=envelope.integrationId,
            external_id=bundle.conversation.tags.id,
            user_id=bundle.user.id,
        )
        secret = await self._store.bot_secret(envelope.integrationId)
        token = reply_token(secret, conversation.id, int(time.time()) + REPLY_TOKEN_SECONDS)
        url = f"{self._settings.public_base_url}/bot/conversations/{conversation.id}/messages"

        async def late(type_: str, payload: dict[str, object]) -> None:
            await self._replies.push(conversation, type_, payload)

        return BotContext(envelope, url, token, late)

    async def _settle(
        self,
        message: AbstractIncomingMessage,
        envelope: InboundEnvelope | None,
        verdict: Verdict,
    ) -> None:
        """The one place a verdict becomes broker actions."""
        outcome = verdict.outcome
        self._metrics.consumed.labels("inbound", outcome.value).inc()
        if outcome is Outcome.AGAIN:
            await asyncio.sleep(1)  # the store or broker is away: do not spin on it
            await _quietly(message.nack(requeue=True))
            return
        try:
            await self._forward(message, envelope, verdict)
        except BrokerUnavailable as error:
            log.warning("settle_failed", outcome=outcome.value, error=str(error))
            await _quietly(message.nack(requeue=True))
            return
        await _quietly(message.ack())
        if outcome is not Outcome.WAIT:
            self._track_parking(envelope, verdict)
        log.info("inbound_settled", outcome=outcome.value, reason=verdict.reason or None)

    async def _forward(
        self,
        message: AbstractIncomingMessage,
        envelope: InboundEnvelope | None,
        verdict: Verdict,
    ) -> None:
        """Publish the message where the verdict sends it (nothing for done and drop)."""
        topology = self._broker.topology
        attempt = _attempt(message)
        if verdict.outcome in (Outcome.RETRY, Outcome.WAIT):
            next_attempt = attempt + 1 if verdict.outcome is Outcome.RETRY else attempt
            await self._broker.publish_to(
                topology.delay_exchange("inbound", verdict.delay),
                message.routing_key or "",  # the partition: it returns to its own queue
                message.body,
                message_id=message.message_id or "",
                headers={ATTEMPT_HEADER: next_attempt},
            )
        elif verdict.outcome is Outcome.DEAD:
            await self._broker.publish_to(
                topology.dead_exchange(),
                "inbound",
                message.body,
                message_id=message.message_id or "",
                headers={
                    "x-relay-reason": verdict.reason[:1000],
                    ATTEMPT_HEADER: attempt,
                    "x-relay-dead-at": str(int(time.time())),
                },
            )

    def _track_parking(self, envelope: InboundEnvelope | None, verdict: Verdict) -> None:
        if envelope is None:
            return
        conversation, message_id = envelope.bundle.conversation.id, envelope.bundle.message.id
        if verdict.outcome is Outcome.RETRY:
            self._parking.delay_head(conversation, message_id, verdict.delay)
        else:
            self._parking.done(conversation, message_id)


def _parse(message: AbstractIncomingMessage) -> InboundEnvelope | None:
    try:
        return InboundEnvelope.model_validate_json(message.body)
    except ValidationError:
        log.error("invalid_envelope", message_id=message.message_id)
        return None


def _lane_key(message: AbstractIncomingMessage) -> str:
    """The conversation of a delivery (its own lane if it cannot be read)."""
    try:
        return str(json.loads(message.body)["bundle"]["conversation"]["id"])
    except (ValueError, KeyError, TypeError):
        return f"unreadable:{message.message_id}"


def _attempt(message: AbstractIncomingMessage) -> int:
    value = (message.headers or {}).get(ATTEMPT_HEADER, 0)
    return value if isinstance(value, int) and value >= 0 else 0


async def _quietly(action: object) -> None:
    """Ack or nack; after a reconnect the old channel's tags are void and the broker
    redelivers, which the handler's idempotency absorbs."""
    try:
        await action  # type: ignore[misc]
    except BROKER_ERRORS as error:
        log.warning("ack_failed", error=str(error))
