"""The HTTP server under every Relay service: aiohttp's connection handler, answering what it
refuses by itself as Relay's JSON and bounding how long a client may take to send a
request (`ServiceRunner`), and the settings a service application runs with.

aiohttp bounds only the silence between requests (`keepalive_timeout`, an hour by default
under `AppRunner`): a client that opens connections and sends their headers a byte at a
time holds each for that long. Here a request's head must arrive within
`RELAY_HEADER_READ_TIMEOUT` seconds of its first byte (of the connection's opening, for
the first) or the connection is closed, and its body must not pause for longer than
`RELAY_BODY_READ_TIMEOUT`, or it is answered 408. The silence between requests is
`RELAY_KEEPALIVE_TIMEOUT` (75 s, as `aiohttp.web.run_app` has it): it also bounds a
partial head sent in the same packet as a whole request, which no timer here sees.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, cast

import structlog
from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage, LineTooLong
from aiohttp.streams import StreamReader

from relay.errors import ApiError, error_response
from relay.metrics import Metrics
from relay.settings import Settings

log = structlog.get_logger(__name__)

HTTP_ERROR_CODES = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    413: "payload_too_large",
    415: "unsupported_media_type",
    431: "headers_too_large",
    500: "internal",
    504: "timeout",
}

Phase = Literal["headers", "body"]
TimedOut = Callable[[Phase], None]


class ServiceSettings:
    """The settings a service application runs with, once one of its roles gave them.

    The ingress gives them as its application starts; a worker's application is built by
    the CLI, and its role (a cleanup context) gives them as it starts, before anything is
    served. `relay run` runs three roles in one application: the first to start gives them.
    """

    def __init__(self) -> None:
        self.settings: Settings | None = None

    def adopt(self, settings: Settings) -> bool:
        """Take `settings` unless some were given already; whether they were taken."""
        if self.settings is not None:
            return False
        self.settings = settings
        return True


SERVICE_SETTINGS_KEY = web.AppKey("service_settings", ServiceSettings)


@dataclass(frozen=True)
class ReadTimeouts:
    """Seconds a client may take to send a request's head, then its body."""

    head: float
    body: float
    idle: float  # between requests on a kept-alive connection

    @classmethod
    def of(cls, settings: Settings | None) -> ReadTimeouts:
        """Those of `settings` (None: the defaults)."""
        if settings is None:
            fields = Settings.model_fields
            return cls(
                fields["header_read_timeout"].default,
                fields["body_read_timeout"].default,
                fields["keepalive_timeout"].default,
            )
        return cls(
            settings.header_read_timeout, settings.body_read_timeout, settings.keepalive_timeout
        )


class BodyTimeout(ApiError):
    """The request's body did not arrive in time."""

    status, code = 408, "request_timeout"


class _JsonErrorHandler(web.RequestHandler):
    """aiohttp's connection handler, answering the errors it handles itself as Relay's JSON,
    with the read timeouts above.

    A request aiohttp cannot parse (a request line or header over the limit, a malformed
    line) never reaches the application or its middleware: aiohttp answers it from
    `handle_error`, in plain text holding the exception's text — which quotes the start of
    the offending line, an `Authorization` header say — and logs it with a traceback at
    error level. aiohttp has no public hook for this (aio-libs/aiohttp#3287), nor for
    read timeouts, so this subclass is the one place they can be done.
    """

    __slots__ = ("_body", "_body_timer", "_head_timer", "_read_timeouts", "_timed_out")

    def __init__(
        self,
        manager: web.Server,
        *,
        read_timeouts: ReadTimeouts,
        timed_out: TimedOut,
        **kwargs: Any,
    ) -> None:
        super().__init__(manager, **kwargs)
        self._read_timeouts = read_timeouts
        self._timed_out = timed_out
        self._head_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._body: StreamReader | None = None  # the body being read, while it is

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._start_head_timer()

    def connection_lost(self, exc: BaseException | None) -> None:
        for timer in (self._head_timer, self._body_timer):
            if timer is not None:
                timer.cancel()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        idle = self._waiter is not None and not self._waiter.done()
        heads = self._request_count
        super().data_received(data)
        if self._request_count > heads:
            self._head_arrived()
        elif data and self._body_timer is not None:
            # The body goes on arriving: the bound is on its pauses, not its whole length
            # (a large body on a slow link is not cut).
            self._arm_body_timer()
        elif data and idle and self._head_timer is None:
            # The first bytes of the next request on a kept-alive connection. (Those that
            # come, pipelined, while a request is handled are left to the keep-alive bound.)
            self._start_head_timer()

    def _start_head_timer(self) -> None:
        self._head_timer = self._loop.call_later(self._read_timeouts.head, self._head_late)

    def _head_arrived(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        payload = self._messages[-1][1] if self._messages else None
        if isinstance(payload, StreamReader) and not payload.is_eof():
            self._body = payload
            self._arm_body_timer()
            payload.on_eof(self._body_done)

    def _arm_body_timer(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
        payload = self._body
        if payload is None or payload.is_eof():
            self._body_timer = None
            return
        self._body_timer = self._loop.call_later(self._read_timeouts.body, self._body_late, payload)

    def _body_done(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
        self._body_timer, self._body = None, None

    def _head_late(self) -> None:
        self._head_timer = None
        self._timed_out("headers")
        self.force_close()

    def _body_late(self, payload: StreamReader) -> None:
        self._body_timer, self._body = None, None
        if payload.is_eof():
            return
        self._timed_out("body")
        # No lingering to read the rest: once answered, the connection closes.
        self._lingering_time = 0.0
        if self._request_in_progress:
            # The handler's read raises it: answered as the JSON 408.
            payload.set_exception(
                BodyTimeout("the request body did not arrive in time; send it again")
            )
        else:
            # Answered already (aiohttp reads the rest, to drop it): that read ends as its
            # own timeout would, and the connection closes.
            payload.set_exception(TimeoutError())
            self.force_close()

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
        response = error_response(status, HTTP_ERROR_CODES.get(status, "http_error"), text)
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

    read_timeouts: ReadTimeouts
    timed_out: TimedOut

    def __call__(self) -> web.RequestHandler:
        return _JsonErrorHandler(
            self,
            loop=self._loop,
            read_timeouts=self.read_timeouts,
            timed_out=self.timed_out,
            **self._kwargs,
        )


class ServiceRunner(web.AppRunner):
    """The runner of every Relay HTTP service: aiohttp's own error answers become JSON, and
    clients have the read timeouts of the application's settings (counted in `metrics`).

    aiohttp builds its `Server` inside `AppRunner` (application start-up, freezing, handler
    arguments); the server it built is kept as it is, only its connections get the handler
    above. The settings are read after start-up, when every role has given them.
    """

    def __init__(
        self, app: web.Application, *, metrics: Metrics | None = None, **kwargs: Any
    ) -> None:
        super().__init__(app, **kwargs)
        self._metrics = metrics

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        server.__class__ = _JsonErrorServer
        ours = cast(_JsonErrorServer, server)
        given = self.app.get(SERVICE_SETTINGS_KEY)
        ours.read_timeouts = timeouts = ReadTimeouts.of(given.settings if given else None)
        # aiohttp's own bound on the silence between requests (an hour unless given).
        ours._kwargs["keepalive_timeout"] = timeouts.idle
        ours.timed_out = self._count_timeout
        return ours

    def _count_timeout(self, phase: Phase) -> None:
        if self._metrics is not None:
            self._metrics.read_timeouts.labels(phase).inc()
        log.debug("read_timeout", phase=phase)
