"""The delivery worker: POSTs each response to the back end, retries, dead-letters.

`Deliveries` is the outbound stage's handler (`relay.pipeline.handler.StageHandler`);
`delivery_worker` gives it to a `StageWorker`, which consumes the outbound partitions in
order. Its parts: `Endpoints` (an endpoint's in-flight slots and circuit breaker), `Judge`
(an attempt's answer into a verdict, `workers.delivery.judging`), `AttemptLog`, `Pace`
(each integration's rate) and `Expiry` (the types that expire).

Per response: drop it if it is past its type's time to live (`workers.delivery.expiry`);
wait if it is not due yet (its retry time, carried in a header), if its integration's pace
says its turn has not come (`workers.delivery.pace`), or if its endpoint's circuit is open
or its in-flight cap is reached; otherwise POST it signed, let the `Judge` decide what its
answer makes of it, and log the attempt. A wait that would end past the response's time to
live drops it instead.

Order per conversation: a response that waits holds its conversation (parking), so the
later responses wait behind it in the delay queues and leave after it. The attempt log
keeps that parking beyond the worker: a worker meeting a conversation for the first time
finds in the store the responses still waiting for a retry and lets them lead. Responses
are numbered per conversation without gaps, so a response that skips a number (the missing
one was published late, or the broker redelivered out of order after losing a node) sends
the worker to the store the same way, and waits behind the missing one.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Protocol

import structlog
from aio_pika.abc import AbstractIncomingMessage

from relay.broker import Broker, StageName
from relay.broker.operations import OperationsEvents
from relay.broker.topology import Topology
from relay.metrics import Metrics
from relay.pipeline.breaker import Breakers, endpoint_of
from relay.pipeline.settle import Outcome, Verdict
from relay.pipeline.stage import StageWorker
from relay.rates import SharedRates
from relay.settings import Settings
from relay.store import (
    Attempts,
    IntegrationLookup,
    IntegrationRecord,
    ParkingQueries,
    RateBuckets,
    StoreError,
    Unfinished,
)
from relay.store.directory import Directory
from relay.tracing import ids, note
from relay.views import delivery_id, response_id
from relay.wire import DUE_HEADER, OutboundEnvelope, utcnow
from workers.delivery.attempt_log import AttemptLog
from workers.delivery.endpoints import Endpoints
from workers.delivery.expiry import Expiry
from workers.delivery.judging import Judge, wait_for
from workers.delivery.pace import Pace
from workers.delivery.sender import Sender, Sent
from workers.delivery.telling import CircuitNews, Teller

log = structlog.get_logger(__name__)

UNREADABLE_SECRET_WAIT = 60.0  # seconds a response waits for its signing secret's key


class DeliveryStore(Attempts, ParkingQueries, IntegrationLookup, RateBuckets, Protocol):
    """The store as the delivery worker uses it: the attempt log, the parking queries, the
    integration of each response (through the directory), and the paces' shared buckets."""


def delivery_worker(
    settings: Settings,
    store: DeliveryStore,
    broker: Broker,
    sender: Sender,
    metrics: Metrics,
    topology: Topology | None = None,
) -> StageWorker[OutboundEnvelope]:
    """The stage worker that consumes every outbound partition (of `topology`, by default
    the broker's), delivering each response; one per partition count per process."""
    breakers = Breakers(
        settings.breaker_threshold, settings.breaker_cooldown, settings.endpoint_concurrency
    )
    queues = sorted(settings.delivery_delay_queues)  # where waits are spent
    events = OperationsEvents(broker)  # what the back ends' operations URLs are told
    deliveries = Deliveries(
        settings,
        store,
        sender,
        Endpoints(breakers, metrics, CircuitNews(events, settings.breaker_cooldown)),
        Judge(settings, store, metrics, queues, Teller(events)),
        AttemptLog(store),
        Pace(SharedRates(store), metrics),
        Expiry(store, metrics),
        queues,
    )
    concurrency = settings.delivery_concurrency
    return StageWorker(deliveries, broker, metrics, concurrency, settings, topology)


class Deliveries:
    """The outbound stage's handler: one attempt per response, or a wait, or its end."""

    envelope_type = OutboundEnvelope
    stage: StageName = "outbound"

    def __init__(
        self,
        settings: Settings,
        store: DeliveryStore,
        sender: Sender,
        endpoints: Endpoints,
        judge: Judge,
        attempts: AttemptLog,
        pace: Pace,
        expiry: Expiry,
        queues: Sequence[float],
    ) -> None:
        self._settings = settings
        self._store = store
        self._sender = sender
        self._endpoints = endpoints
        self._judge = judge
        self._attempts = attempts
        self._pace = pace
        self._expiry = expiry
        self._directory = Directory(
            store, settings.auth_cache_seconds, settings.directory_cache_size
        )
        self._queues = queues

    async def unreadable(self, message_id: str) -> None:
        """A response's queue id is its webhook-id: marked dead, no response waits for it."""
        found = response_id(message_id)
        if found is not None:
            await self._store.mark_dead(found, utcnow())

    def keys(self, envelope: OutboundEnvelope) -> tuple[str, str]:
        """(conversation, delivery) ids."""
        return envelope.body.botpressConversationId, envelope.deliveryId

    def created_at(self, envelope: OutboundEnvelope) -> datetime:
        """When the response was queued."""
        return envelope.createdAt

    async def unfinished(self, envelope: OutboundEnvelope) -> list[Unfinished]:
        """The conversation's responses that no attempt has finished with (by the attempt
        log) and that were not dead-lettered or expired."""
        return await self._store.undelivered(
            envelope.body.botpressConversationId,
            utcnow() - timedelta(seconds=self._settings.delivery_max_age),
        )

    def parking_key(self, message_id: str) -> str:
        """Responses park under their delivery id."""
        return delivery_id(message_id)

    def sequence(self, envelope: OutboundEnvelope) -> int:
        """A response's number in its conversation (the store numbers them without gaps)."""
        return envelope.body.sequence

    async def decide(self, message: AbstractIncomingMessage, envelope: OutboundEnvelope) -> Verdict:
        """Deliver now, or say how long to wait, or give up."""
        note(ids(integration_id=envelope.integrationId, attempt=envelope.attempt))
        with structlog.contextvars.bound_contextvars(
            delivery_id=envelope.deliveryId,
            attempt=envelope.attempt,
            response_id=envelope.body.botpressMessageId,
        ):
            age = (utcnow() - envelope.createdAt).total_seconds()
            if age > self._settings.delivery_max_age:
                return await self._dead(envelope, f"older than {self._settings.delivery_max_age}s")
            try:
                integration = (
                    await self._directory.lookup(envelope.integrationId, "integration")
                ).integration
            except StoreError as error:
                return Verdict(Outcome.AGAIN, reason=str(error))
            if integration is None or integration.disabled_at is not None:
                return await self._dead(envelope, "the integration's endpoint is disabled")
            expired = await self._expiry.now(envelope, integration)
            return expired or await self._consider(message, envelope, integration)

    async def _consider(
        self,
        message: AbstractIncomingMessage,
        envelope: OutboundEnvelope,
        integration: IntegrationRecord,
    ) -> Verdict:
        """A wait, or an attempt and its verdict (logged); a drop in place of a wait that
        would end past the response's time to live."""
        verdict, sent = self._not_yet(message, integration), None
        if verdict is None:
            verdict, sent = await self._attempt(envelope, integration)
        verdict = await self._expiry.instead(envelope, integration, verdict)
        if sent is not None and not await self._attempts.add(envelope, sent, verdict):
            # The log is what tells a worker meeting the conversation later that this
            # response is finished: unlogged, it is sent again (same webhook-id) later.
            return Verdict(Outcome.AGAIN, reason="the attempt could not be logged")
        return await self._judge.tell(envelope, verdict, integration)

    def _not_yet(
        self, message: AbstractIncomingMessage, integration: IntegrationRecord
    ) -> Verdict | None:
        """A wait if the response is not due yet, or its signing secret unreadable."""
        due = (message.headers or {}).get(DUE_HEADER)
        if isinstance(due, int) and (left := due / 1000 - time.time()) > 0.01:
            return wait_for(left, "not due yet", self._queues)
        if integration.secret_unreadable is not None:
            # Its key is missing from RELAY_SECRET_KEYS: an operator's fix, not the
            # endpoint's fault. Wait (in the broker), counting no failed attempt.
            log.error(
                "signing_secret_unreadable",
                integration_id=integration.id,
                error=integration.secret_unreadable,
            )
            reason = integration.secret_unreadable
            return wait_for(UNREADABLE_SECRET_WAIT, reason, self._queues)
        return None

    async def _dead(self, envelope: OutboundEnvelope, reason: str) -> Verdict:
        """Dead-letter a response no attempt finished with, noted in the store first: a
        worker meeting the conversation later must not wait behind it."""
        try:
            await self._store.mark_dead(envelope.body.botpressMessageId, utcnow())
        except StoreError as error:
            return Verdict(Outcome.AGAIN, reason=str(error))
        return await self._judge.tell(envelope, Verdict(Outcome.DEAD, reason=reason))

    async def _attempt(
        self, envelope: OutboundEnvelope, integration: IntegrationRecord
    ) -> tuple[Verdict, Sent | None]:
        """Its turn (the pace, the endpoint's slot), the POST and its verdict; or a wait."""
        try:
            paced = await self._pace.turn(integration)
        except StoreError as error:
            return Verdict(Outcome.AGAIN, reason=str(error)), None
        if paced is not None:
            return wait_for(paced, "its integration's pace", self._queues), None
        endpoint = endpoint_of(integration.response_url)
        wait = await self._endpoints.take(endpoint, integration)
        if wait is not None:
            return wait_for(wait, f"endpoint {endpoint} is open or busy", self._queues), None
        sent: Sent | None = None
        try:
            sent = await self._sender.send(
                integration.response_url,
                envelope.body.model_dump_json().encode(),
                envelope.deliveryId,
                integration.signing_secrets(utcnow()),
            )
        finally:
            await self._endpoints.give_back(endpoint, integration, success=bool(sent and sent.ok))
        return await self._judge.judge(envelope, integration, sent), sent
