"""Bot responses onto the outbound stage: stored first (numbered), then published in order.

Used by the bot worker for a turn's replies and by the ingress for replies the bot pushes
later (push API, Bot Framework connector), so every response takes the same path.
"""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Any

import structlog

from relay.broker import Broker
from relay.lru import Lru
from relay.metrics import Metrics
from relay.pipeline.unpublishable import Burial, Unpublishable, envelope_bytes
from relay.store import ConversationRecord, Outgoing, OutgoingRecord
from relay.store.batching import GroupCommit
from relay.store.records import Unreadable
from relay.views import delivery_id, webhook_body
from relay.wire import OutboundEnvelope, utcnow

log = structlog.get_logger(__name__)

SETTLED_LIMIT = 50_000  # conversations remembered as settled (the least recent go first)


def _unreadable(record: OutgoingRecord, reason: str) -> Unreadable:
    return Unreadable(record.id, record.integration_id, record.conversation_id, reason)


class ReplyPublisher:
    """Publishes stored responses to their outbound partition, with confirms, then marks them."""

    def __init__(self, store: Outgoing, broker: Broker, metrics: Metrics) -> None:
        self._store = store
        self._queued = GroupCommit(store.mark_queued, "mark-responses-queued")
        self._broker = broker
        self._metrics = metrics
        self._burial = Burial(store, broker, metrics, "outbound")
        # Conversations last seen published under this service's partition count.
        self._settled: Lru[str, bool] = Lru(SETTLED_LIMIT)

    @property
    def partitions(self) -> int:
        """This service's partition count."""
        return self._broker.topology.partitions

    async def settle(self, conversation_id: str) -> None:
        """Before storing responses of a conversation not seen here under this service's
        partition count: move it there, if nothing of it is unfinished in the stage (once per
        conversation while it stays there: the store reads its count anyway)."""
        if self._settled.get(conversation_id):
            return
        count = await self._store.settle_partitions(conversation_id, "outbound", self.partitions)
        if count == self.partitions:
            self._settled.put(conversation_id, True)

    async def publish(
        self, records: list[OutgoingRecord], accepted_at: datetime | None = None
    ) -> None:
        """Publish the not-yet-queued records in sequence order (BrokerUnavailable if not).

        `accepted_at`: when the user's message they answer was accepted (for latency).
        """
        waiting = [r for r in sorted(records, key=lambda r: r.sequence) if r.state != "queued"]
        # Back to back on the channel, in sequence order (its lock takes them in the order
        # they start), the confirms awaited together.
        outcomes = await asyncio.gather(
            *(self._publish_one(record, accepted_at) for record in waiting),
            return_exceptions=True,
        )
        published = [r.id for r, outcome in zip(waiting, outcomes, strict=True) if outcome is None]
        try:
            for record, outcome in zip(waiting, outcomes, strict=True):
                if isinstance(outcome, Unpublishable):
                    # Ended, not retried: the responses behind it go on (a worker meeting the
                    # skipped number asks the store, which has it dead).
                    await self.bury_unreadable(_unreadable(record, str(outcome)))
                elif isinstance(outcome, BaseException):
                    raise outcome
                else:
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
            # (Written even if this is cancelled: they joined the batch before the wait.)
            await self._queued.add_all(published)

    async def bury_unreadable(self, row: Unreadable) -> None:
        """End a stored response that can never be published: dead, in the dead-letter queue
        with the reason (BrokerUnavailable if that cannot be done now)."""
        letter = {
            "integrationId": row.integration_id,
            "deliveryId": delivery_id(row.id),
            "body": {"botpressConversationId": row.conversation_id, "botpressMessageId": row.id},
        }
        await self._burial.bury(row.id, delivery_id(row.id), letter, row.reason)

    async def send_again(self, record: OutgoingRecord) -> bool:
        """Publish a stored response once more, as a first attempt under its webhook-id
        (an operator's resend or recovery), whatever became of it before; False if it can
        never be published (then its outbox ended it dead, with a dead letter, already:
        such a response was never published, so never tried nor given up)."""
        try:
            await self._publish_one(record, None)
        except Unpublishable as error:
            log.warning("resend_unpublishable", response_id=record.id, reason=str(error))
            return False
        return True

    async def _publish_one(self, record: OutgoingRecord, accepted_at: datetime | None) -> None:
        body = envelope_bytes(
            lambda: OutboundEnvelope(
                integrationId=record.integration_id,
                deliveryId=delivery_id(record.id),
                body=webhook_body(record),
                createdAt=utcnow(),
                acceptedAt=accepted_at,
            )
        )
        if record.partitions not in (None, self.partitions):
            # Another service moved the conversation: try to move it back next time.
            self._settled.pop(record.conversation_id)
        with self._metrics.publish_latency.labels("outbound").time():
            await self._broker.publish(
                "outbound",
                record.conversation_id,
                body,
                message_id=delivery_id(record.id),
                partitions=record.partitions,
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
        await self.settle(conversation.id)
        record, created = await self._store.record_pushed(
            conversation, type_, payload, idempotency_key, self.partitions
        )
        self._broker.news.announce(conversation.integration_id, conversation.id)
        await self.publish([record])
        return record, created
