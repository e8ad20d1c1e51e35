"""What the delivery path tells a back end's operations URL: a response given up on (by a
delivery worker, or by the broker past a partition queue's delivery limit: told once its
dead letter is kept), its integration disabled by a `410 Gone`, an endpoint's circuit opened
and closed.

Only queued from here (`relay.broker.operations`), never sent: the operations endpoint is
POSTed by the operations dispatcher (`workers.delivery.operations`), off the conversations'
lanes. Nothing is queued for an integration known to have no operations URL.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

import structlog
from aio_pika.abc import AbstractIncomingMessage
from pydantic import ValidationError

from relay.broker import BrokerUnavailable
from relay.broker.operations import OperationsEvents
from relay.pipeline.breaker import Change
from relay.pipeline.settle import Outcome, Verdict
from relay.store import DeadLetter, IntegrationLookup, IntegrationRecord, StoreError
from relay.wire import ATTEMPTS_HEADER, LAST_STATUS_HEADER, OutboundEnvelope, utcnow
from relay.wire.operations import (
    OperationsEnvelope,
    circuit_closed,
    circuit_opened,
    integration_disabled,
    response_dead,
)

log = structlog.get_logger(__name__)


def listening(integration: IntegrationRecord | None) -> bool:
    """Whether the integration may hear operations events (unknown: it may; the dispatcher
    looks when it sends)."""
    return integration is None or integration.delivery.operations_url is not None


class Teller:
    """Queues the events of the delivery path for the operations dispatcher."""

    def __init__(self, events: OperationsEvents) -> None:
        self._events = events

    async def dead(
        self, envelope: OutboundEnvelope, verdict: Verdict, integration: IntegrationRecord | None
    ) -> None:
        """Tell of a response given up on (a verdict `DEAD`; any other is nothing to tell),
        before its verdict is settled: a worker that crashes in between decides its death
        again, and tells the same event (the same `webhook-id`)."""
        if verdict.outcome is not Outcome.DEAD or not listening(integration):
            return
        status = verdict.headers.get(LAST_STATUS_HEADER)
        attempts = verdict.headers.get(ATTEMPTS_HEADER, envelope.attempt)
        event = response_dead(
            envelope,
            verdict.reason,
            status if isinstance(status, int) else None,
            attempts if isinstance(attempts, int) else envelope.attempt,
            utcnow(),
        )
        await self.now_or_soon(event)

    async def disabled(self, integration: IntegrationRecord, disabled_at: datetime) -> None:
        """Tell of the integration disabled by its endpoint's `410 Gone`."""
        if listening(integration):
            await self.now_or_soon(integration_disabled(integration.id, "gone", disabled_at))

    async def now_or_soon(self, event: OperationsEnvelope) -> None:
        """Queue the event now (confirmed); if the broker will not take it, keep trying in
        the background, rather than hold the response (its dead letter keeps it anyway)."""
        try:
            await self._events.publish(event)
        except BrokerUnavailable as error:
            log.warning("operations_event_delayed", webhook_id=event.webhookId, error=str(error))
            self._events.publish_soon(event)


class BrokerDeaths:
    """Tells of the responses the broker dead-lettered, once the outbound keeper
    (`relay.pipeline.dlq_keeper`, as its `Telling`) has kept them: as `Teller.dead` tells
    of those a worker gives up on, with the same event id (a letter kept twice tells the
    same `webhook-id`)."""

    def __init__(self, store: IntegrationLookup, events: OperationsEvents) -> None:
        self._store = store
        self._events = events

    async def broker_dead(self, message: AbstractIncomingMessage, letter: DeadLetter) -> None:
        """Queue `relay.response.dead` for the response `letter` holds (BrokerUnavailable if
        the broker will not take it); an envelope that cannot be read tells nothing (no
        integration can be known)."""
        try:
            envelope = OutboundEnvelope.model_validate_json(message.body)
        except ValidationError:
            return
        if not listening(await self._integration(envelope.integrationId)):
            return
        reason, status, attempts = letter.reason, letter.last_status, letter.attempts
        await self._events.publish(response_dead(envelope, reason, status, attempts, utcnow()))

    async def _integration(self, integration_id: str) -> IntegrationRecord | None:
        """The integration, or None (unknown, or the store away: the dispatcher looks again
        when it sends, and drops the event of one with no operations URL)."""
        try:
            return await self._store.get_integration(integration_id)
        except StoreError as error:
            log.warning("integration_unknown", integration_id=integration_id, error=str(error))
            return None


@dataclass
class _Opening:
    at: datetime
    told: set[str] = field(default_factory=set)  # the integrations told of it


class CircuitNews:
    """Tells of circuits opened and closed: an opened circuit to the integration whose
    delivery opened it, and to each whose delivery it holds after (once); its closing to
    every integration told of its opening. Circuits are per delivery worker, and so are
    these events (each worker that opens its circuit tells of it)."""

    def __init__(self, events: OperationsEvents, cooldown: float) -> None:
        self._events = events
        self._cooldown = timedelta(seconds=cooldown)
        self._openings: dict[str, _Opening] = {}

    def changed(self, endpoint: str, integration: IntegrationRecord, change: Change) -> None:
        """A delivery of `integration` to `endpoint` opened or closed its circuit."""
        now = utcnow()
        if change is Change.OPENED:
            self._openings[endpoint] = _Opening(now)
            self.held(endpoint, integration)
            return
        opening = self._openings.pop(endpoint, None)
        if opening is None:
            return
        for integration_id in sorted(opening.told):
            self._events.publish_soon(circuit_closed(integration_id, endpoint, opening.at, now))

    def held(self, endpoint: str, integration: IntegrationRecord) -> None:
        """A delivery of `integration` waits for `endpoint`'s open circuit."""
        opening = self._openings.get(endpoint)
        if opening is None or integration.id in opening.told or not listening(integration):
            return
        opening.told.add(integration.id)
        probe_at = opening.at + self._cooldown
        self._events.publish_soon(circuit_opened(integration.id, endpoint, opening.at, probe_at))
