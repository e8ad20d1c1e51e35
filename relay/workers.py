"""Running a stage worker inside a service: its store, broker and worker opened at start,
and closed at stop after the worker finished or returned what it holds."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from aiohttp import web

from relay.broker import Broker
from relay.consumer import StageWorker
from relay.ingress.app import topology_of
from relay.metrics import Metrics
from relay.service import (
    METRICS_KEY,
    READINESS_KEY,
    WATCHER_KEY,
    ReadinessCheck,
    broker_check,
    store_check,
)
from relay.settings import Settings
from relay.store import Store, open_store_patiently

Closer = Callable[[], Awaitable[None]]
WorkerFactory = Callable[[Store, Broker, Metrics], tuple[StageWorker[Any], Closer]]
Context = Callable[[web.Application], contextlib.AbstractAsyncContextManager[None]]


def worker_context(settings: Settings, name: str, factory: WorkerFactory) -> Context:
    """A cleanup context that runs the worker `factory` builds while the application runs."""

    @contextlib.asynccontextmanager
    async def running(app: web.Application) -> AsyncIterator[None]:
        store = await open_store_patiently(
            settings.database_url, settings.database_pool_size, settings.startup_wait
        )
        broker = Broker(settings.amqp_url, topology_of(settings), settings.publish_timeout)
        broker.start()
        worker, close_extra = factory(store, broker, app[METRICS_KEY])
        app[READINESS_KEY].extend(
            [
                (f"{name}_broker", broker_check(broker)),
                (f"{name}_store", store_check(store)),
                (f"{name}_partitions", stall_check(worker)),
            ]
        )
        await worker.start(settings.startup_wait)
        watching = app[WATCHER_KEY].start(broker, app[METRICS_KEY], settings.queue_watch_interval)
        try:
            yield
        finally:
            if watching:
                await app[WATCHER_KEY].stop()
            await worker.stop(settings.shutdown_timeout)
            await close_extra()
            await broker.close()
            await store.close()

    return lambda app: running(app)


def stall_check(worker: StageWorker[Any]) -> ReadinessCheck:
    """Not ready while a partition holds a message unstarted beyond the stall limit."""

    async def check() -> str | None:
        stalled = worker.stalled()
        if not stalled:
            return None
        listed = ", ".join(f"{n} ({age}s)" for n, age in sorted(stalled.items()))
        return f"stalled partitions (oldest unstarted message): {listed}"

    return check
