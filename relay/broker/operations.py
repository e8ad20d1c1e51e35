"""Queueing operations events (`relay.wire.operations`) for the delivery workers to send.

An event is published persistently, with the broker's confirm, to `{prefix}.operations`:
from there a delivery worker POSTs it to the integration's operations URL, retrying on its
own schedule (`workers.delivery.operations`). Whoever notices an event only queues it,
which takes a broker round trip, never a POST: the back end's operations endpoint, slow or
down, never holds a conversation's deliveries nor an admin request.
"""

from __future__ import annotations

import asyncio

import structlog

from relay.aio import cancel_and_wait
from relay.broker.client import Broker, BrokerUnavailable
from relay.retry import pauses
from relay.wire import dump_json
from relay.wire.operations import OperationsEnvelope

log = structlog.get_logger(__name__)

SOON_TRIES = 4  # publishes `publish_soon` makes (over a few seconds) before giving up


class OperationsEvents:
    """Publishes operations events through `broker` (the ingress's or a worker's)."""

    def __init__(self, broker: Broker) -> None:
        self._broker = broker
        self._pending: set[asyncio.Task[None]] = set()

    async def publish(self, event: OperationsEnvelope) -> None:
        """Queue `event` and wait for the broker's confirm (BrokerUnavailable if none)."""
        await self._broker.publish_to(
            self._broker.topology.operations_exchange,
            "",
            dump_json(event),
            message_id=event.webhookId,
        )
        log.info(
            "operations_event_queued",
            type=event.event.type,
            integration_id=event.integrationId,
            webhook_id=event.webhookId,
        )

    def publish_soon(self, event: OperationsEnvelope) -> None:
        """Queue `event` in the background, trying a few times while the broker is away;
        for a caller that must not wait (its event is lost only if the broker stays away
        for seconds, or the process ends meanwhile)."""
        task = asyncio.create_task(self._publish_patiently(event), name="operations-publish")
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _publish_patiently(self, event: OperationsEnvelope) -> None:
        waits = pauses(0.5, 2.0)
        for tried in range(1, SOON_TRIES + 1):
            try:
                return await self.publish(event)
            except BrokerUnavailable as error:
                if tried == SOON_TRIES:
                    log.error(
                        "operations_event_not_queued",
                        type=event.event.type,
                        integration_id=event.integrationId,
                        webhook_id=event.webhookId,
                        error=str(error),
                    )
                    return
            await asyncio.sleep(next(waits))

    async def close(self) -> None:
        """Stop what `publish_soon` is still trying."""
        for task in list(self._pending):
            await cancel_and_wait(task)
