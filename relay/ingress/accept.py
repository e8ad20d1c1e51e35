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
under the same relay id (`relay.ingress.inbound_outbox`). Concurrent duplicates wait for
the first request's outcome instead of publishing twice.

A request's path: `Acceptor.accept` makes attempts (`_attempt`): the store records the
message (`Inbound.accept_incoming`); a new one is published (`_publish_or_discard`), an
existing one waited for (`_settle_existing`).
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from datetime import timedelta

import structlog

from relay.broker import Broker, BrokerUnavailable
from relay.errors import Conflict, InvalidBody, Unavailable
from relay.ingress.inbound_outbox import InboundOutbox
from relay.ingress.publisher import InboundPublisher
from relay.metrics import Metrics
from relay.pipeline.unpublishable import Burial, Unpublishable
from relay.retry import pauses
from relay.store import Accepted, Inbound, StoreError, Vanished
from relay.wire import InboundRequest, MessageBundle, utcnow

log = structlog.get_logger(__name__)

_POLL_FIRST, _POLL_MAX = 0.005, 0.2
# Attempts per request. Each one that comes to nothing met a concurrent discard (another
# request's publish failed), which is rare and over at once.
_ATTEMPTS = 5


def _retry_later(message: str) -> Unavailable:
    return Unavailable(message, headers={"Retry-After": "1"})


class Acceptor:
    """Records and queues inbound messages; one per ingress, shared by its handlers."""

    def __init__(
        self, store: Inbound, broker: Broker, metrics: Metrics, lease: float, wait: float
    ) -> None:
        self._store = store
        self._metrics = metrics
        self._lease = timedelta(seconds=lease)
        # How long a duplicate waits for the first request's publish before answering 503.
        self._wait = wait
        self.publisher = InboundPublisher(store, broker, metrics)
        burial = Burial(store, broker, metrics, "inbound")
        self.outbox = InboundOutbox(store, self.publisher, burial, self._lease)

    async def accept(
        self, integration_id: str, request: InboundRequest, request_id: str | None
    ) -> MessageBundle:
        """The message's objects once it is queued; Conflict or Unavailable otherwise."""
        # The one retry of the accept path. Here, not in the store: an attempt comes to
        # nothing in two ways, and only this layer sees both — the store's write finding
        # what it relied on removed (`Vanished`), and a duplicate's wait finding the first
        # request's row discarded. Either way the whole attempt is made afresh, the store's
        # write included, so the store answers each attempt's outcome and never retries.
        for _ in range(_ATTEMPTS):
            bundle = await self._attempt(integration_id, request, request_id)
            if bundle is not None:
                return bundle
        raise _retry_later("the message could not be accepted; send it again")

    async def _attempt(
        self, integration_id: str, request: InboundRequest, request_id: str | None
    ) -> MessageBundle | None:
        """The message's objects once queued, by this request or a concurrent one; None if
        a concurrent discard took away what this attempt found."""
        outcome = await self._store.accept_incoming(
            integration_id,
            request,
            utcnow() + self._lease,
            request_id,
            self.publisher.partitions,
        )
        if isinstance(outcome, Vanished):
            return None
        if outcome.created:
            # Written by this attempt, with this request's own fingerprint: nothing to compare.
            return await self._publish_or_discard(integration_id, outcome, request_id, first=True)
        if outcome.fingerprint != request.fingerprint():
            self._metrics.inbound.labels("conflict").inc()
            raise Conflict(
                "messageId was already used with a different body",
                details={"messageId": request.messageId},
            )
        settled = await self._settle_existing(integration_id, outcome, request_id)
        if settled is not None:
            self._metrics.inbound.labels("duplicate").inc()
        return settled

    async def _publish_or_discard(
        self, integration_id: str, accepted: Accepted, request_id: str | None, first: bool
    ) -> MessageBundle:
        message_id = accepted.bundle.message.id
        try:
            await self.publisher.publish(
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
            await self.publisher.mark_queued(integration_id, accepted.bundle)
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
