"""What every Relay service serves: `/healthz`, `/readyz`, `/metrics`, JSON errors, request ids."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence

import structlog
from aiohttp import web
from aiohttp.typedefs import Handler
from prometheus_client import CONTENT_TYPE_LATEST

from relay.broker import Broker, BrokerUnavailable
from relay.errors import ApiError, Unavailable, error_response
from relay.metrics import Metrics
from relay.queues import Watcher
from relay.store import Store, StoreUnavailable

log = structlog.get_logger(__name__)

METRICS_KEY = web.AppKey("metrics", Metrics)
# A readiness check returns None when fine, or a short reason.
ReadinessCheck = Callable[[], Awaitable[str | None]]
READINESS_KEY = web.AppKey("readiness", list[tuple[str, ReadinessCheck]])
WATCHER_KEY = web.AppKey("queue_watcher", Watcher)

_HTTP_ERROR_CODES = {
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
}


@web.middleware
async def observe(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Bind a request id, render every error as JSON, log and count the request."""
    request_id = request.headers.get("X-Request-Id") or uuid.uuid4().hex
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(request_id=request_id)
    started = time.perf_counter()
    response = await _answer(request, handler)
    response.headers["X-Request-Id"] = request_id
    route = _route_label(request)
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
    except (StoreUnavailable, BrokerUnavailable) as error:
        log.warning("dependency_unavailable", error=str(error))
        return Unavailable(
            "the relay cannot store or queue this now; send it again",
            headers={"Retry-After": "1"},
        ).response()
    except web.HTTPException as error:
        if error.status < 400:
            raise
        code = _HTTP_ERROR_CODES.get(error.status, "http_error")
        return error_response(error.status, code, error.reason)
    except Exception:
        log.exception("unhandled_error")
        return error_response(500, "internal", "internal error")


def _route_label(request: web.Request) -> str:
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
    if failures:
        return web.json_response({"status": "unavailable", "failures": failures}, status=503)
    return web.json_response({"status": "ok"})


async def metrics(request: web.Request) -> web.Response:
    """Prometheus exposition of this service's registry."""
    body = request.app[METRICS_KEY].render()
    response = web.Response(body=body)
    response.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return response


def broker_check(broker: Broker) -> ReadinessCheck:
    """Ready while the broker connection is open."""

    async def check() -> str | None:
        return None if broker.ready else "not connected"

    return check


def store_check(store: Store) -> ReadinessCheck:
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
    app[WATCHER_KEY] = Watcher()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    return app
