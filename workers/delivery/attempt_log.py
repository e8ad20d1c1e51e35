"""Logging each delivery attempt: a line for the operator, a row in the attempt log.

The row is what tells a worker meeting the conversation later that a response is finished
(or when it is tried again): rows are written in groups (`relay.store.batching`), and an
attempt that could not be logged is said so, for its response to be sent again.
"""

from __future__ import annotations

from datetime import UTC, datetime

import structlog

from relay.pipeline.settle import Outcome, Verdict
from relay.store import AttemptRecord, Attempts
from relay.store.batching import GroupCommit
from relay.wire import DUE_HEADER, OutboundEnvelope, utcnow
from workers.delivery.sender import Sent

log = structlog.get_logger(__name__)


class AttemptLog:
    """The attempt log as the delivery worker writes it."""

    def __init__(self, store: Attempts) -> None:
        self._attempts = GroupCommit(store.record_attempts, "attempt-log")

    async def add(self, envelope: OutboundEnvelope, sent: Sent, verdict: Verdict) -> bool:
        """Log the attempt of `envelope` and its verdict (False: the row was not written)."""
        log.info(
            "delivery_attempt",
            status=sent.status,
            error=sent.error,
            latency_ms=sent.latency_ms,
            outcome=verdict.outcome.value,
        )
        try:
            await self._attempts.add(record(envelope, sent, verdict))
        except Exception as error:
            log.warning("attempt_not_logged", error=f"{type(error).__name__}: {error}")
            return False
        return True


def record(envelope: OutboundEnvelope, sent: Sent, verdict: Verdict) -> AttemptRecord:
    """The attempt log's row of one attempt (its next attempt's time, if it retries)."""
    due = verdict.headers.get(DUE_HEADER)
    next_at = (
        datetime.fromtimestamp(due / 1000, UTC)
        if verdict.outcome is Outcome.RETRY and isinstance(due, int)
        else None
    )
    return AttemptRecord(
        delivery_id=envelope.deliveryId,
        attempt=envelope.attempt,
        integration_id=envelope.integrationId,
        message_id=envelope.body.botpressMessageId,
        status=sent.status,
        latency_ms=sent.latency_ms,
        error=sent.error,
        next_attempt_at=next_at,
        response_body=sent.body,
        created_at=utcnow(),
    )
