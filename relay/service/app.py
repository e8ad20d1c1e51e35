"""What every Relay service serves: `/healthz`, `/readyz`, `/metrics`, JSON errors, request ids.

`/metrics` is behind a bearer token when `RELAY_METRICS_TOKEN` is set (401 without it), and
on a listener of its own when `RELAY_METRICS_PORT` is set (`metrics_app`; then a 404 on the
service's own port)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence

import structlog
from aiohttp import hdrs, web
from aiohttp.typedefs import Handler
from prometheus_client import CONTENT_TYPE_LATEST

from relay.auth import bearer_token, hash_token, token_matches
from relay.broker import Broker, BrokerUnavailable
from relay.errors import ApiError, Unauthorized, Unavailable, error_response
from relay.metrics import Metrics
from relay.service.gauges import Watcher
from relay.service.server import HTTP_ERROR_CODES, SERVICE_SETTINGS_KEY, ServiceSettings

# ServiceRunner lives with the connection handler; it is re-exported where callers look.
from relay.service.server import ServiceRunner as ServiceRunner
from relay.settings import Settings
from relay.store import StoreHandle, StoreUnavailable
from relay.store.secrets import SecretUnreadable

log = structlog.get_logger(__name__)

METRICS_KEY = web.AppKey("metrics", Metrics)
# A readiness check returns None when fine, or a short reason.
ReadinessCheck = Callable[[], Awaitable[str | None]]
READINESS_KEY = web.AppKey("readiness", list[tuple[str, ReadinessCheck]])
# The brokers the service's roles connected (`/readyz` tells the version and what it found).
BROKERS_KEY = web.AppKey("brokers", list[Broker])
WATCHER_KEY = web.AppKey("queue_watcher", Watcher)

# An error's own headers (Allow, Retry-After...) are kept; these describe aiohttp's text body.
_BODY_HEADERS = frozenset({hdrs.CONTENT_TYPE, hdrs.CONTENT_LENGTH})
_REQUEST_ID_MAX = 128


def _request_id(request: web.Request) -> str:
    """The caller's X-Request-Id if it looks like an id, else a new one.

    It is logged and echoed: a long or odd value (a pasted header, a token) is not kept.
    """
    given = request.headers.get("X-Request-Id", "")
    if 0 < len(given) <= _REQUEST_ID_MAX and given.isascii() and given.isprintable():
        return given
    return uuid.uuid4().hex


@web.middleware
async def observe(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Bind a request id, render every error as JSON, log and count the request."""
    request_id = _request_id(request)
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(request_id=request_id)
    started = time.perf_counter()
    response = await _answer(request, handler)
    response.headers["X-Request-Id"] = request_id
    route = route_label(request)
    metrics = request.app[METRICS_KEY]
    metrics.http_requests.labels(request.method, route, str(response.status)).inc()
    metrics.http_latency.labels(request.method, route).observe(time.perf_counter() - started)
    if route not in ("/healthz", "/readyz", "/metrics"):
        log.info(
            "http_request",
            method=request.method,
            route=route,
            status=response.status,
            duration_ms=round((time.perf_counter() - started) * 1000, 2),
        )
    return response


async def _answer(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as error:
        return error.response()
    except SecretUnreadable as error:
        # Its key is missing from RELAY_SECRET_KEYS: the operator's to fix (the text names
        # the integration, never the secret).
        log.error("secret_unreadable", error=str(error))
        return Unavailable("this integration's secret cannot be read now").response()
    except (StoreUnavailable, BrokerUnavailable) as error:
        log.warning("dependency_unavailable", error=str(error))
        return Unavailable(
            "the relay cannot store or queue this now; send it again",
            headers={"Retry-After": "1"},
        ).response()
    except web.HTTPException as error:
        if error.status < 400:
            raise
        code = HTTP_ERROR_CODES.get(error.status, "http_error")
        # A 405 must say what is allowed (`Allow`): the error's own headers are kept.
        headers = {k: v for k, v in error.headers.items() if k not in _BODY_HEADERS}
        return error_response(error.status, code, error.reason, headers=headers)
    except Exception:
        log.exception("unhandled_error")
        return error_response(500, "internal", "internal error")


def route_label(request: web.Request) -> str:
    """The template of the route a request matched (`unmatched` if none)."""
    # The route template, not the path: one series per route whatever the ids.
    info = request.match_info.route.resource
    return info.canonical if info is not None else "unmatched"


async def healthz(_: web.Request) -> web.Response:
    """Liveness: the process answers."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Readiness: every dependency (broker, store) answers."""
    failures = {}
    for name, check in request.app[READINESS_KEY]:
        reason = await check()
        if reason is not None:
            failures[name] = reason
    brokers: list[Broker] = request.app[BROKERS_KEY]
    about = _broker_report(brokers)
    if failures:
        body = {"status": "unavailable", "failures": failures, **about}
        return web.json_response(body, status=503)
    return web.json_response({"status": "ok", **about})


def _broker_report(brokers: Sequence[Broker]) -> dict[str, object]:
    """The broker's version, and its queues declared with settings that can lose messages
    (a dead-letter queue with RabbitMQ 4's default delivery limit)."""
    connected = [broker for broker in brokers if broker.version is not None]
    if not connected:
        return {}
    otherwise = sorted({name for broker in connected for name in broker.declared_otherwise})
    return {"broker": {"version": str(connected[0].version), "queuesAtRisk": otherwise}}


def metrics_route(own_listener: bool) -> Handler:
    """`/metrics`: the Prometheus exposition of this service's registry, to those the
    settings allow, where they serve it."""

    async def metrics(request: web.Request) -> web.StreamResponse:
        settings = request.app[SERVICE_SETTINGS_KEY].settings
        if settings is not None:
            _check_metrics_access(request, settings, own_listener)
        response = web.Response(body=request.app[METRICS_KEY].render())
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return response

    return metrics


def _check_metrics_access(request: web.Request, settings: Settings, own_listener: bool) -> None:
    if settings.metrics_port is not None and not own_listener:
        raise web.HTTPNotFound()  # served on its own port, as if there were no such route
    token = settings.metrics_token.get_secret_value()
    given = bearer_token(request.headers.get(hdrs.AUTHORIZATION))
    if token and not token_matches(given, [hash_token(token)]):
        raise Unauthorized("missing or invalid metrics token")


def metrics_app(metrics_: Metrics, settings: ServiceSettings) -> web.Application:
    """`/metrics` alone, for a listener of its own."""
    app = web.Application(middlewares=[observe])
    app[METRICS_KEY] = metrics_
    app[SERVICE_SETTINGS_KEY] = settings
    app.router.add_get("/metrics", metrics_route(own_listener=True))
    return app


def broker_check(broker: Broker) -> ReadinessCheck:
    """Ready while the broker connection is open."""

    async def check() -> str | None:
        return None if broker.ready else "not connected"

    return check


def store_check(store: StoreHandle) -> ReadinessCheck:
    """Ready while the store answers within two seconds."""

    async def check() -> str | None:
        try:
            async with asyncio.timeout(2):
                await store.ping()
        except Exception as error:
            return f"{type(error).__name__}: {error}"[:200]
        return None

    return check


def create_service_app(
    metrics_: Metrics, checks: Sequence[tuple[str, ReadinessCheck]], client_max_size: int
) -> web.Application:
    """An application with the observing middleware and the three service routes."""
    app = web.Application(middlewares=[observe], client_max_size=client_max_size)
    app[METRICS_KEY] = metrics_
    app[READINESS_KEY] = list(checks)
    app[BROKERS_KEY] = []
    app[WATCHER_KEY] = Watcher()
    app[SERVICE_SETTINGS_KEY] = ServiceSettings()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_route(own_listener=False))
    return app
