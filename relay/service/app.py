"""What every Relay service serves: `/healthz`, `/readyz`, `/metrics`, JSON errors, request ids."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence

import structlog
from aiohttp import hdrs, web
from aiohttp.http_exceptions import BadHttpMessage, LineTooLong
from aiohttp.typedefs import Handler
from prometheus_client import CONTENT_TYPE_LATEST

from relay.broker import Broker, BrokerUnavailable
from relay.errors import ApiError, Unavailable, error_response
from relay.metrics import Metrics
from relay.service.gauges import Watcher
from relay.store import StoreHandle, StoreUnavailable

log = structlog.get_logger(__name__)

METRICS_KEY = web.AppKey("metrics", Metrics)
# A readiness check returns None when fine, or a short reason.
ReadinessCheck = Callable[[], Awaitable[str | None]]
READINESS_KEY = web.AppKey("readiness", list[tuple[str, ReadinessCheck]])
WATCHER_KEY = web.AppKey("queue_watcher", Watcher)

_HTTP_ERROR_CODES = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
    431: "headers_too_large",
    500: "internal",
    504: "timeout",
}
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
        # A 405 must say what is allowed (`Allow`): the error's own headers are kept.
        headers = {k: v for k, v in error.headers.items() if k not in _BODY_HEADERS}
        return error_response(error.status, code, error.reason, headers=headers)
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
    app[WATCHER_KEY] = Watcher()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    return app


class _JsonErrorHandler(web.RequestHandler):
    """aiohttp's connection handler, answering the errors it handles itself as Relay's JSON.

    A request aiohttp cannot parse (a request line or header over the limit, a malformed
    line) never reaches the application or its middleware: aiohttp answers it from
    `handle_error`, in plain text holding the exception's text — which quotes the start of
    the offending line, an `Authorization` header say — and logs it with a traceback at
    error level. aiohttp has no public hook for this (aio-libs/aiohttp#3287), so this
    override is the one place it can be done.
    """

    __slots__ = ()

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """A JSON error that echoes nothing of the request; logged without its text."""
        if request.writer.output_size > 0:
            # As aiohttp does: part of an answer went out already, only closing is left.
            raise ConnectionError("an answer was sent already, cannot send an error")
        status, text = _low_level_error(status, exc)
        if status >= 500:
            log.error("unhandled_error", status=status, exc_info=exc)
        else:
            # The exception's text quotes the request: its type is enough to tell what it was.
            log.info("bad_http_request", status=status, reason=type(exc).__name__)
        response = error_response(status, _HTTP_ERROR_CODES.get(status, "http_error"), text)
        response.force_close()
        return response


def _low_level_error(status: int, exc: BaseException | None) -> tuple[int, str]:
    """The status and message for an error aiohttp caught before the application ran."""
    if isinstance(exc, LineTooLong):
        # aiohttp raises the same error for the request line and for a header.
        return 431, "the request line or a header is too long"
    if isinstance(exc, BadHttpMessage) and exc.message == "Too many headers received":
        return 431, "too many headers"
    if status == 400:
        return 400, "the request is not valid HTTP"
    if status == 504:
        return 504, "the request took too long"
    return status, "internal error"


class _JsonErrorServer(web.Server):
    """aiohttp's server, making connections with `_JsonErrorHandler`."""

    def __call__(self) -> web.RequestHandler:
        return _JsonErrorHandler(self, loop=self._loop, **self._kwargs)


class ServiceRunner(web.AppRunner):
    """The runner of every Relay HTTP service: aiohttp's own error answers become JSON.

    aiohttp builds its `Server` inside `AppRunner` (application start-up, freezing, handler
    arguments); the server it built is kept as it is, only its connections get the handler
    above.
    """

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        server.__class__ = _JsonErrorServer
        return server
