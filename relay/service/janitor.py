"""The janitor of the worker services: every RELAY_PRUNE_INTERVAL, prune the store
(`relay.admin.retention`, RELAY_RETENTION_DAYS) and bound the dead-letter queues
(`relay.pipeline.dlq_bounds`, RELAY_DLQ_MAX_AGE and RELAY_DLQ_MAX_LENGTH) in the store.

No coordinator: of all the janitors sharing a store, the one holding the `janitor` lease
does the work. Its holder renews it at each look, so the others' looks find it taken and
do nothing; once its holder stops (which lets it go) or dies (and it expires), the next
look of another takes over. The work itself is under the `prune` lease, which `relay
prune` takes too: one prune at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from datetime import timedelta
from typing import Protocol

import structlog

from relay.admin.retention import LEASE_SECONDS, PRUNE_LEASE, Lease, prune
from relay.aio import cancel_and_wait, pause
from relay.metrics import Metrics
from relay.pipeline.dlq_bounds import Bounds, enforce
from relay.settings import Settings
from relay.store import DeadLetterStore, Retention, StoreError
from relay.wire import utcnow

log = structlog.get_logger(__name__)

JANITOR_LEASE = "janitor"
# A file made before incremental vacuum is switched to it (one whole VACUUM, which blocks
# writers while it runs) by a janitor only up to this size; `relay prune` does any size.
FULL_VACUUM_LIMIT = 64 * 1024 * 1024
# The first look comes this long after start at most: a starting service (a deploy, a
# backlog to catch up on) is busy enough.
FIRST_LOOK = 60.0


class JanitorStore(Retention, DeadLetterStore, Protocol):
    """What the janitor prunes and bounds."""


class Janitor:
    """Prunes and bounds the dead letters in the background while a worker service runs."""

    def __init__(self, settings: Settings, store: JanitorStore, metrics: Metrics) -> None:
        self._settings = settings
        self._store = store
        self._metrics = metrics
        # Outlives an interval: its holder's next look renews it before it expires.
        self._turn = Lease(store, JANITOR_LEASE, 1.5 * settings.prune_interval)
        self._work = Lease(store, PRUNE_LEASE, LEASE_SECONDS)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Look now and then until stopped."""
        self._task = asyncio.create_task(self._run(), name="janitor")

    async def stop(self) -> None:
        """Stop (a prune under way stops between two batches) and let the leases go."""
        task, self._task = self._task, None
        await cancel_and_wait(task)
        with contextlib.suppress(StoreError):
            await self._turn.release()

    async def _run(self) -> None:
        await pause(min(self._settings.prune_interval, FIRST_LOOK))
        while True:
            try:
                await self.look()
            except Exception:
                log.exception("janitor_failed")  # never the end of the janitor
            await pause(self._settings.prune_interval)

    async def look(self) -> bool:
        """Prune and bound the dead letters if it is this janitor's turn and nobody else
        prunes now; whether it did."""
        try:
            if not (await self._turn.take() and await self._work.take()):
                return False
        except StoreError as error:
            log.warning("janitor_lease_failed", error=str(error))
            return False
        try:
            await self._prune()
            await self._bound_dead_letters()
        finally:
            with contextlib.suppress(StoreError):
                await self._work.release()
        return True

    async def _prune(self) -> None:
        if not self._settings.retention_days:
            return  # kept for ever
        cutoff = utcnow() - timedelta(days=self._settings.retention_days)
        try:
            pruned, _ = await prune(self._store, self._work, cutoff, FULL_VACUUM_LIMIT)
        except StoreError as error:
            log.warning("prune_failed", error=str(error))  # the next look goes on from there
            return
        for kind, count in pruned.counts.items():
            self._metrics.pruned.labels(kind).inc(count)

    async def _bound_dead_letters(self) -> None:
        bounds = Bounds(self._settings.dlq_max_age, self._settings.dlq_max_length)
        if not (bounds.max_age or bounds.max_length):
            return
        try:
            expired = await enforce(self._store, bounds, self._metrics, time.time())
        except StoreError as error:
            log.warning("dead_letter_bounds_failed", error=str(error))
            return
        if any(expired.values()):
            log.info("dead_letters_bounded", **expired)
