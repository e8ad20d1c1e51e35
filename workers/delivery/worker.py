"""The delivery worker: POSTs each response to the back end, retries, dead-letters.

Per response: wait if it is not due yet (its retry time, carried in a header), or if its
endpoint's circuit is open or its in-flight cap is reached; otherwise POST it signed, log
the attempt, and decide: 2xx done; 410 dead-letters and disables the endpoint; another 4xx
(but 408, 409, 425, 429) dead-letters; anything else retries on the schedule, with jitter,
`Retry-After` (clamped) and an overload penalty, until attempts or age run out.

Order per conversation: a response that waits holds its conversation (parking), so the
later responses wait behind it in the delay queues and leave after it. The attempt log
keeps that parking beyond the worker: a worker meeting a conversation for the first time
finds in the store the responses still waiting for a retry and lets them lead. Responses
are numbered per conversation without gaps, so a response that skips a number (the missing
one was published late, or the broker redelivered out of order after losing a node) sends
the worker to the store the same way, and waits behind the missing one.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from datetime import UTC, datetime, timedelta
from typing import Protocol

import structlog
from aio_pika.abc import AbstractIncomingMessage

from relay.broker import Broker, StageName
from relay.broker.topology import Topology
from relay.metrics import Metrics
from relay.pipeline.delays import first_hop
from relay.pipeline.replies import delivery_id, response_id
from relay.pipeline.settle import Outcome, Verdict
from relay.pipeline.stage import StageWorker
from relay.settings import Settings
from relay.store import (
    AttemptRecord,
    Attempts,
    IntegrationLookup,
    IntegrationRecord,
    ParkingQueries,
    StoreError,
    Unfinished,
)
from relay.store.batching import GroupCommit
from relay.store.directory import Directory
from relay.wire import (
    ATTEMPTS_HEADER,
    DUE_HEADER,
    LAST_STATUS_HEADER,
    OutboundEnvelope,
    utcnow,
)
from workers.delivery.backoff import next_delay, parse_retry_after
from workers.delivery.breaker import Breakers, State, endpoint_of
from workers.delivery.sender import Sender, Sent

log = structlog.get_logger(__name__)

UNREADABLE_SECRET_WAIT = 60.0  # seconds a response waits for its signing secret's key

RETRYABLE_4XX = frozenset({408, 409, 425, 429})
BUSY_WAIT = 5.0  # seconds a response waits in its lane for a busy endpoint's slot


class DeliveryStore(Attempts, ParkingQueries, IntegrationLookup, Protocol):
    """The store as the delivery worker uses it: the attempt log, the parking queries, and
    the integration of each response (through the directory)."""


class DeliveryWorker(StageWorker[OutboundEnvelope]):
    """Consumes every outbound partition; one instance per process."""

    envelope_type = OutboundEnvelope
    stage: StageName = "outbound"

    def __init__(
        self,
        settings: Settings,
        store: DeliveryStore,
        broker: Broker,
        sender: Sender,
        metrics: Metrics,
        topology: Topology | None = None,
    ) -> None:
        super().__init__(broker, metrics, settings.delivery_concurrency, settings, topology)
        self._settings = settings
        self._store = store
        self._attempts = GroupCommit(store.record_attempts, "attempt-log")
        self._sender = sender
        self._directory = Directory(
            store, settings.auth_cache_seconds, settings.directory_cache_size
        )
        self._queues = sorted(settings.delivery_delay_queues)
        self._slot_freed = asyncio.Condition()
        self._breakers = Breakers(
            settings.breaker_threshold, settings.breaker_cooldown, settings.endpoint_concurrency
        )

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

    async def decide(self, message: AbstractIncomingMessage, envelope: OutboundEnvelope) -> Verdict:
        """Deliver now, or say how long to wait, or give up."""
        with structlog.contextvars.bound_contextvars(
            delivery_id=envelope.deliveryId,
            attempt=envelope.attempt,
            response_id=envelope.body.botpressMessageId,
        ):
            age = (utcnow() - envelope.createdAt).total_seconds()
            if age > self._settings.delivery_max_age:
                return await self._dead(envelope, f"older than {self._settings.delivery_max_age}s")
            due = (message.headers or {}).get(DUE_HEADER)
            if isinstance(due, int) and (left := due / 1000 - time.time()) > 0.01:
                return self._wait(left, "not due yet")
            try:
                integration = (
                    await self._directory.lookup(envelope.integrationId, "integration")
                ).integration
            except StoreError as error:
                return Verdict(Outcome.AGAIN, reason=str(error))
            if integration is None or integration.disabled_at is not None:
                return await self._dead(envelope, "the integration's endpoint is disabled")
            if integration.secret_unreadable is not None:
                # Its key is missing from RELAY_SECRET_KEYS: an operator's fix, not the
                # endpoint's fault. Wait (in the broker), counting no failed attempt.
                log.error(
                    "signing_secret_unreadable",
                    integration_id=integration.id,
                    error=integration.secret_unreadable,
                )
                return self._wait(UNREADABLE_SECRET_WAIT, integration.secret_unreadable)
            return await self._attempt(envelope, integration)

    async def _dead(self, envelope: OutboundEnvelope, reason: str) -> Verdict:
        """Dead-letter a response no attempt finished with, noted in the store first: a
        worker meeting the conversation later must not wait behind it."""
        try:
            await self._store.mark_dead(envelope.body.botpressMessageId, utcnow())
        except StoreError as error:
            return Verdict(Outcome.AGAIN, reason=str(error))
        return Verdict(Outcome.DEAD, reason=reason)

    async def unfinished(self, envelope: OutboundEnvelope) -> list[Unfinished]:
        """The conversation's responses that no attempt has finished with (by the attempt
        log) and that were not dead-lettered."""
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

    def _due_in(self, seconds: float) -> tuple[float, dict[str, str | int]]:
        """The first delay-queue hop of a wait, and the header saying when it is over."""
        delay = first_hop(seconds, self._queues)
        return delay, {DUE_HEADER: int((time.time() + seconds) * 1000)}

    def _wait(self, seconds: float, reason: str) -> Verdict:
        delay, headers = self._due_in(seconds)
        return Verdict(Outcome.WAIT, delay=delay, reason=reason, holds_order=True, headers=headers)

    async def _slot(self, endpoint: str) -> float | None:
        """An in-flight slot of the endpoint: None once taken, else the seconds to wait in the
        broker. A busy endpoint is waited for here, briefly: slots free up within
        milliseconds under load, and a round trip through a delay queue per response would
        cost the broker more than the delivery itself."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + BUSY_WAIT
        async with self._slot_freed:
            while True:
                wait = self._breakers.acquire(endpoint)
                left = deadline - loop.time()
                if wait is None or self._breakers.state(endpoint) is not State.CLOSED or left <= 0:
                    return wait
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._slot_freed.wait(), left)

    async def _attempt(self, envelope: OutboundEnvelope, integration: IntegrationRecord) -> Verdict:
        endpoint = endpoint_of(integration.response_url)
        wait = await self._slot(endpoint)
        if wait is not None:
            return self._wait(wait, f"endpoint {endpoint} is open or busy")
        sent: Sent | None = None
        try:
            sent = await self._sender.send(
                integration.response_url,
                envelope.body.model_dump_json().encode(),
                envelope.deliveryId,
                integration.signing_secrets(utcnow()),
            )
        finally:
            self._breakers.release(endpoint, success=bool(sent and sent.ok))
            async with self._slot_freed:
                self._slot_freed.notify_all()
            self._metrics.breaker_state.labels(endpoint).set(
                _STATE_VALUE[self._breakers.state(endpoint).value]
            )
        verdict = await self._judge(envelope, integration, sent)
        if not await self._log_attempt(envelope, sent, verdict):
            # The log is what tells a worker meeting the conversation later that this
            # response is finished: unlogged, it is sent again (same webhook-id) later.
            return Verdict(Outcome.AGAIN, reason="the attempt could not be logged")
        return verdict

    async def _judge(
        self, envelope: OutboundEnvelope, integration: IntegrationRecord, sent: Sent
    ) -> Verdict:
        self._count(envelope, sent)
        if sent.ok:
            return Verdict(Outcome.DONE)
        reason = sent.error or f"the endpoint answered {sent.status}"
        headers: dict[str, str | int] = {
            LAST_STATUS_HEADER: sent.status or 0,
            ATTEMPTS_HEADER: envelope.attempt + 1,
        }
        if sent.status == 410:
            await self._store.set_disabled(integration.id, utcnow())
            log.warning("endpoint_disabled", integration_id=integration.id)
            return Verdict(Outcome.DEAD, reason="410 Gone: endpoint disabled", headers=headers)
        if sent.refused or _permanent(sent.status):
            return Verdict(Outcome.DEAD, reason=reason, headers=headers)
        return self._retry_or_dead(envelope, sent, reason, headers)

    def _retry_or_dead(
        self,
        envelope: OutboundEnvelope,
        sent: Sent,
        reason: str,
        headers: dict[str, str | int],
    ) -> Verdict:
        schedule = self._settings.delivery_retry_schedule
        following = envelope.attempt + 1
        age = (utcnow() - envelope.createdAt).total_seconds()
        if following >= len(schedule) or age > self._settings.delivery_max_age:
            return Verdict(
                Outcome.DEAD,
                reason=f"gave up after {following} attempts: {reason}",
                headers=headers,
            )
        seconds = next_delay(
            schedule[following],
            parse_retry_after(sent.retry_after, utcnow()),
            overloaded=sent.timed_out or sent.status == 429,
            penalty=self._settings.delivery_overload_penalty,
        )
        body = envelope.model_copy(update={"attempt": following}).model_dump_json().encode()
        delay, due = self._due_in(seconds)
        return Verdict(Outcome.RETRY, delay=delay, reason=reason, body=body, headers=due)

    def _count(self, envelope: OutboundEnvelope, sent: Sent) -> None:
        status_class = f"{sent.status // 100}xx" if sent.status else "error"
        outcome = "delivered" if sent.ok else "failed"
        self._metrics.delivery_attempts.labels(outcome, status_class).inc()
        self._metrics.delivery_latency.observe(sent.latency_ms / 1000)
        if sent.ok:
            now = utcnow()
            self._metrics.response_age.observe((now - envelope.createdAt).total_seconds())
            if envelope.acceptedAt is not None:
                self._metrics.end_to_end.observe((now - envelope.acceptedAt).total_seconds())

    async def _log_attempt(self, envelope: OutboundEnvelope, sent: Sent, verdict: Verdict) -> bool:
        due = verdict.headers.get(DUE_HEADER)
        next_at = (
            datetime.fromtimestamp(due / 1000, UTC)
            if verdict.outcome is Outcome.RETRY and isinstance(due, int)
            else None
        )
        record = AttemptRecord(
            delivery_id=envelope.deliveryId,
            attempt=envelope.attempt,
            integration_id=envelope.integrationId,
            message_id=envelope.body.botpressMessageId,
            status=sent.status,
            latency_ms=sent.latency_ms,
            error=sent.error,
            next_attempt_at=next_at,
            response_body=sent.body,
            created_at=utcnow(),
        )
        log.info(
            "delivery_attempt",
            status=sent.status,
            error=sent.error,
            latency_ms=sent.latency_ms,
            outcome=verdict.outcome.value,
        )
        try:
            await self._attempts.add(record)
        except Exception as error:
            log.warning("attempt_not_logged", error=f"{type(error).__name__}: {error}")
            return False
        return True


_STATE_VALUE = {"closed": 0, "half_open": 1, "open": 2}


def _permanent(status: int | None) -> bool:
    """A 4xx the endpoint will answer again: retrying cannot help."""
    return status is not None and 400 <= status < 500 and status not in RETRYABLE_4XX
