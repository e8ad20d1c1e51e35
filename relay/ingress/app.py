"""`create_app(settings)`: the ingress application, its resources and its routes.

It also runs the outbox sweep (`relay.pipeline.outbox`) for the whole relay.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

from aiohttp import web

from relay.broker import Broker
from relay.ingress.accept import Acceptor
from relay.ingress.connector import add_connector_routes
from relay.ingress.handlers import WebhookHandler
from relay.ingress.openapi import openapi_handler
from relay.ingress.push import PushHandler
from relay.ingress.ratelimit import RateLimiter
from relay.metrics import Metrics
from relay.pipeline.outbox import sweep_forever
from relay.pipeline.replies import ReplyPublisher
from relay.service.app import METRICS_KEY, create_service_app
from relay.service.lifecycle import dependencies, queue_gauges
from relay.settings import Settings
from relay.store import Store
from relay.store.directory import Directory

STORE_KEY = web.AppKey("store", Store)
BROKER_KEY = web.AppKey("broker", Broker)
ACCEPTOR_KEY = web.AppKey("acceptor", Acceptor)
HANDLER_KEY = web.AppKey("webhook_handler", WebhookHandler)
PUSH_KEY = web.AppKey("push_handler", PushHandler)
REPLIES_KEY = web.AppKey("replies", ReplyPublisher)


def create_app(settings: Settings, metrics: Metrics | None = None) -> web.Application:
    """The ingress: `POST /webhooks/{integrationId}` plus the service routes."""
    app = create_service_app(metrics or Metrics(), [], client_max_size=settings.max_body_bytes)
    app.cleanup_ctx.append(_resources(settings))
    app.router.add_get("/openapi.json", openapi_handler)
    app.router.add_post("/webhooks/{integrationId}", post_message)
    app.router.add_post("/bot/conversations/{conversationId}/messages", push_message)
    add_connector_routes(app, STORE_KEY, REPLIES_KEY)
    return app


async def post_message(request: web.Request) -> web.Response:
    """Route to the webhook handler built at start-up."""
    return await request.app[HANDLER_KEY].post_message(request)


async def push_message(request: web.Request) -> web.Response:
    """Route to the bot push handler built at start-up."""
    return await request.app[PUSH_KEY].post_message(request)


def _resources(
    settings: Settings,
) -> Callable[[web.Application], contextlib.AbstractAsyncContextManager[None]]:
    @contextlib.asynccontextmanager
    async def resources(app: web.Application) -> AsyncIterator[None]:
        async with dependencies(app, settings) as (store, broker):
            acceptor = Acceptor(
                store,
                broker,
                app[METRICS_KEY],
                settings.outbox_lease,
                wait=settings.publish_timeout + 2,
            )
            app[STORE_KEY], app[BROKER_KEY], app[ACCEPTOR_KEY] = store, broker, acceptor
            directory = Directory(store, settings.auth_cache_seconds)
            limiter = RateLimiter(settings.rate_limit_per_second, settings.rate_limit_burst)
            replies = ReplyPublisher(store, broker, app[METRICS_KEY])
            app[HANDLER_KEY] = WebhookHandler(directory, limiter, acceptor)
            app[PUSH_KEY] = PushHandler(store, directory, limiter, replies)
            app[REPLIES_KEY] = replies
            sweeper = asyncio.create_task(
                sweep_forever(
                    acceptor, replies, store, settings.outbox_lease, settings.outbox_interval
                )
            )
            try:
                async with queue_gauges(app, broker, settings):
                    yield
            finally:
                sweeper.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await sweeper

    return lambda app: resources(app)
