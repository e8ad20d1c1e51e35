"""The inbound outbox: pending messages whose lease ran out (a crash between the store's
commit and the broker's confirm), claimed and published again under the same relay id;
`relay.pipeline.outbox` runs the sweep."""

from __future__ import annotations

from datetime import timedelta

import structlog

from relay.broker import BrokerUnavailable
from relay.ingress.publisher import InboundPublisher
from relay.pipeline.unpublishable import Burial, Unpublishable
from relay.store import Inbound, PendingMessage
from relay.store.records import Unreadable
from relay.wire import utcnow

log = structlog.get_logger(__name__)


class InboundOutbox:
    """Claims and publishes stale pending inbound messages; buries those that never can be."""

    def __init__(
        self, store: Inbound, publisher: InboundPublisher, burial: Burial, lease: timedelta
    ) -> None:
        self._store = store
        self._publisher = publisher
        self._burial = burial
        self._lease = lease

    async def sweep_outbox(self, limit: int = 100) -> int:
        """Publish pending messages whose lease ran out, one by one; how many were queued.

        A message that can never be published is ended dead (`relay.pipeline.unpublishable`)
        and the sweep goes on; the broker's failure ends the sweep (the next one tries again).
        """
        now = utcnow()
        stale = await self._store.claim_stale_pending(now, now + self._lease, limit)
        queued = 0
        for pending in stale:
            if isinstance(pending, Unreadable):
                await self._bury(pending)
                continue
            try:
                queued += await self._republish(pending)
            except Unpublishable as error:
                bundle = pending.bundle
                row = Unreadable(
                    bundle.message.id, pending.integration_id, bundle.conversation.id, str(error)
                )
                await self._bury(row, {"messageId": bundle.message.tags.id})
        return queued

    async def _bury(self, row: Unreadable, caller_ids: dict[str, str] | None = None) -> None:
        """Dead-letter a message that can never be published, its letter holding the ids the
        dead-letter listing reads (`relay.pipeline.dlq.read`) and those of the caller known."""
        letter = {
            "integrationId": row.integration_id,
            "bundle": {"conversation": {"id": row.conversation_id}, "message": {"id": row.id}},
            **(caller_ids or {}),
        }
        await self._burial.bury(row.id, row.id, letter, row.reason)

    async def _republish(self, pending: PendingMessage) -> int:
        message = pending.bundle.message
        try:
            await self._publisher.publish(
                pending.integration_id,
                pending.bundle,
                pending.text,
                pending.request_id,
                pending.partitions,
                pending.sequence,
            )
        except BrokerUnavailable as error:
            # Left pending: the lease just taken runs out and a later sweep tries again.
            log.warning("outbox_publish_failed", message_id=message.id, error=str(error))
            raise
        await self._publisher.mark_queued(pending.integration_id, pending.bundle)
        log.info(
            "outbox_published",
            message_id=message.id,
            conversation_id=pending.bundle.conversation.id,
        )
        return 1
