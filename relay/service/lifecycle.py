"""One lifecycle for every role: the store and the broker opened at start with their
readiness checks, the queue gauges watched while the role runs, and everything closed at
stop in the reverse order. The ingress (`relay.ingress.app`) and each stage worker
(`worker_context`, with its janitor: `relay.service.janitor`) run inside it; a worker is
stopped, having finished or returned what it holds, before its broker and store close."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from aiohttp import web

from relay.aio import cancel_and_wait
from relay.broker import Broker, Topology, topology_of
from relay.metrics import Metrics
from relay.pipeline.dlq_keeper import Keeper, Telling
from relay.pipeline.generations import Generations, register_forever
from relay.pipeline.stage import StageWorker
from relay.service.app import (
    BROKERS_KEY,
    METRICS_KEY,
    READINESS_KEY,
    WATCHER_KEY,
    ReadinessCheck,
    broker_check,
    store_check,
)
from relay.service.janitor import Janitor
from relay.service.listeners import service_settings
from relay.settings import Settings
from relay.store import SecretBox, SqlStore, Store, open_store_patiently
from relay.tracing import Tracing
from relay.wire import utcnow

Closer = Callable[[], Awaitable[None]]
# A stage worker consuming the partition queues of a topology (one per partition count).
MakeWorker = Callable[[Topology], StageWorker[Any]]
WorkerFactory = Callable[[Store, Broker, Metrics], tuple[MakeWorker, Closer]]
# Who the stage's dead-letter keeper tells of the letters the broker dead-lettered.
TellingFactory = Callable[[Store, Broker], Telling]
Context = Callable[[web.Application], contextlib.AbstractAsyncContextManager[None]]


@contextlib.asynccontextmanager
async def dependencies(
    app: web.Application, settings: Settings, name: str = ""
) -> AsyncIterator[tuple[SqlStore, Broker]]:
    """The store (waited for up to `startup_wait`) and a broker connecting in the background,
    with their readiness checks (`broker` and `store`, after `{name}_` if named); closed on
    exit, the broker first. The broker carries the role's tracing (`Broker.tracing`: the
    ingress, or the `{name}` worker), whose last spans are sent after both are closed."""
    tracing = Tracing.open(settings, f"{name}-worker" if name else "ingress")
    try:
        async with _store_and_broker(app, settings, name, tracing) as opened:
            yield opened
    finally:
        await tracing.close()


@contextlib.asynccontextmanager
async def _store_and_broker(
    app: web.Application, settings: Settings, name: str, tracing: Tracing
) -> AsyncIterator[tuple[SqlStore, Broker]]:
    store = await open_store_patiently(
        settings.database_url,
        settings.database_pool_size,
        settings.startup_wait,
        SecretBox.of(settings.secret_keys),
    )
    # Workers consume the queues of every partition count a service runs with.
    await store.register_partitions(settings.partitions, utcnow())
    noting = asyncio.create_task(register_forever(store, settings.partitions), name="register")
    broker = Broker(settings.amqp_url, topology_of(settings), settings.publish_timeout, tracing)
    broker.start()
    app[BROKERS_KEY].append(broker)
    prefix = f"{name}_" if name else ""
    app[READINESS_KEY].extend(
        [(f"{prefix}broker", broker_check(broker)), (f"{prefix}store", store_check(store))]
    )
    try:
        yield store, broker
    finally:
        await cancel_and_wait(noting)
        await broker.close()
        await store.close()


@contextlib.asynccontextmanager
async def queue_gauges(
    app: web.Application, broker: Broker, settings: Settings, store: Store
) -> AsyncIterator[None]:
    """Refresh the queue gauges through `broker` (of every partition count noted in `store`)
    while in scope, unless another service of this process does already."""
    watching = app[WATCHER_KEY].start(broker, app[METRICS_KEY], settings, store)
    try:
        yield
    finally:
        if watching:
            await app[WATCHER_KEY].stop()


def worker_context(
    settings: Settings, name: str, factory: WorkerFactory, telling: TellingFactory | None = None
) -> Context:
    """A cleanup context that runs the worker `factory` builds while the application runs
    (giving the application its settings first, with `/metrics` on its own port if set);
    its dead-letter keeper tells what `telling` builds of the letters the broker
    dead-lettered."""

    @contextlib.asynccontextmanager
    async def running(app: web.Application) -> AsyncIterator[None]:
        async with (
            service_settings(app, settings),
            dependencies(app, settings, name) as (store, broker),
        ):
            make, close_extra = factory(store, broker, app[METRICS_KEY])
            own = make(broker.topology)
            worker = Generations(
                own, make, store, broker, settings.generations_interval, settings.shutdown_timeout
            )
            app[READINESS_KEY].append((f"{name}_partitions", stall_check(worker)))
            await worker.start(settings.startup_wait)
            # The stage's dead letters, from their queue into the store.
            told = telling(store, broker) if telling is not None else None
            keeper = Keeper(store, broker, own.stage, app[METRICS_KEY], told)
            keeper.start()
            # Retention and the dead-letter bounds: whichever janitor holds the turn works.
            janitor = Janitor(settings, store, app[METRICS_KEY])
            janitor.start()
            try:
                async with queue_gauges(app, broker, settings, store):
                    yield
            finally:
                await janitor.stop()
                await keeper.stop()
                await worker.stop(settings.shutdown_timeout)
                await close_extra()

    return lambda app: running(app)


def stall_check(worker: Generations[Any] | StageWorker[Any]) -> ReadinessCheck:
    """Not ready while a partition holds a message unstarted beyond the stall limit."""

    async def check() -> str | None:
        stalled = worker.stalled()
        if not stalled:
            return None
        listed = ", ".join(f"{n} ({age}s)" for n, age in sorted(stalled.items()))
        return f"stalled partitions (oldest unstarted message): {listed}"

    return check
