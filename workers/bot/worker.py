"""The bot worker: takes inbound messages, runs the bot, stores and queues its replies.

`BotTurns` is the inbound stage's handler (`relay.pipeline.handler.StageHandler`);
`bot_worker` gives it to a `StageWorker`, which consumes the inbound partitions in order.

Per message: check the store (the arbiter of what was accepted), run one bot turn, store
the turn's replies with their sequence numbers and the mark "handled" in one transaction,
publish them with confirms, and only then ack. A redelivered message whose replies are
stored is not shown to the bot again; its replies are (re)published if need be.

Order: each partition queue has a single active consumer, and within a worker the messages
of one conversation run one at a time in arrival order (`Lanes`). A message whose bot fails
waits in a delay queue; the messages behind it wait with it (`Parking`). Its retry time is
noted in the store, so a worker meeting the conversation later (the first one stopped or
died) parks the messages behind it too. The broker's order is checked: each message carries
its number in its conversation, and one that skips a number (a quorum queue may deliver out
of order after losing its leader) sends the worker to the store, to wait behind the missing
one as the delivery stage does.
"""

from __future__ import annotations

import asyncio
import time
from datetime import datetime, timedelta
from typing import Protocol

import structlog
from aio_pika.abc import AbstractIncomingMessage

from relay.auth import reply_token
from relay.broker import Broker, BrokerUnavailable, StageName
from relay.broker.topology import Topology
from relay.metrics import Metrics
from relay.pipeline.replies import ReplyPublisher
from relay.pipeline.settle import Outcome, Verdict, attempt_of, stale
from relay.pipeline.stage import StageWorker
from relay.settings import Settings
from relay.store import (
    ConversationRecord,
    Conversations,
    IntegrationLookup,
    Outgoing,
    ParkingQueries,
    StoreError,
    TurnReplies,
    Turns,
    Unfinished,
)
from relay.store.batching import GroupCall
from relay.tracing import ids, note
from relay.wire import FIRST_COPY_HEADER, InboundEnvelope, utcnow
from workers.bot.adapters.base import BotAdapter, BotContext, BotFailure
from workers.bot.bots import Bots

log = structlog.get_logger(__name__)

REPLY_TOKEN_SECONDS = 24 * 3600
# How far back a worker meeting a conversation looks for messages parked by another.
PARKING_LOOKBACK = timedelta(days=1)
MAX_CACHED_SECRETS = 10_000


class BotStore(Turns, ParkingQueries, Conversations, Outgoing, IntegrationLookup, Protocol):
    """The store as the bot worker uses it: turns, the parking queries, the conversation's
    bot secret, the replies it publishes, and the bot each integration names."""


def bot_worker(
    settings: Settings,
    store: BotStore,
    broker: Broker,
    adapter: BotAdapter,
    metrics: Metrics,
    topology: Topology | None = None,
) -> StageWorker[InboundEnvelope]:
    """The stage worker that consumes every inbound partition (of `topology`, by default
    the broker's) with the bots' turns; one per partition count per process. `adapter`: the
    bot of the integrations that name none (RELAY_BOT's); the others' are made as met."""
    turns = BotTurns(settings, store, broker, Bots(settings, store, adapter), metrics)
    return StageWorker(turns, broker, metrics, settings.bot_concurrency, settings, topology)


class BotTurns:
    """The inbound stage's handler: one bot turn per message, its replies stored and
    published before the message is acked."""

    envelope_type = InboundEnvelope
    stage: StageName = "inbound"

    def __init__(
        self,
        settings: Settings,
        store: BotStore,
        broker: Broker,
        bots: Bots,
        metrics: Metrics,
    ) -> None:
        self._settings = settings
        self._metrics = metrics
        self._broker = broker
        self._store = store
        self._bots = bots
        self._replies = ReplyPublisher(store, broker, metrics)
        # The turns of the lanes that finish together are stored together: one commit.
        self._recorded = GroupCall(store.record_turns, "record-turns")
        self._delays = sorted(settings.bot_retry_delays)
        self._secrets: dict[str, str] = {}

    def keys(self, envelope: InboundEnvelope) -> tuple[str, str]:
        """(conversation, message) relay ids."""
        return envelope.bundle.conversation.id, envelope.bundle.message.id

    def created_at(self, envelope: InboundEnvelope) -> datetime:
        """When the ingress accepted the message."""
        return envelope.acceptedAt

    def sequence(self, envelope: InboundEnvelope) -> int | None:
        """The message's number in its conversation (None in an older envelope). Numbers
        have gaps (a message discarded by its ingress): a skip sends the worker to the store,
        which answers the messages still to handle in their order, so a message the broker
        delivers ahead of an earlier one waits behind it, and a gap costs one look-up."""
        return envelope.sequence

    def parking_key(self, message_id: str) -> str:
        """An inbound message parks under its relay id, its id on the queues."""
        return message_id

    async def unfinished(self, envelope: InboundEnvelope) -> list[Unfinished]:
        """The conversation's queued messages that no turn has handled yet, in the order of
        their numbers."""
        return await self._store.unhandled(
            envelope.bundle.conversation.id,
            utcnow() - PARKING_LOOKBACK - timedelta(seconds=sum(self._delays)),
        )

    async def unreadable(self, message_id: str) -> None:
        """An inbound message's queue id is its relay id: marked dead, no turn waits for it."""
        if message_id:
            await self._store.mark_dead(message_id, utcnow())

    async def decide(self, message: AbstractIncomingMessage, envelope: InboundEnvelope) -> Verdict:
        """Run the turn (or republish stored replies) and say what becomes of the message."""
        note(ids(integration_id=envelope.integrationId))
        try:
            return await self._turn_or_republish(message, envelope)
        except (StoreError, BrokerUnavailable) as error:
            log.warning("bot_turn_interrupted", error=str(error))
            return Verdict(Outcome.AGAIN, reason=str(error))

    async def _turn_or_republish(
        self, message: AbstractIncomingMessage, envelope: InboundEnvelope
    ) -> Verdict:
        attempt = attempt_of(message)
        message_id = envelope.bundle.message.id
        conversation = _conversation_of(envelope)
        # A message still `pending` is one whose confirm reached its ingress, or will: it is
        # on the queue. Waiting for the ingress's mark would hold the lane for a commit.
        state = "queued" if _first_copy(message) else await self._store.inbound_state(message_id)
        if state == "missing":
            return Verdict(Outcome.DROP, reason="never accepted")
        if state in ("pending", "queued"):
            turn = await self._turn(envelope, conversation, attempt)
            if isinstance(turn, Verdict):
                return turn
            replies = turn
        else:
            replies = []  # handled before: the stored replies are all there is
        try:
            await self._replies.settle(conversation.id)
            records = await self._recorded.add(
                TurnReplies(conversation, message_id, replies, self._replies.partitions)
            )
            self._broker.news.announce(conversation.integration_id, conversation.id)
        except StoreError:
            if await self._store.inbound_state(message_id) == "missing":
                # Its ingress's publish failed and it discarded the message (and answered
                # 503): the turn's replies go nowhere, as the message was never accepted.
                return Verdict(Outcome.DROP, reason="discarded by its ingress")
            raise
        if stale(message):
            # The broker connection was lost during the turn and the message is already on
            # its way to a consumer again: publishing now could overtake what comes first.
            return Verdict(Outcome.AGAIN, reason="the delivery's channel closed")
        await self._replies.publish(records, envelope.acceptedAt)
        return Verdict(Outcome.DONE)

    async def _turn(
        self, envelope: InboundEnvelope, conversation: ConversationRecord, attempt: int
    ) -> list[tuple[str, dict[str, object]]] | Verdict:
        """The turn's replies, behind its integration's gate; or what becomes of the message
        if the bot did not answer (retried, dead) or its gate is shut (a wait)."""
        integration_id = envelope.integrationId
        message_id = envelope.bundle.message.id
        try:
            adapter = await self._bots.of(integration_id)
        except BotFailure as failure:
            return await self._failed(conversation, message_id, failure, attempt)
        wait = await self._bots.gates.take(integration_id)
        if wait is not None:
            return self._wait(wait, f"the bot of integration {integration_id} is busy or down")
        answered = False
        try:
            replies = await self._run_turn(adapter, envelope, conversation)
            answered = True
            return replies
        except BotFailure as failure:
            # A bot that refused the message (permanent) answered: it is not down.
            answered = failure.permanent
            return await self._failed(conversation, message_id, failure, attempt)
        finally:
            await self._bots.gates.give_back(integration_id, answered)

    async def _failed(
        self, conversation: ConversationRecord, message_id: str, failure: BotFailure, attempt: int
    ) -> Verdict:
        """Retry or dead-letter, noting in the store when (if ever) the turn is tried again:
        another worker meeting the conversation meanwhile parks its later messages."""
        self._metrics.bot_failures.inc()
        if failure.permanent or attempt >= len(self._delays):
            await self._store.mark_dead(message_id, utcnow())
            # Whoever waits for this turn's replies learns that none will come.
            self._broker.news.announce(conversation.integration_id, conversation.id)
            return Verdict(Outcome.DEAD, reason=str(failure))
        delay = self._delays[attempt]
        await self._store.mark_retrying(message_id, utcnow() + timedelta(seconds=delay))
        return Verdict(Outcome.RETRY, delay=delay, reason=str(failure))

    def _wait(self, seconds: float, reason: str) -> Verdict:
        """Wait in the broker (the shortest delay queue that covers `seconds`, or the
        longest), holding the conversation's order, counting no attempt."""
        delay = next((d for d in self._delays if d >= seconds), self._delays[-1])
        return Verdict(Outcome.WAIT, delay=delay, reason=reason, holds_order=True)

    async def _run_turn(
        self, adapter: BotAdapter, envelope: InboundEnvelope, conversation: ConversationRecord
    ) -> list[tuple[str, dict[str, object]]]:
        context = await self._context(envelope, conversation)
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self._settings.bot_timeout):
                await adapter.handle(envelope, context)
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

    async def _context(
        self, envelope: InboundEnvelope, conversation: ConversationRecord
    ) -> BotContext:
        secret = await self._bot_secret(envelope.integrationId)
        token = reply_token(secret, conversation.id, int(time.time()) + REPLY_TOKEN_SECONDS)
        url = f"{self._settings.public_base_url}/bot/conversations/{conversation.id}/messages"

        async def late(type_: str, payload: dict[str, object]) -> None:
            await self._replies.push(conversation, type_, payload)

        return BotContext(envelope, url, token, late)

    async def _bot_secret(self, integration_id: str) -> str:
        # Made once per integration and never changed: one read per process, not per turn.
        secret = self._secrets.get(integration_id)
        if secret is None:
            secret = await self._store.bot_secret(integration_id)
            if len(self._secrets) >= MAX_CACHED_SECRETS:
                self._secrets.clear()
            self._secrets[integration_id] = secret
        return secret


def _first_copy(message: AbstractIncomingMessage) -> bool:
    """The ingress's first publish of the message, delivered for the first time: no turn can
    have handled it (should it have been discarded, `record_replies` finds no message)."""
    return not message.redelivered and (message.headers or {}).get(FIRST_COPY_HEADER) == 1


def _conversation_of(envelope: InboundEnvelope) -> ConversationRecord:
    bundle = envelope.bundle
    return ConversationRecord(
        id=bundle.conversation.id,
        integration_id=envelope.integrationId,
        external_id=bundle.conversation.tags.id,
        user_id=bundle.user.id,
    )
