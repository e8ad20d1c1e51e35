"""Live streams of a conversation's history, or of every conversation of an integration, as
Server-Sent Events (`GET .../conversations/{conversationId}/events`, `GET .../events`).

Each event is one item (`event: message`, `id:` its watermark, `data:` the item). A stream
reads the store after its watermark whenever the news feed says its conversation (or
integration) has news, and at least every keep-alive, when it also writes a comment line
so proxies keep it open. Resuming after `Last-Event-ID` (or `?after=`) gives every item
after that one, once: the history's order is the order of visibility
(`relay.store.sql.history`).

A stream holds no more than one page of items: it reads the next only once the last is
written. A reader that does not take what is written within `stream_write_timeout` is
disconnected (it may resume), so a slow reader costs a socket's buffers, never memory
without bound.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator

import structlog
from aiohttp import web

from relay.errors import Unavailable
from relay.ingress.conversations import ConversationApi, Reader, as_item, parse_watermark
from relay.ingress.watchers import Watch, Watchers
from relay.metrics import Metrics
from relay.retry import pauses
from relay.settings import Settings
from relay.store import HistoryPage, Watermark
from relay.wire import LAST_EVENT_ID_HEADER

log = structlog.get_logger(__name__)

PAGE = 100  # items read (and written) at a time
RECONNECT_MS = 1000  # the browser's wait before it reconnects a dropped stream
CHUNK = 64 * 1024  # bytes of events gathered into one write


class _SlowReader(Exception):
    """A write waited for the reader longer than allowed."""


class EventStreams:
    """Serves the event streams of one ingress."""

    def __init__(
        self, api: ConversationApi, watchers: Watchers, metrics: Metrics, settings: Settings
    ) -> None:
        self._api = api
        self._watchers = watchers
        self._metrics = metrics
        self._keepalive = settings.stream_keepalive
        self._write_timeout = settings.stream_write_timeout
        self._limit = settings.stream_limit
        self._open = 0

    async def conversation(self, request: web.Request) -> web.StreamResponse:
        """One conversation's items; without a watermark, from its first."""
        reader = await self._api.authorize(request, read_token_ok=True)
        after = _resume_point(request)
        assert reader.conversation_id is not None
        with self._watchers.conversation(reader.conversation_id) as watch:
            return await self._serve(request, reader, after, watch)

    async def integration(self, request: web.Request) -> web.StreamResponse:
        """Every conversation's items; without a watermark, from now."""
        reader = await self._api.authorize(request, read_token_ok=False, whole_integration=True)
        after = _resume_point(request)
        with self._watchers.integration(reader.integration.id) as watch:
            # Registered first: news from here on wakes the stream, none is missed.
            if after is None:
                after = await self._api.store.latest_watermark(reader.integration.id)
            return await self._serve(request, reader, after, watch)

    async def _serve(
        self, request: web.Request, reader: Reader, after: Watermark | None, watch: Watch
    ) -> web.StreamResponse:
        async with self._slot():
            response = web.StreamResponse(
                headers={
                    "Content-Type": "text/event-stream",
                    "Cache-Control": "no-store",
                    "X-Accel-Buffering": "no",  # nginx: pass events on as they come
                }
            )
            await response.prepare(request)
            try:
                await self._write(response, f"retry: {RECONNECT_MS}\n\n".encode())
                await self._follow(response, reader, after, watch)
            except _SlowReader:
                self._metrics.streams_dropped.labels("slow").inc()
                log.warning("event_stream_slow_reader", integration_id=reader.integration.id)
            except ConnectionResetError:
                pass  # the reader left
            return response

    async def _follow(
        self, response: web.StreamResponse, reader: Reader, after: Watermark | None, watch: Watch
    ) -> None:
        """Write what is after `after`, then whatever comes, until the reader leaves or the
        ingress stops."""
        scope, scope_id = reader.scope
        held_back = pauses(0.02, 1.0)
        while not watch.stopping:
            page: HistoryPage = await self._api.store.history(scope, scope_id, after, PAGE)
            for chunk in _events(page):
                await self._write(response, chunk)
            after = page.watermark
            if page.more:
                continue
            if page.held_back:
                # An earlier transaction may still add items before these: look again soon.
                await watch.news(next(held_back))
                continue
            held_back = pauses(0.02, 1.0)
            if not await watch.news(self._keepalive):
                await self._write(response, b": keep-alive\n\n")
        self._metrics.streams_dropped.labels("stopping").inc()

    async def _write(self, response: web.StreamResponse, data: bytes) -> None:
        try:
            async with asyncio.timeout(self._write_timeout):
                await response.write(data)
        except TimeoutError as error:
            raise _SlowReader from error

    @contextlib.asynccontextmanager
    async def _slot(self) -> AsyncIterator[None]:
        if self._open >= self._limit:
            self._metrics.streams_dropped.labels("full").inc()
            raise Unavailable(
                "this ingress serves as many event streams as it may; try again",
                headers={"Retry-After": "5"},
            )
        self._open += 1
        self._metrics.streams_open.set(self._open)
        try:
            yield
        finally:
            self._open -= 1
            self._metrics.streams_open.set(self._open)


def _resume_point(request: web.Request) -> Watermark | None:
    """Where the stream resumes: `Last-Event-ID` (a browser reconnecting), else `?after=`."""
    header = request.headers.get(LAST_EVENT_ID_HEADER)
    if header is not None:
        return parse_watermark(header, LAST_EVENT_ID_HEADER)
    return parse_watermark(request.query.get("after"), "after")


def _events(page: HistoryPage) -> Iterator[bytes]:
    """The page's events, in writes of about `CHUNK` bytes: small items go out together,
    and a big one on its own, so no write holds more than one item beyond a chunk."""
    pending: list[bytes] = []
    size = 0
    for row in page.items:
        data = as_item(row).model_dump_json(exclude_none=True).encode()
        event = b"id: %s\nevent: message\ndata: %s\n\n" % (str(row.watermark).encode(), data)
        pending.append(event)
        size += len(event)
        if size >= CHUNK:
            yield b"".join(pending)
            pending, size = [], 0
    if pending:
        yield b"".join(pending)
