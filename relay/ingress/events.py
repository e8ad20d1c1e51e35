"""Live streams of a conversation's history, or of every conversation of an integration, as
Server-Sent Events (`GET .../conversations/{conversationId}/events`, `GET .../events`).

Each event is one item (`event: message`, `id:` its watermark, `data:` the item). A stream
reads the store after its watermark whenever the news feed says its conversation (or
integration) has news, and at least every keep-alive, when it also writes a comment line
so proxies keep it open. Resuming after `Last-Event-ID` (or `?after=`) gives every item
after that one, once: the history's order is the order of visibility
(`relay.store.sql.history`).

A stream holds no more than one page of items (`relay.ingress.paging`: at most `PAGE`
items and `history_page_bytes` of them): it reads the next only once the last is written.
A reader that does not take what is written within `stream_write_timeout` is disconnected
(it may resume), so a slow reader costs a socket's buffers, never memory without bound. A
stream opened with a conversation token ends within a keep-alive once the token is revoked
or expires (it is checked again then; a reconnect is refused).

Streams are fair shares (`relay.ingress.limits`): one holds a slot of the ingress
(`stream_limit`), of its integration (`stream_limit_per_integration`) and of the token it
reads with (`stream_limit_per_token`); past any of them it is refused with a 503 naming
the limit. A quiet stream looks every `PRESENCE_CHECK` seconds whether its reader is
still connected, and ends (giving its slots back) when it is not, rather than at its
next write.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from typing import NoReturn

import structlog
from aiohttp import web

from relay.errors import Unavailable
from relay.ingress.conversations import ConversationApi, Reader, item_json, parse_watermark
from relay.ingress.limits import Claim, Slots, take_all
from relay.ingress.paging import EncodedPage, read_page
from relay.ingress.watchers import Watch, Watchers
from relay.metrics import Metrics
from relay.retry import pauses
from relay.settings import Settings
from relay.store import HistoryRow, Watermark
from relay.wire import LAST_EVENT_ID_HEADER

log = structlog.get_logger(__name__)

PAGE = 100  # items read (and written) at a time
RECONNECT_MS = 1000  # the browser's wait before it reconnects a dropped stream
CHUNK = 64 * 1024  # bytes of events gathered into one write
PRESENCE_CHECK = 1.0  # seconds between looks at a quiet stream's connection
RETRY_AFTER = "5"  # what a refused stream is told to wait

# What a refused stream is told, by the limit that refused it.
_REFUSALS = {
    "stream_limit_per_token": "this token has as many event streams open as it may",
    "stream_limit_per_integration": "this integration has as many event streams open as it may",
    "stream_limit": "this ingress serves as many event streams as it may",
}


class _SlowReader(Exception):
    """A write waited for the reader longer than allowed."""


class _ReaderLeft(Exception):
    """The reader's connection closed while the stream was quiet."""


class _Revoked(Exception):
    """The conversation token the stream was opened with was revoked, or expired."""


class StreamSlots:
    """The stream slots of one ingress: of the whole, per integration, per credential."""

    def __init__(self, settings: Settings) -> None:
        self.ingress = Slots("stream_limit", settings.stream_limit)
        self.integration = Slots(
            "stream_limit_per_integration", settings.stream_limit_per_integration
        )
        self.token = Slots("stream_limit_per_token", settings.stream_limit_per_token)

    def claims(self, reader: Reader) -> list[Claim]:
        """What a stream of `reader` holds, the narrowest first."""
        return [
            Claim(self.token, reader.credential),
            Claim(self.integration, reader.integration.id),
            Claim(self.ingress, ""),
        ]


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
        self._slots = StreamSlots(settings)
        metrics.streams_open.set_function(self._slots.ingress.total)

    async def conversation(self, request: web.Request) -> web.StreamResponse:
        """One conversation's items; without a watermark, from its first."""
        reader = await self._api.authorize(request, conversation_token_ok=True)
        after = _resume_point(request)
        assert reader.conversation_id is not None
        with self._slot(reader), self._watchers.conversation(reader.conversation_id) as watch:
            return await self._serve(request, reader, after, watch)

    async def integration(self, request: web.Request) -> web.StreamResponse:
        """Every conversation's items; without a watermark, from now."""
        reader = await self._api.authorize(
            request, conversation_token_ok=False, whole_integration=True
        )
        after = _resume_point(request)
        with self._slot(reader), self._watchers.integration(reader.integration.id) as watch:
            # Registered first: news from here on wakes the stream, none is missed.
            if after is None:
                after = await self._api.store.latest_watermark(reader.integration.id)
            return await self._serve(request, reader, after, watch)

    async def _serve(
        self, request: web.Request, reader: Reader, after: Watermark | None, watch: Watch
    ) -> web.StreamResponse:
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
            await self._follow(request, response, reader, after, watch)
        except _SlowReader:
            self._metrics.streams_dropped.labels("slow").inc()
            log.warning("event_stream_slow_reader", integration_id=reader.integration.id)
        except (ConnectionResetError, _ReaderLeft):
            pass  # the reader left
        except _Revoked:
            self._metrics.streams_dropped.labels("revoked").inc()
            log.info("event_stream_revoked", integration_id=reader.integration.id)
        return response

    async def _follow(
        self,
        request: web.Request,
        response: web.StreamResponse,
        reader: Reader,
        after: Watermark | None,
        watch: Watch,
    ) -> None:
        """Write what is after `after`, then whatever comes, until the reader leaves, its
        token no longer holds or the ingress stops."""
        held_back = pauses(0.02, 1.0)
        loop = asyncio.get_running_loop()
        written = checked = loop.time()  # when the reader was last written to, its token checked
        while not watch.stopping:
            page = await read_page(
                self._api.store, reader.scope, after, PAGE, self._api.page_bytes, _event
            )
            for chunk in _gathered(page):
                await self._write(response, chunk)
                written = loop.time()
            after = page.watermark
            if page.more:
                continue
            if page.held_back:
                # An earlier transaction may still add items before these: look again soon
                # (it may hold the horizon for long: the stream is kept alive meanwhile).
                wait = next(held_back)
            else:
                held_back, wait = pauses(0.02, 1.0), self._keepalive
            written = await self._quiet(request, response, watch, wait, written)
            checked = await self._recheck(reader, checked)
        self._metrics.streams_dropped.labels("stopping").inc()

    async def _recheck(self, reader: Reader, checked: float) -> float:
        """When the reader's token was last checked: again once a keep-alive has passed since
        (_Revoked if it no longer holds), so a revoked or expired conversation token's stream
        ends within a keep-alive."""
        now = asyncio.get_running_loop().time()
        if now - checked < self._keepalive:
            return checked
        if not await self._api.still_reads(reader):
            raise _Revoked
        return now

    async def _quiet(
        self,
        request: web.Request,
        response: web.StreamResponse,
        watch: Watch,
        seconds: float,
        written: float,
    ) -> float:
        """Wait up to `seconds` for news, looking every `PRESENCE_CHECK` seconds whether the
        reader is still connected (_ReaderLeft if not: a reader that left gives its slots back
        within seconds); write a keep-alive comment once nothing was written for a keep-alive.
        When the reader was last written to."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while (left := deadline - loop.time()) > 0:
            if await watch.news(min(left, PRESENCE_CHECK)):
                break
            if _gone(request):
                raise _ReaderLeft
        if loop.time() - written < self._keepalive:
            return written
        await self._write(response, b": keep-alive\n\n")
        return loop.time()

    async def _write(self, response: web.StreamResponse, data: bytes) -> None:
        try:
            async with asyncio.timeout(self._write_timeout):
                await response.write(data)
        except TimeoutError as error:
            raise _SlowReader from error

    @contextlib.contextmanager
    def _slot(self, reader: Reader) -> Iterator[None]:
        """A slot of each limit while in scope; or a 503 naming the one that is full."""
        with take_all(self._slots.claims(reader)) as full:
            if full is not None:
                self._refuse(full)
            yield

    def _refuse(self, full: Slots) -> NoReturn:
        self._metrics.streams_dropped.labels("full").inc()
        self._metrics.limit_refusals.labels(full.name).inc()
        raise Unavailable(
            f"{_REFUSALS[full.name]} ({full.cap}); close one or try again later",
            details={"limit": full.name, "max": full.cap},
            headers={"Retry-After": RETRY_AFTER},
        )


def _resume_point(request: web.Request) -> Watermark | None:
    """Where the stream resumes: `Last-Event-ID` (a browser reconnecting), else `?after=`;
    both are checked (a bad `after` is a 400 even beside a good header)."""
    after = parse_watermark(request.query.get("after"), "after")
    header = request.headers.get(LAST_EVENT_ID_HEADER)
    if header is not None:
        return parse_watermark(header, LAST_EVENT_ID_HEADER)
    return after


def _gone(request: web.Request) -> bool:
    """Whether the request's connection is closed or closing (its reader left)."""
    transport = request.transport
    return transport is None or transport.is_closing()


def _event(row: HistoryRow) -> bytes:
    """One item as an event."""
    return b"id: %s\nevent: message\ndata: %s\n\n" % (str(row.watermark).encode(), item_json(row))


def _gathered(page: EncodedPage) -> Iterator[bytes]:
    """The page's events, in writes of about `CHUNK` bytes: small items go out together,
    and a big one on its own, so no write holds more than one item beyond a chunk."""
    pending: list[bytes] = []
    size = 0
    for event in page.chunks:
        pending.append(event)
        size += len(event)
        if size >= CHUNK:
            yield b"".join(pending)
            pending, size = [], 0
    if pending:
        yield b"".join(pending)
