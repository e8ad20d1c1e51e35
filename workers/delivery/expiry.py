"""Responses that expire: an integration's `expiringTypes` give, per message type, the
seconds after a response's creation past which it is dropped undelivered (state `expired`)
rather than delivered late: a typing indicator delivered an hour after an outage means
nothing, and would hold up the text behind it.

A response is looked at whenever it is considered (its first attempt, back from a retry's
wait, while its endpoint's circuit is open): past its time it is dropped, and a wait that
would end past its time (a retry, an open circuit, its turn under the pace) drops it at once
rather than parking the responses behind it until then. Dropped: marked `expired` in the
store (nothing waits behind it any more), acked (neither retried nor dead-lettered), logged
with its ids and counted.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Protocol

import structlog

from relay.metrics import Metrics
from relay.pipeline.settle import Outcome, Verdict
from relay.store import IntegrationRecord, StoreError
from relay.wire import DUE_HEADER, OutboundEnvelope, utcnow

log = structlog.get_logger(__name__)


class ExpiryMarks(Protocol):
    """The store's mark of an expired response."""

    async def mark_expired(self, message_id: str, expired_at: datetime) -> None:
        """The response was dropped: nothing more is to come for it."""


def expires_at(envelope: OutboundEnvelope, integration: IntegrationRecord) -> datetime | None:
    """When the response expires (None: its type does not, for this integration)."""
    seconds = integration.delivery.expiring_types.get(envelope.body.type)
    return None if seconds is None else envelope.createdAt + timedelta(seconds=seconds)


def due_of(verdict: Verdict) -> datetime | None:
    """When a retry or a wait is over (its due header), if the verdict is one."""
    due = verdict.headers.get(DUE_HEADER)
    if verdict.outcome not in (Outcome.RETRY, Outcome.WAIT) or not isinstance(due, int):
        return None
    return datetime.fromtimestamp(due / 1000, UTC)


class Expiry:
    """Drops the responses past their type's time to live."""

    def __init__(self, store: ExpiryMarks, metrics: Metrics) -> None:
        self._store = store
        self._metrics = metrics

    async def now(
        self, envelope: OutboundEnvelope, integration: IntegrationRecord
    ) -> Verdict | None:
        """A drop if the response is past its time now, else None."""
        ends = expires_at(envelope, integration)
        if ends is None or utcnow() < ends:
            return None
        return await self._drop(envelope, integration, "past its time to live")

    async def instead(
        self, envelope: OutboundEnvelope, integration: IntegrationRecord, verdict: Verdict
    ) -> Verdict:
        """The verdict, or a drop in its place if it is a wait that ends past the response's
        time to live."""
        ends, due = expires_at(envelope, integration), due_of(verdict)
        if ends is None or due is None or due < ends:
            return verdict
        return await self._drop(
            envelope, integration, f"would wait past its time to live: {verdict.reason}"
        )

    async def _drop(
        self, envelope: OutboundEnvelope, integration: IntegrationRecord, why: str
    ) -> Verdict:
        body = envelope.body
        try:
            await self._store.mark_expired(body.botpressMessageId, utcnow())
        except StoreError as error:
            return Verdict(Outcome.AGAIN, reason=str(error))
        seconds = integration.delivery.expiring_types[body.type]
        log.warning(
            "response_expired",
            integration_id=envelope.integrationId,
            conversation_id=body.botpressConversationId,
            response_id=body.botpressMessageId,
            delivery_id=envelope.deliveryId,
            type=body.type,
            time_to_live=seconds,
            reason=why,
        )
        self._metrics.responses_expired.labels(body.type).inc()
        return Verdict(Outcome.DROP, reason=f"expired ({body.type}, {seconds:g}s): {why}")
