"""What an attempt's answer makes of a response: 2xx done; 410 dead-letters and disables
the endpoint; another 4xx (but 408, 409, 425, 429) dead-letters; anything else retries on
the schedule, with jitter, `Retry-After` (clamped) and an overload penalty, until attempts
or age run out. Waits are spent in the outbound delay queues, the time they end carried in
a header (`wait_for`). A response given up on, and an integration disabled, are told to the
back end's operations URL (`workers.delivery.telling`)."""

from __future__ import annotations

import time
from collections.abc import Sequence

import structlog

from relay.metrics import Metrics
from relay.pipeline.delays import first_hop
from relay.pipeline.settle import Outcome, Verdict
from relay.settings import Settings
from relay.store import Attempts, IntegrationRecord
from relay.wire import ATTEMPTS_HEADER, DUE_HEADER, LAST_STATUS_HEADER, OutboundEnvelope, utcnow
from workers.delivery.backoff import next_delay, parse_retry_after
from workers.delivery.sender import Sent
from workers.delivery.telling import Teller

log = structlog.get_logger(__name__)

RETRYABLE_4XX = frozenset({408, 409, 425, 429})


def due_in(seconds: float, queues: Sequence[float]) -> tuple[float, dict[str, str | int]]:
    """The first delay-queue hop of a wait, and the header saying when it is over."""
    return first_hop(seconds, queues), {DUE_HEADER: int((time.time() + seconds) * 1000)}


def wait_for(seconds: float, reason: str, queues: Sequence[float]) -> Verdict:
    """A wait of `seconds` in the delay queues, holding the conversation's order."""
    delay, headers = due_in(seconds, queues)
    return Verdict(Outcome.WAIT, delay=delay, reason=reason, holds_order=True, headers=headers)


def retry_delay(settings: Settings, following: int, sent: Sent) -> float:
    """Seconds before attempt `following` after a send that got `sent`: the schedule's, or
    the endpoint's `Retry-After`, and at least the overload penalty after a timeout or a 429
    (the endpoint is struggling)."""
    return next_delay(
        settings.delivery_retry_schedule[following],
        parse_retry_after(sent.retry_after, utcnow()),
        overloaded=sent.timed_out or sent.status == 429,
        penalty=settings.delivery_overload_penalty,
    )


class Judge:
    """Turns an attempt's answer into a verdict, and counts it."""

    def __init__(
        self,
        settings: Settings,
        store: Attempts,
        metrics: Metrics,
        queues: Sequence[float],
        teller: Teller,
    ) -> None:
        self._settings = settings
        self._store = store
        self._metrics = metrics
        self._queues = queues  # the delay queues' seconds, in order
        self._teller = teller

    async def judge(
        self, envelope: OutboundEnvelope, integration: IntegrationRecord, sent: Sent
    ) -> Verdict:
        """The verdict on an attempt of `envelope` to the integration's endpoint."""
        self._count(envelope, sent)
        if sent.ok:
            return Verdict(Outcome.DONE)
        reason = sent.error or f"the endpoint answered {sent.status}"
        headers: dict[str, str | int] = {
            LAST_STATUS_HEADER: sent.status or 0,
            ATTEMPTS_HEADER: envelope.attempt + 1,
        }
        if sent.status == 410:
            now = utcnow()
            if await self._store.disable(integration.id, now):
                log.warning("endpoint_disabled", integration_id=integration.id)
                await self._teller.disabled(integration, now)
            return Verdict(Outcome.DEAD, reason="410 Gone: endpoint disabled", headers=headers)
        if sent.refused or permanent(sent.status):
            return Verdict(Outcome.DEAD, reason=reason, headers=headers)
        return self._retry_or_dead(envelope, sent, reason, headers)

    async def tell(
        self,
        envelope: OutboundEnvelope,
        verdict: Verdict,
        integration: IntegrationRecord | None = None,
    ) -> Verdict:
        """The verdict on `envelope`, once a death (whatever decided it) is told to the
        integration's operations URL (queued, with the broker's confirm, before the verdict
        is settled)."""
        await self._teller.dead(envelope, verdict, integration)
        return verdict

    def _retry_or_dead(
        self,
        envelope: OutboundEnvelope,
        sent: Sent,
        reason: str,
        headers: dict[str, str | int],
    ) -> Verdict:
        schedule = self._settings.delivery_retry_schedule
        following = envelope.attempt + 1
        age = (utcnow() - envelope.createdAt).total_seconds()
        if following >= len(schedule) or age > self._settings.delivery_max_age:
            return Verdict(
                Outcome.DEAD,
                reason=f"gave up after {following} attempts: {reason}",
                headers=headers,
            )
        seconds = retry_delay(self._settings, following, sent)
        body = envelope.model_copy(update={"attempt": following}).model_dump_json().encode()
        delay, due = due_in(seconds, self._queues)
        return Verdict(Outcome.RETRY, delay=delay, reason=reason, body=body, headers=due)

    def _count(self, envelope: OutboundEnvelope, sent: Sent) -> None:
        status_class = f"{sent.status // 100}xx" if sent.status else "error"
        outcome = "delivered" if sent.ok else "failed"
        self._metrics.delivery_attempts.labels(outcome, status_class).inc()
        self._metrics.delivery_latency.observe(sent.latency_ms / 1000)
        if sent.ok:
            now = utcnow()
            self._metrics.response_age.observe((now - envelope.createdAt).total_seconds())
            if envelope.acceptedAt is not None:
                self._metrics.end_to_end.observe((now - envelope.acceptedAt).total_seconds())


def permanent(status: int | None) -> bool:
    """A 4xx the endpoint will answer again: retrying cannot help."""
    return status is not None and 400 <= status < 500 and status not in RETRYABLE_4XX
