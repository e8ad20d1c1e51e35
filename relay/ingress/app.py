"""`create_app(settings)`: the ingress application, its resources and its routes.

It also runs the outbox sweep (`relay.pipeline.outbox`) for the whole relay.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

from aiohttp import web

from relay.aio import cancel_and_wait
from relay.broker import Broker
from relay.broker.news import NewsFeed
from relay.broker.presence import QueueAges
from relay.ingress.accept import Acceptor
from relay.ingress.admin import admin_app
from relay.ingress.admin.common import AdminKeys
from relay.ingress.connector import add_connector_routes
from relay.ingress.conversations import ConversationApi
from relay.ingress.events import EventStreams
from relay.ingress.handlers import WebhookHandler
from relay.ingress.openapi import openapi_handler
from relay.ingress.pages import static_page
from relay.ingress.push import PushHandler
from relay.ingress.ratelimit import RateLimiter
from relay.ingress.waiting import ReplyWaiter
from relay.ingress.watchers import Watchers
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
CONVERSATIONS_KEY = web.AppKey("conversations", ConversationApi)
STREAMS_KEY = web.AppKey("event_streams", EventStreams)
WATCHERS_KEY = web.AppKey("watchers", Watchers)
FEED_KEY = web.AppKey("news_feed", NewsFeed)
AGES_KEY = web.AppKey("queue_ages", QueueAges)

T = TypeVar("T")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def create_app(settings: Settings, metrics: Metrics | None = None) -> web.Application:
    """The ingress: `POST /webhooks/{integrationId}` plus the service routes."""
    app = create_service_app(metrics or Metrics(), [], client_max_size=settings.max_body_bytes)
    app.cleanup_ctx.append(_resources(settings))
    app.on_shutdown.append(_stop_watchers)
    app.router.add_get("/openapi.json", openapi_handler)
    app.router.add_post("/webhooks/{integrationId}", _routed(HANDLER_KEY, lambda h: h.post_message))
    add_conversation_routes(app)
    app.router.add_post(
        "/bot/conversations/{conversationId}/messages", _routed(PUSH_KEY, lambda p: p.post_message)
    )
    add_connector_routes(app, STORE_KEY, REPLIES_KEY)
    if settings.chat_page:
        app.router.add_get("/chat", static_page("chat.html"))
    app.router.add_get("/console", static_page("console.html"))
    app.add_subapp(
        "/admin/v1", admin_app(settings, AdminKeys(STORE_KEY, BROKER_KEY, REPLIES_KEY, AGES_KEY))
    )
    return app


def add_conversation_routes(app: web.Application) -> None:
    """The conversation API: history, read tokens and event streams."""
    integration = "/webhooks/{integrationId}"
    conversation = f"{integration}/conversations/{{conversationId}}"
    api, streams = CONVERSATIONS_KEY, STREAMS_KEY
    app.router.add_get(f"{conversation}/messages", _routed(api, lambda a: a.messages))
    app.router.add_post(f"{conversation}/tokens", _routed(api, lambda a: a.read_token))
    # No HEAD: a stream's handler runs until its reader leaves, and a HEAD reads nothing.
    for path, stream in [
        (f"{conversation}/events", _routed(streams, lambda s: s.conversation)),
        (f"{integration}/events", _routed(streams, lambda s: s.integration)),
    ]:
        app.router.add_get(path, stream, allow_head=False)


def _routed(key: web.AppKey[T], pick: Callable[[T], Handler]) -> Handler:
    """A route to a method of what start-up builds under `key` (routes are added before)."""

    async def handle(request: web.Request) -> web.StreamResponse:
        return await pick(request.app[key])(request)

    return handle


async def _stop_watchers(app: web.Application) -> None:
    """Waits and streams end first at stop: they answer what they have, or close."""
    if WATCHERS_KEY in app:
        app[WATCHERS_KEY].stop()


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
            watchers = Watchers()
            waiter = ReplyWaiter(store, watchers, app[METRICS_KEY])
            app[HANDLER_KEY] = WebhookHandler(directory, limiter, acceptor, waiter)
            app[PUSH_KEY] = PushHandler(store, directory, limiter, replies)
            app[REPLIES_KEY] = replies
            api = ConversationApi(store, directory, limiter, settings.read_token_seconds)
            app[CONVERSATIONS_KEY] = api
            app[STREAMS_KEY] = EventStreams(api, watchers, app[METRICS_KEY], settings)
            app[WATCHERS_KEY] = watchers
            app[FEED_KEY] = feed = NewsFeed(broker, watchers.heard, watchers.wake_all)
            feed.start()
            app[AGES_KEY] = ages = QueueAges(broker, settings.presence_interval)
            ages.start()
            sweeper = asyncio.create_task(
                sweep_forever(
                    acceptor, replies, store, settings.outbox_lease, settings.outbox_interval
                )
            )
            try:
                async with queue_gauges(app, broker, settings, store):
                    yield
            finally:
                await cancel_and_wait(sweeper)
                await feed.stop()
                await ages.stop()

    return lambda app: resources(app)
