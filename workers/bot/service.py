"""The bot worker as a service: its resources opened and closed around the worker."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable

from aiohttp import web

from relay.broker import Broker
from relay.ingress.app import topology_of
from relay.service import METRICS_KEY, READINESS_KEY, broker_check, store_check
from relay.settings import Settings
from relay.store import open_store
from workers.bot.adapters import load_adapter
from workers.bot.worker import BotWorker

Context = Callable[[web.Application], contextlib.AbstractAsyncContextManager[None]]


def bot_worker_context(settings: Settings) -> Context:
    """A cleanup context that runs a bot worker for as long as the application runs."""

    @contextlib.asynccontextmanager
    async def running(app: web.Application) -> AsyncIterator[None]:
        adapter = load_adapter(settings)
        store = await open_store(settings.database_url)
        broker = Broker(settings.amqp_url, topology_of(settings), settings.publish_timeout)
        broker.start()
        worker = BotWorker(settings, store, broker, adapter, app[METRICS_KEY])
        app[READINESS_KEY].extend(
            [("bot_broker", broker_check(broker)), ("bot_store", store_check(store))]
        )
        await worker.start()
        try:
            yield
        finally:
            # Finish or return what is in hand before the connections close.
            await worker.stop(settings.shutdown_timeout)
            await adapter.close()
            await broker.close()
            await store.close()

    return lambda app: running(app)
