"""The operations dispatcher: POSTs each queued operations event (`relay.wire.operations`) to
its integration's operations URL, in the delivery worker's process but off its lanes.

It consumes `{prefix}.operations` (every delivery worker does, as competing consumers, in
no particular order) with a concurrency of its own and its own HTTP pool, so a slow or
dead operations endpoint holds no delivery. Each event is sent as responses are: signed
with the integration's signing secret(s) (read when it is sent, so a rotation counts), under
the SSRF guard (a refused URL is never called: the event is dropped), with a circuit breaker
and a cap of its own per endpoint, and retried on the delivery schedule (jitter,
`Retry-After`, the overload penalty) until it runs out or the event is older than the
delivery age limit. Its waits are spent in the operations delay queues. An event is acked
only once its POST succeeded or its retry is queued: a worker that crashes meanwhile leaves
it to another, which sends it with the same `webhook-id`.
"""

from __future__ import annotations

import asyncio
import time

import structlog
from aio_pika.abc import AbstractIncomingMessage
from pydantic import ValidationError

from relay.aio import cancel_and_wait
from relay.broker import CONNECTION_ERRORS, Broker, BrokerUnavailable
from relay.broker.consuming import consuming
from relay.metrics import Metrics
from relay.pipeline.background import Background
from relay.pipeline.breaker import Breakers, endpoint_of
from relay.pipeline.settle import Outcome, Verdict, quietly
from relay.retry import keep_trying
from relay.settings import Settings
from relay.store import IntegrationLookup, IntegrationRecord, StoreError
from relay.wire import DUE_HEADER, utcnow
from relay.wire.operations import OperationsEnvelope
from workers.delivery.judging import due_in, permanent, retry_delay, wait_for
from workers.delivery.sender import Sender, Sent

log = structlog.get_logger(__name__)

CONCURRENCY = 8  # events being sent at once by one worker
ENDPOINT_CAP = 2  # of them to one operations endpoint: one slow back end leaves the rest
UNREADABLE_SECRET_WAIT = 60.0  # seconds an event waits for its signing secret's key
STAGE = "operations"  # the `stage` label of what the dispatcher consumed, by outcome


class OperationsJudge:
    """Sends one event, or says why not yet or never: a verdict, as for a response."""

    def __init__(
        self, settings: Settings, store: IntegrationLookup, sender: Sender, queues: list[float]
    ) -> None:
        self._settings = settings
        self._store = store
        self._sender = sender
        self._queues = queues  # the delay queues' seconds
        self._breakers = Breakers(
            settings.breaker_threshold, settings.breaker_cooldown, ENDPOINT_CAP
        )

    async def decide(
        self, message: AbstractIncomingMessage, envelope: OperationsEnvelope
    ) -> Verdict:
        """Send the event now, or wait, or give it up."""
        due = (message.headers or {}).get(DUE_HEADER)
        if isinstance(due, int) and (left := due / 1000 - time.time()) > 0.01:
            return wait_for(left, "not due yet", self._queues)
        age = (utcnow() - envelope.createdAt).total_seconds()
        if age > self._settings.delivery_max_age:
            return _given_up(f"older than {self._settings.delivery_max_age}s")
        try:
            integration = await self._store.get_integration(envelope.integrationId)
        except StoreError as error:
            return wait_for(min(self._queues), str(error), self._queues)
        if integration is None or integration.delivery.operations_url is None:
            return Verdict(Outcome.DROP, reason="no operations URL")
        if integration.secret_unreadable is not None:
            log.error("signing_secret_unreadable", error=integration.secret_unreadable)
            return wait_for(UNREADABLE_SECRET_WAIT, integration.secret_unreadable, self._queues)
        return await self._send(envelope, integration, integration.delivery.operations_url)

    async def _send(
        self, envelope: OperationsEnvelope, integration: IntegrationRecord, url: str
    ) -> Verdict:
        endpoint = endpoint_of(url)
        wait = self._breakers.acquire(endpoint)
        if wait is not None:
            return wait_for(wait, f"operations endpoint {endpoint} is open or busy", self._queues)
        sent: Sent | None = None
        try:
            sent = await self._sender.send(
                url, envelope.body(), envelope.webhookId, integration.signing_secrets(utcnow())
            )
        finally:
            self._breakers.release(endpoint, success=bool(sent and sent.ok))
        log.info("operations_attempt", status=sent.status, error=sent.error)
        return self._judge(envelope, sent)

    def _judge(self, envelope: OperationsEnvelope, sent: Sent) -> Verdict:
        if sent.ok:
            return Verdict(Outcome.DONE)
        reason = sent.error or f"the operations endpoint answered {sent.status}"
        if sent.refused or permanent(sent.status):
            return _given_up(reason)
        schedule = self._settings.delivery_retry_schedule
        following = envelope.attempt + 1
        if following >= len(schedule):
            return _given_up(f"gave up after {following} attempts: {reason}")
        seconds = retry_delay(self._settings, following, sent)
        body = envelope.model_copy(update={"attempt": following}).model_dump_json().encode()
        delay, headers = due_in(seconds, self._queues)
        return Verdict(Outcome.RETRY, delay=delay, reason=reason, body=body, headers=headers)


def _given_up(reason: str) -> Verdict:
    log.warning("operations_event_given_up", reason=reason)
    return Verdict(Outcome.DROP, reason=reason)


class OperationsDispatcher:
    """Consumes the operations events' queue while started, `CONCURRENCY` at a time."""

    def __init__(
        self,
        settings: Settings,
        store: IntegrationLookup,
        broker: Broker,
        sender: Sender,
        metrics: Metrics,
    ) -> None:
        self._broker = broker
        self._metrics = metrics
        queues = list(broker.topology.stage_delays("outbound"))
        self._judge = OperationsJudge(settings, store, sender, queues)
        self._handling = Background()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Consume in the background, from when the broker is connected."""
        self._task = asyncio.create_task(
            keep_trying(self._consume_forever, CONNECTION_ERRORS, "operations_consume_failed"),
            name="operations-dispatcher",
        )

    async def stop(self) -> None:
        """Stop; an event being sent goes back to the queue with the channel (and is sent
        again, with the same `webhook-id`)."""
        task, self._task = self._task, None
        await cancel_and_wait(task)
        await self._handling.cancel()

    async def _consume_forever(self) -> None:
        queue = self._broker.topology.operations_exchange  # the queue bears its name
        async with consuming(self._broker, queue, CONCURRENCY) as messages:
            async for message in messages:
                self._handling.spawn(self._handle(message), "operations-event")

    async def _handle(self, message: AbstractIncomingMessage) -> None:
        try:
            envelope = OperationsEnvelope.model_validate_json(message.body)
        except ValidationError:
            log.error("operations_event_invalid", message_id=message.message_id)
            await self._settle(message, Verdict(Outcome.DROP, reason="invalid"))
            return
        with structlog.contextvars.bound_contextvars(
            webhook_id=envelope.webhookId,
            integration_id=envelope.integrationId,
            event_type=envelope.event.type,
            attempt=envelope.attempt,
        ):
            verdict = await self._judge.decide(message, envelope)
            await self._settle(message, verdict)
            log.info("operations_event_settled", outcome=verdict.outcome.value)

    async def _settle(self, message: AbstractIncomingMessage, verdict: Verdict) -> None:
        """Queue the retry or the wait (confirmed), then ack; if the broker will not take
        it, the event goes back to the queue, for this worker or another."""
        self._metrics.consumed.labels(STAGE, verdict.outcome.value).inc()
        if verdict.outcome in (Outcome.RETRY, Outcome.WAIT):
            try:
                await self._broker.publish_to(
                    self._broker.topology.operations_delay(verdict.delay),
                    "",
                    verdict.body if verdict.body is not None else message.body,
                    message_id=message.message_id or "",
                    headers=verdict.headers,
                )
            except BrokerUnavailable as error:
                log.warning("operations_event_returned", error=str(error))
                await quietly(message.nack(requeue=True))
                return
        await quietly(message.ack())
