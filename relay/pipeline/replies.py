"""Bot responses onto the outbound stage: stored first (numbered), then published in order.

Used by the bot worker for a turn's replies and by the ingress for replies the bot pushes
later (push API, Bot Framework connector), so every response takes the same path.
"""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Any

import structlog

from relay.broker import Broker, partition_of
from relay.metrics import Metrics
from relay.store import ConversationRecord, Outgoing, OutgoingRecord
from relay.store.batching import GroupCommit
from relay.wire import OutboundEnvelope, WebhookResponse, dump_json, utcnow

log = structlog.get_logger(__name__)


def delivery_id(message_id: str) -> str:
    """The `webhook-id` of a response: derived from its relay id, so stable across retries."""
    return f"msg_{message_id}"


def webhook_body(record: OutgoingRecord) -> WebhookResponse:
    """The body POSTed to the back end for this response."""
    return WebhookResponse(
        type=record.type,
        payload=record.payload,
        conversationId=record.conversation_external_id,
        botpressUserId=record.user_id,
        botpressMessageId=record.id,
        botpressConversationId=record.conversation_id,
        sequence=record.sequence,
    )


class ReplyPublisher:
    """Publishes stored responses to their outbound partition, with confirms, then marks them."""

    def __init__(self, store: Outgoing, broker: Broker, metrics: Metrics) -> None:
        self._store = store
        self._queued = GroupCommit(store.mark_queued, "mark-responses-queued")
        self._broker = broker
        self._metrics = metrics

    async def publish(
        self, records: list[OutgoingRecord], accepted_at: datetime | None = None
    ) -> None:
        """Publish the not-yet-queued records in sequence order (BrokerUnavailable if not).

        `accepted_at`: when the user's message they answer was accepted (for latency).
        """
        published: list[str] = []
        try:
            for record in sorted(records, key=lambda r: r.sequence):
                if record.state != "queued":
                    await self._publish_one(record, accepted_at)
                    published.append(record.id)
                    log.info(
                        "response_queued",
                        response_id=record.id,
                        sequence=record.sequence,
                        conversation_id=record.conversation_id,
                    )
        finally:
            # Marked together, in one write (also those confirmed before a failure): should
            # the marks be lost, they are published again with the same webhook-ids (a turn's
            # message comes back unacked; the outbox takes a pushed response).
            await asyncio.shield(asyncio.gather(*(self._queued.add(id_) for id_ in published)))

    async def _publish_one(self, record: OutgoingRecord, accepted_at: datetime | None) -> None:
        envelope = OutboundEnvelope(
            integrationId=record.integration_id,
            deliveryId=delivery_id(record.id),
            body=webhook_body(record),
            createdAt=utcnow(),
            acceptedAt=accepted_at,
        )
        partition = partition_of(record.conversation_id, self._broker.topology.partitions)
        with self._metrics.publish_latency.labels("outbound").time():
            await self._broker.publish(
                "outbound", partition, dump_json(envelope), message_id=envelope.deliveryId
            )
        self._metrics.published.labels("outbound").inc()

    async def push(
        self,
        conversation: ConversationRecord,
        type_: str,
        payload: dict[str, Any],
        idempotency_key: str | None = None,
    ) -> tuple[OutgoingRecord, bool]:
        """Store and publish one response the bot sends on its own; (record, created)."""
        record, created = await self._store.record_pushed(
            conversation, type_, payload, idempotency_key
        )
        await self.publish([record])
        return record, created
