"""The queue gauges of a process (depth, consumers, dead letters, and with the management API
each quorum queue's members up), kept fresh while it runs."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any, Protocol

import structlog

from relay.aio import cancel_and_wait, pause
from relay.broker import CONNECTION_ERRORS, STAGES, Broker, StageName
from relay.broker.queues import export, survey
from relay.metrics import Metrics
from relay.settings import Settings
from relay.store import StoreError


class GaugeStore(Protocol):
    """What the gauges read from the store."""

    async def partition_counts(self) -> Mapping[int, Any]:
        """The partition counts noted in the store (`Generations.partition_counts`)."""

    async def dead_letter_summary(self) -> dict[StageName, tuple[int, int | None]]:
        """The dead letters kept, by stage (`DeadLetterStore`)."""


log = structlog.get_logger(__name__)


class Watcher:
    """Keeps the queue gauges fresh: one per process, however many services it runs (`relay
    run` has three), since every one of them would look at the same queues."""

    def __init__(self) -> None:
        self._task: asyncio.Task[None] | None = None

    def start(
        self, broker: Broker, metrics: Metrics, settings: Settings, store: GaugeStore | None = None
    ) -> bool:
        """Start watching through `broker`; False if this process already watches. `store`:
        where the partition counts in use (whose queues are watched too) and the dead
        letters are."""
        if self._task is not None:
            return False
        self._task = asyncio.create_task(
            watch(broker, metrics, settings, store), name="queue-watch"
        )
        return True

    async def stop(self) -> None:
        """Stop watching (the one who started it, before closing its broker)."""
        task, self._task = self._task, None
        await cancel_and_wait(task)


async def watch(
    broker: Broker, metrics: Metrics, settings: Settings, store: GaugeStore | None = None
) -> None:
    """Refresh the queue and dead-letter gauges every RELAY_QUEUE_WATCH_INTERVAL while the
    service runs."""
    while True:
        await _count_dead_letters(store, metrics)
        connection = broker.connection
        if connection is not None and broker.ready:
            try:
                others = await _other_counts(store)
                stats, unanswered = await survey(
                    connection, broker.topology, others, settings.management_url
                )
                if unanswered is not None:
                    log.warning("management_api_unreachable", error=type(unanswered).__name__)
                export(stats, metrics)
            except CONNECTION_ERRORS as error:
                log.debug("queue_look_failed", error=str(error))
            except Exception:
                log.exception("queue_look_failed")  # never the end of the gauges
        await pause(settings.queue_watch_interval)


async def _count_dead_letters(store: GaugeStore | None, metrics: Metrics) -> None:
    if store is None:
        return
    try:
        summary = await store.dead_letter_summary()
    except StoreError as error:
        log.debug("dead_letters_uncounted", error=str(error))
        return
    for stage in STAGES:
        metrics.dead_letters.labels(stage).set(summary.get(stage, (0, None))[0])


async def _other_counts(store: GaugeStore | None) -> list[int]:
    """The partition counts in use (during and after a change of RELAY_PARTITIONS, the
    other count's queues are worth watching too); none if the store does not answer."""
    if store is None:
        return []
    try:
        return list(await store.partition_counts())
    except StoreError as error:
        log.debug("partition_counts_unknown", error=str(error))
        return []
