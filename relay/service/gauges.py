"""The queue gauges of a process (depth, consumers, dead letters), kept fresh while it runs."""

from __future__ import annotations

import asyncio
import contextlib

import structlog

from relay.aio import pause
from relay.broker import CONNECTION_ERRORS, Broker
from relay.broker.queues import export, look
from relay.metrics import Metrics

log = structlog.get_logger(__name__)


class Watcher:
    """Keeps the queue gauges fresh: one per process, however many services it runs (`relay
    run` has three), since every one of them would look at the same queues."""

    def __init__(self) -> None:
        self._task: asyncio.Task[None] | None = None

    def start(self, broker: Broker, metrics: Metrics, interval: float) -> bool:
        """Start watching through `broker`; False if this process already watches."""
        if self._task is not None:
            return False
        self._task = asyncio.create_task(watch(broker, metrics, interval), name="queue-watch")
        return True

    async def stop(self) -> None:
        """Stop watching (the one who started it, before closing its broker)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def watch(broker: Broker, metrics: Metrics, interval: float) -> None:
    """Refresh the queue gauges every `interval` seconds while the service runs."""
    while True:
        connection = broker.connection
        if connection is not None and broker.ready:
            try:
                export(await look(connection, broker.topology), metrics)
            except CONNECTION_ERRORS as error:
                log.debug("queue_look_failed", error=str(error))
            except Exception:
                log.exception("queue_look_failed")  # never the end of the gauges
        await pause(interval)
