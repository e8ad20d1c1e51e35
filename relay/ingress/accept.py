"""Accepting an inbound message exactly once: record, publish with confirm, then mark.

The store is the arbiter of what was accepted. The message row is written first in
`pending` state with a lease; the publish follows; the broker's confirm marks it `queued`
and only then does the caller get its 200. A publish that fails — refused, not connected,
or unconfirmed within the timeout — deletes what the request wrote and answers 503, so a
retry starts afresh. An unconfirmed publish may still have reached the queue: consumers
drop an envelope whose message row does not exist (it was never accepted), and handle one
whose row is still `pending` (it is on the queue); storing the turn marks it queued, and a
discard then finds nothing of its own to delete.

A crash between the commit and the confirm leaves a `pending` row whose lease runs out;
the outbox sweeper (or the next retry of the same messageId) claims it and publishes it
under the same relay id. Concurrent duplicates wait for the first request's outcome
instead of publishing twice.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from datetime import timedelta

import structlog

from relay.broker import Broker, BrokerUnavailable
from relay.errors import Conflict, InvalidBody, Unavailable
from relay.metrics import Metrics
from relay.pipeline.unpublishable import Burial, Unpublishable, envelope_bytes
from relay.retry import pauses
from relay.store import Accepted, Inbound, PendingMessage, StoreError
from relay.store.batching import GroupCommit
from relay.store.records import Unreadable
from relay.wire import (
    FIRST_COPY_HEADER,
    REQUEST_ID_HEADER,
    InboundEnvelope,
    InboundRequest,
    MessageBundle,
    utcnow,
)

log = structlog.get_logger(__name__)

_POLL_FIRST, _POLL_MAX = 0.005, 0.2
_ATTEMPTS = 3


def _retry_later(message: str) -> Unavailable:
    return Unavailable(message, headers={"Retry-After": "1"})


class Acceptor:
    """Records and queues inbound messages; one per ingress, shared by its handlers."""

    def __init__(
        self, store: Inbound, broker: Broker, metrics: Metrics, lease: float, wait: float
    ) -> None:
        self._store = store
        self._queued = GroupCommit(store.mark_queued, "mark-inbound-queued")
        self._broker = broker
        self._metrics = metrics
        self._burial = Burial(store, broker, metrics, "inbound")
        self._lease = timedelta(seconds=lease)
        # How long a duplicate waits for the first request's publish before answering 503.
        self._wait = wait

    async def accept(
        self, integration_id: str, request: InboundRequest, request_id: str | None
    ) -> MessageBundle:
        """The message's objects once it is queued; Conflict or Unavailable otherwise."""
        for _ in range(_ATTEMPTS):
            accepted = await self._store.accept_incoming(
                integration_id,
                request,
                utcnow() + self._lease,
                request_id,
                self._broker.topology.partitions,
            )
            if accepted.fingerprint != request.fingerprint():
                self._metrics.inbound.labels("conflict").inc()
                raise Conflict(
                    "messageId was already used with a different body",
                    details={"messageId": request.messageId},
                )
            if accepted.created:
                return await self._publish_or_discard(
                    integration_id, accepted, request_id, first=True
                )
            settled = await self._settle_existing(integration_id, accepted, request_id)
            if settled is not None:
                self._metrics.inbound.labels("duplicate").inc()
                return settled
            # The first attempt failed and was discarded: this request tries afresh.
        raise _retry_later("the message could not be accepted; send it again")

    async def _publish_or_discard(
        self, integration_id: str, accepted: Accepted, request_id: str | None, first: bool
    ) -> MessageBundle:
        message_id = accepted.bundle.message.id
        try:
            await self.publish(
                integration_id,
                accepted.bundle,
                accepted.text,
                request_id,
                accepted.partitions,
                accepted.sequence,
                first=first,
            )
        except BrokerUnavailable as error:
            self._metrics.inbound.labels("unavailable").inc()
            log.warning("publish_failed", message_id=message_id, error=str(error))
            # Shielded: a cancelled request must not leave a half-accepted message behind.
            await asyncio.shield(self._store.discard_pending(accepted))
            raise _retry_later("the broker cannot take the message now; send it again") from error
        except Unpublishable as error:
            # Not the broker's failure: the same body would fail again. Nothing is kept.
            self._metrics.inbound.labels("unpublishable").inc()
            log.error("message_unpublishable", message_id=message_id, reason=str(error))
            await asyncio.shield(self._store.discard_pending(accepted))
            raise InvalidBody("the message cannot be queued", details=str(error)) from error
        try:
            await asyncio.shield(self._queued.add(message_id))
            self._broker.news.announce(integration_id, accepted.bundle.conversation.id)
        except StoreError as error:
            # The broker holds it: it is accepted. The row stays pending, so the outbox
            # publishes it again after the lease (consumers deduplicate on the relay id).
            log.error("mark_queued_failed", message_id=message_id, error=str(error))
        self._metrics.inbound.labels("accepted").inc()
        return accepted.bundle

    async def _settle_existing(
        self, integration_id: str, accepted: Accepted, request_id: str | None
    ) -> MessageBundle | None:
        """Wait until another request's publish of this message is settled.

        The bundle once queued; None if that publish failed and the row was discarded (or
        replaced by another request's, whose body the caller must compare afresh).
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._wait
        polls = pauses(_POLL_FIRST, _POLL_MAX)
        current: Accepted | None = accepted
        while current is not None and current.state == "pending":
            owner = await self._take_over(current)
            if owner is not None:
                mine = replace(current, lease_owner=owner)
                return await self._publish_or_discard(integration_id, mine, request_id, first=False)
            if loop.time() >= deadline:
                raise _retry_later("the message is still being accepted; send it again")
            # The other request may run in another process: the store is the only shared view.
            await asyncio.sleep(next(polls))
            message = current.bundle.message
            current = await self._store.find_incoming(integration_id, message.tags.id)
            if current is not None and current.bundle.message.id != message.id:
                return None
        return current.bundle if current is not None else None

    async def _take_over(self, accepted: Accepted) -> str | None:
        """Claim a pending message whose publisher died (its lease ran out)."""
        now = utcnow()
        if accepted.lease_until is None or accepted.lease_until >= now:
            return None
        return await self._store.claim_pending(accepted.bundle.message.id, now, now + self._lease)

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
            await self.publish(
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
        await asyncio.shield(self._queued.add(message.id))
        self._broker.news.announce(pending.integration_id, pending.bundle.conversation.id)
        log.info(
            "outbox_published",
            message_id=message.id,
            conversation_id=pending.bundle.conversation.id,
        )
        return 1
