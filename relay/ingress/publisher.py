"""Publishing an inbound message: on its conversation's partition with a confirm, then
marked queued in the store. The acceptor publishes what a request wrote; the inbound outbox
(`relay.ingress.inbound_outbox`) what a crashed process left pending."""

from __future__ import annotations

from relay.broker import Broker
from relay.metrics import Metrics
from relay.pipeline.unpublishable import envelope_bytes
from relay.store import Queued
from relay.store.batching import GroupCommit
from relay.wire import (
    FIRST_COPY_HEADER,
    REQUEST_ID_HEADER,
    InboundEnvelope,
    MessageBundle,
    utcnow,
)


class InboundPublisher:
    """Puts inbound messages on the broker and marks them queued (in batches)."""

    def __init__(self, store: Queued, broker: Broker, metrics: Metrics) -> None:
        self._queued = GroupCommit(store.mark_queued, "mark-inbound-queued")
        self._broker = broker
        self._metrics = metrics

    @property
    def partitions(self) -> int:
        """This service's inbound partition count (it may change while it runs)."""
        return self._broker.topology.partitions

    async def publish(
        self,
        integration_id: str,
        bundle: MessageBundle,
        text: str,
        request_id: str | None,
        partitions: int | None,
        sequence: int | None,
        first: bool = False,
    ) -> None:
        """Put the message on its inbound partition among `partitions` (the count its
        conversation is published under; None: this service's) and wait for the confirm
        (`first`: the message's first publish ever). `sequence`: its number in its
        conversation, by which the bot stage checks the broker's order."""
        body = envelope_bytes(
            lambda: InboundEnvelope(
                integrationId=integration_id,
                text=text,
                bundle=bundle,
                acceptedAt=utcnow(),
                requestId=request_id,
                sequence=sequence,
            )
        )
        with self._metrics.publish_latency.labels("inbound").time():
            await self._broker.publish(
                "inbound",
                bundle.conversation.id,
                body,
                message_id=bundle.message.id,
                headers={REQUEST_ID_HEADER: request_id or "", FIRST_COPY_HEADER: int(first)},
                partitions=partitions,
            )
        self._metrics.published.labels("inbound").inc()

    async def mark_queued(self, integration_id: str, bundle: MessageBundle) -> None:
        """The publish was confirmed: mark the message queued and tell the bot workers of
        its conversation. A cancelled request does not leave it pending: the mark joined
        its batch before the request's first wait."""
        await self._queued.add(bundle.message.id)
        self._broker.news.announce(integration_id, bundle.conversation.id)
