"""`create_app(settings)`: the ingress application, its resources and its routes.

It also runs the outbox sweep (`relay.pipeline.outbox`) for the whole relay. The admin API
(`/admin/v1`) and `/console` are served on the ingress's port, on a listener of their own
(`RELAY_ADMIN_PORT`), or not at all (`RELAY_ADMIN_ENABLED=false`: a 404, like any path
the ingress does not serve). Requests that fail authentication are limited per client
(`relay.ingress.clients`) on every listener.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

from aiohttp import web
from opentelemetry.trace import StatusCode

from relay.aio import cancel_and_wait
from relay.broker import Broker
from relay.broker.news import NewsFeed
from relay.broker.presence import QueueAges
from relay.ingress.accept import Acceptor
from relay.ingress.admin import admin_app
from relay.ingress.admin.common import AdminKeys
from relay.ingress.clients import AuthFailures
from relay.ingress.connector import CONNECTOR_PREFIX, add_connector_routes
from relay.ingress.conversation_tokens import ConversationTokenApi
from relay.ingress.conversations import ConversationApi
from relay.ingress.events import EventStreams
from relay.ingress.grants import Grants
from relay.ingress.handlers import WebhookHandler
from relay.ingress.openapi import openapi_handler
from relay.ingress.pages import static_page
from relay.ingress.push import PushHandler
from relay.ingress.ratelimit import IntegrationLimit
from relay.ingress.waiting import ReplyWaiter
from relay.ingress.watchers import Watchers
from relay.metrics import Metrics
from relay.pipeline.outbox import sweep_forever
from relay.pipeline.replies import ReplyPublisher
from relay.rates import SharedRates
from relay.service.app import METRICS_KEY, create_service_app, observe, route_label
from relay.service.lifecycle import dependencies, queue_gauges
from relay.service.listeners import listening, settings_context
from relay.service.server import SERVICE_SETTINGS_KEY
from relay.settings import Settings
from relay.store import Store
from relay.store.directory import Directory
from relay.tracing import HTTP_STATUS, NO_TRACING, Tracing, ids

STORE_KEY = web.AppKey("store", Store)
BROKER_KEY = web.AppKey("broker", Broker)
ACCEPTOR_KEY = web.AppKey("acceptor", Acceptor)
HANDLER_KEY = web.AppKey("webhook_handler", WebhookHandler)
PUSH_KEY = web.AppKey("push_handler", PushHandler)
REPLIES_KEY = web.AppKey("replies", ReplyPublisher)
CONVERSATIONS_KEY = web.AppKey("conversations", ConversationApi)
TOKENS_KEY = web.AppKey("conversation_tokens", ConversationTokenApi)
STREAMS_KEY = web.AppKey("event_streams", EventStreams)
WATCHERS_KEY = web.AppKey("watchers", Watchers)
FEED_KEY = web.AppKey("news_feed", NewsFeed)
AGES_KEY = web.AppKey("queue_ages", QueueAges)
FAILURES_KEY = web.AppKey("auth_failures", AuthFailures)
TRACING_KEY = web.AppKey("tracing", Tracing)

WEBHOOK_PATH = "/webhooks/{integrationId}"
PUSH_PATH = "/bot/conversations/{conversationId}/messages"
# The requests that bring a message in: its trace starts there, or goes on from the caller's.
ACCEPTING = frozenset(
    {
        ("POST", WEBHOOK_PATH),
        ("POST", PUSH_PATH),
        ("POST", CONNECTOR_PREFIX),
        ("POST", f"{CONNECTOR_PREFIX}/{{activityId}}"),
        ("PUT", f"{CONNECTOR_PREFIX}/{{activityId}}"),
    }
)

T = TypeVar("T")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def create_app(settings: Settings, metrics: Metrics | None = None) -> web.Application:
    """The ingress: `POST /webhooks/{integrationId}` plus the service routes."""
    metrics = metrics or Metrics()
    app = create_service_app(metrics, [], client_max_size=settings.max_body_bytes)
    failures = AuthFailures(
        settings.auth_failure_rate, settings.auth_failure_burst, settings.trusted_proxies, metrics
    )
    app.middlewares.append(failures.middleware)
    # Outermost: the span covers the whole answer, errors rendered and limits applied.
    app.middlewares.insert(0, _traced)
    app[FAILURES_KEY] = failures
    app.cleanup_ctx.append(settings_context(settings))
    app.cleanup_ctx.append(_resources(settings))
    app.on_shutdown.append(_stop_watchers)
    app.router.add_get("/openapi.json", openapi_handler)
    app.router.add_post(WEBHOOK_PATH, _routed(HANDLER_KEY, lambda h: h.post_message))
    add_conversation_routes(app)
    app.router.add_post(PUSH_PATH, _routed(PUSH_KEY, lambda p: p.post_message))
    add_connector_routes(app, STORE_KEY, REPLIES_KEY)
    if settings.chat_page:
        app.router.add_get("/chat", static_page("chat.html"))
    if settings.admin_enabled and settings.admin_port is None:
        add_admin_routes(app, settings)
    return app


def add_admin_routes(app: web.Application, settings: Settings) -> None:
    """The admin API under `/admin/v1`, and the console over it."""
    app.router.add_get("/console", static_page("console.html"))
    app.add_subapp(
        "/admin/v1", admin_app(settings, AdminKeys(STORE_KEY, BROKER_KEY, REPLIES_KEY, AGES_KEY))
    )


def _admin_listener_app(ingress: web.Application, settings: Settings) -> web.Application:
    """The admin API and the console alone, over the resources of the started `ingress`."""
    app = web.Application(
        middlewares=[observe, ingress[FAILURES_KEY].middleware],
        client_max_size=settings.max_body_bytes,
    )
    app[METRICS_KEY] = ingress[METRICS_KEY]
    app[SERVICE_SETTINGS_KEY] = ingress[SERVICE_SETTINGS_KEY]
    app[STORE_KEY], app[BROKER_KEY] = ingress[STORE_KEY], ingress[BROKER_KEY]
    app[REPLIES_KEY], app[AGES_KEY] = ingress[REPLIES_KEY], ingress[AGES_KEY]
    add_admin_routes(app, settings)
    return app


@contextlib.asynccontextmanager
async def _admin_listener(ingress: web.Application, settings: Settings) -> AsyncIterator[None]:
    """The admin listener (`RELAY_ADMIN_PORT`) while in scope, if there is one."""
    if not settings.admin_enabled or settings.admin_port is None:
        yield
        return
    async with listening(
        _admin_listener_app(ingress, settings),
        settings.http_host,
        settings.admin_port,
        settings.shutdown_timeout,
    ):
        yield


def add_conversation_routes(app: web.Application) -> None:
    """The conversation API: history, conversation tokens and event streams."""
    integration = "/webhooks/{integrationId}"
    conversation = f"{integration}/conversations/{{conversationId}}"
    api, streams = CONVERSATIONS_KEY, STREAMS_KEY
    app.router.add_get(f"{conversation}/messages", _routed(api, lambda a: a.messages))
    tokens = f"{conversation}/tokens"
    app.router.add_post(tokens, _routed(TOKENS_KEY, lambda t: t.create))
    app.router.add_delete(tokens, _routed(TOKENS_KEY, lambda t: t.revoke_all))
    app.router.add_delete(f"{tokens}/{{tokenId}}", _routed(TOKENS_KEY, lambda t: t.revoke_one))
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


@web.middleware
async def _traced(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The server span of a request that brings a message in (when the ingress traces)."""
    tracing = request.app.get(TRACING_KEY, NO_TRACING)
    if not tracing.enabled:
        return await handler(request)
    route = route_label(request)
    if (request.method, route) not in ACCEPTING:
        return await handler(request)
    found = request.match_info
    attributes = {
        "http.request.method": request.method,
        "http.route": route,
        **ids(found.get("integrationId"), found.get("conversationId")),
    }
    with tracing.served(request.headers, f"{request.method} {route}", attributes) as span:
        response = await handler(request)
        span.set_attribute(HTTP_STATUS, response.status)
        if response.status >= 500:
            span.set_status(StatusCode.ERROR)
        return response


async def _stop_watchers(app: web.Application) -> None:
    """Waits and streams end first at stop: they answer what they have, or close."""
    if WATCHERS_KEY in app:
        app[WATCHERS_KEY].stop()


def _add_handlers(app: web.Application, settings: Settings, store: Store) -> None:
    """The request handlers, over the resources started before them."""
    directory = Directory(store, settings.auth_cache_seconds, settings.directory_cache_size)
    limiter = IntegrationLimit(
        SharedRates(store), settings.rate_limit_per_second, settings.rate_limit_burst
    )
    metrics, watchers = app[METRICS_KEY], app[WATCHERS_KEY]
    waiter = ReplyWaiter(store, watchers, metrics, settings)
    grants = Grants(store)
    app[HANDLER_KEY] = WebhookHandler(directory, limiter, app[ACCEPTOR_KEY], waiter, grants)
    app[PUSH_KEY] = PushHandler(store, directory, limiter, app[REPLIES_KEY])
    api = ConversationApi(store, directory, limiter, grants, settings.history_page_bytes)
    app[CONVERSATIONS_KEY] = api
    app[TOKENS_KEY] = ConversationTokenApi(store, directory, limiter, settings.read_token_seconds)
    app[STREAMS_KEY] = EventStreams(api, watchers, metrics, settings)


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
            app[TRACING_KEY] = broker.tracing
            app[REPLIES_KEY] = replies = ReplyPublisher(store, broker, app[METRICS_KEY])
            app[WATCHERS_KEY] = watchers = Watchers()
            _add_handlers(app, settings, store)
            app[FEED_KEY] = feed = NewsFeed(broker, watchers.heard, watchers.wake_all)
            feed.start()
            app[AGES_KEY] = ages = QueueAges(broker, settings.presence_interval)
            ages.start()
            sweeper = asyncio.create_task(
                sweep_forever(
                    acceptor.outbox, replies, store, settings.outbox_lease, settings.outbox_interval
                )
            )
            try:
                async with (
                    queue_gauges(app, broker, settings, store),
                    _admin_listener(app, settings),
                ):
                    yield
            finally:
                await cancel_and_wait(sweeper)
                await feed.stop()
                await ages.stop()

    return lambda app: resources(app)
