"""Bounds on the dead letters kept in the store: an age and a length per stage, enforced
oldest first by the janitor (`relay.service.janitor`).

Each dead letter that goes is counted (`relay_dead_letters_expired_total{stage,reason}`) and
logged with its ids (`dead_letter_expired`) as it is deleted.
"""

from __future__ import annotations

from dataclasses import dataclass

import structlog

from relay.broker import STAGES, StageName
from relay.metrics import Metrics
from relay.pipeline.dlq_keeper import ID_FIELD
from relay.store import DeadLetter, DeadLetterFilter, DeadLetterStore

log = structlog.get_logger(__name__)

# Letters deleted per statement.
BATCH = 500


@dataclass(frozen=True)
class Bounds:
    """How long a dead letter is kept and how many a stage keeps (0: no bound)."""

    max_age: float  # seconds since it was dead-lettered
    max_length: int

    def excess(self, count: int) -> int:
        """How many of `count` dead letters are beyond the length bound."""
        return max(0, count - self.max_length) if self.max_length else 0

    def reason(self, age: float | None, over_length: bool) -> str | None:
        """Why a dead letter of that age (None: unknown) goes, or None if it stays."""
        if self.max_age and age is not None and age > self.max_age:
            return "age"
        return "length" if over_length else None


async def enforce(
    store: DeadLetterStore, bounds: Bounds, metrics: Metrics, now: float
) -> dict[StageName, int]:
    """Expire the dead letters beyond the bounds in each stage; how many, by stage."""
    summary = await store.dead_letter_summary()
    return {
        stage: await _trim(store, stage, summary.get(stage, (0, None))[0], bounds, metrics, now)
        for stage in STAGES
    }


async def _trim(
    store: DeadLetterStore,
    stage: StageName,
    count: int,
    bounds: Bounds,
    metrics: Metrics,
    now: float,
) -> int:
    excess = bounds.excess(count)
    if not count or not (excess or bounds.max_age):
        return 0
    expired = 0
    while batch := await store.dead_letters(DeadLetterFilter(stage=stage), None, BATCH):
        going: list[tuple[DeadLetter, str, float]] = []
        for letter in batch:
            age = now - letter.dead_at
            reason = bounds.reason(age, over_length=expired + len(going) < excess)
            if reason is None:
                break
            going.append((letter, reason, age))
        if not going:
            break
        await store.forget_dead_letters([letter for letter, _, _ in going])
        for letter, reason, age in going:
            _count(letter, reason, age, metrics)
        expired += len(going)
        if len(going) < len(batch):
            break
    return expired


def _count(letter: DeadLetter, reason: str, age: float, metrics: Metrics) -> None:
    metrics.dead_letters_expired.labels(letter.stage, reason).inc()
    log.warning(
        "dead_letter_expired",
        **{ID_FIELD[letter.stage]: letter.id},
        stage=letter.stage,
        integration_id=letter.integration_id,
        conversation_id=letter.conversation_id,
        reason=reason,
        dead_reason=letter.reason,
        age=round(age),
    )
