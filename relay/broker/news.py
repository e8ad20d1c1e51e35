"""News of conversations: which have new items in their history, told to every ingress.

Whoever makes an item visible (the ingress marking a message queued, the bot worker
storing a turn's replies, a reply pushed later) announces its conversation on the
`{prefix}.news` fanout exchange; every ingress listens on a queue of its own and wakes
whoever there waits on that conversation or its integration (a `?wait` POST, an event
stream), who then reads the store once. No request polls the store, and any ingress serves
any stream.

A notice is a hint, not the data: lost ones (the broker restarting) only delay a reader
until its next read, which a stream does at least every keep-alive and a `?wait` at its
deadline; a listener that reconnects wakes everyone at once. So notices are published
without confirms and not persisted, and announcements made within `window` go out in one
message (under load, one per window per process instead of one per message).
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import aio_pika
import structlog
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractRobustConnection

from relay.aio import cancel_and_wait
from relay.broker.errors import CONNECTION_ERRORS
from relay.retry import keep_trying

if TYPE_CHECKING:
    from relay.broker.client import Broker

log = structlog.get_logger(__name__)

WINDOW = 0.005  # seconds over which announcements are gathered into one notice
NOTICE_TTL = 10  # seconds a notice may wait in a listener's queue before it is stale

# A conversation with news: (integration id, conversation relay id).
News = tuple[str, str]


class NewsPublisher:
    """Announces conversations with news, gathered over a short window (one per process)."""

    def __init__(
        self,
        connection: Callable[[], AbstractRobustConnection | None],
        exchange: str,
        timeout: float,
        window: float = WINDOW,
    ) -> None:
        self._connection = connection
        self._exchange = exchange
        self._timeout = timeout
        self._window = window
        self._pending: set[News] = set()
        self._channel: AbstractChannel | None = None
        self._sending: asyncio.Task[None] | None = None

    def announce(self, integration_id: str, conversation_id: str) -> None:
        """Tell every ingress that the conversation has news (soon, in the background)."""
        self._pending.add((integration_id, conversation_id))
        if self._sending is None or self._sending.done():
            # A context of its own: it sends for every request, not for the one that
            # happened to start it (whose ids would be on its log lines).
            self._sending = asyncio.create_task(
                self._send_pending(), name="news-send", context=contextvars.Context()
            )

    async def _send_pending(self) -> None:
        # The first announcement goes out at once, later ones after the window.
        while self._pending:
            batch, self._pending = self._pending, set()
            await self._send(batch)
            await asyncio.sleep(self._window)

    async def _send(self, batch: set[News]) -> None:
        body = json.dumps(sorted(batch)).encode()
        try:
            channel = await self._open()
            if channel is None:
                return
            exchange = await channel.get_exchange(self._exchange, ensure=False)
            await exchange.publish(aio_pika.Message(body, expiration=NOTICE_TTL), routing_key="")
        except CONNECTION_ERRORS as error:
            log.debug("news_not_sent", error=str(error))

    async def _open(self) -> AbstractChannel | None:
        """The channel notices go out on: its own, without confirms (opened on first use,
        restored with the connection)."""
        if self._channel is not None and not self._channel.is_closed:
            return self._channel
        connection = self._connection()
        if connection is None or connection.is_closed:
            return None
        async with asyncio.timeout(self._timeout):
            self._channel = await connection.channel(publisher_confirms=False)
        return self._channel

    async def close(self) -> None:
        """Stop sending (what is pending is dropped: notices are hints, and the service is
        stopping); the channel closes with the connection."""
        await cancel_and_wait(self._sending)
        self._channel = None


class NewsFeed:
    """An ingress's queue on the news exchange: `on_news` for every notice, `on_gap` when
    notices may have been missed (connected again after a loss)."""

    def __init__(
        self,
        broker: Broker,
        on_news: Callable[[list[News]], None],
        on_gap: Callable[[], None],
    ) -> None:
        self._broker = broker
        self._on_news = on_news
        self._on_gap = on_gap
        self.queue_name = f"{broker.topology.news_exchange}.{uuid.uuid4().hex[:12]}"
        self._channel: AbstractChannel | None = None
        self._task: asyncio.Task[None] | None = None
        self._consuming = False

    def start(self) -> None:
        """Listen, from when the broker is connected (in the background)."""
        self._task = asyncio.create_task(self._listen_when_connected(), name="news-feed")

    async def _listen_when_connected(self) -> None:
        await self._broker.wait_connected()
        await keep_trying(self._listen, CONNECTION_ERRORS, "news_listen_failed")
        log.info("news_listening")

    async def _listen(self) -> None:
        connection = self._broker.connection
        if connection is None:
            raise ConnectionError("no broker connection")
        async with asyncio.timeout(10):
            channel = await connection.channel(publisher_confirms=False)
            self._channel = channel
            exchange = await channel.get_exchange(self._broker.topology.news_exchange, ensure=False)
            # Restored with the connection (robust channel), under the same name.
            queue = await channel.declare_queue(
                self.queue_name,
                exclusive=True,
                auto_delete=True,
                arguments={"x-message-ttl": NOTICE_TTL * 1000},
            )
            await queue.bind(exchange)
            await queue.consume(self._on_message, no_ack=True)
        self._consuming = True
        connection.reconnect_callbacks.add(self._reconnected)
        # Whatever was announced before this moment was not heard.
        self._on_gap()

    async def listening(self) -> bool:
        """Whether the feed's queue is consuming (for tests and readiness)."""
        return self._channel is not None and not self._channel.is_closed and self._consuming

    def _reconnected(self, *_: Any) -> None:
        self._on_gap()

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        try:
            news = [(str(i), str(c)) for i, c in json.loads(message.body)]
        except (ValueError, TypeError):
            log.warning("news_invalid")
            return
        self._on_news(news)

    async def stop(self) -> None:
        """Stop listening; the queue goes with the connection (closed next, at stop)."""
        await cancel_and_wait(self._task)
        connection = self._broker.connection
        if connection is not None:
            connection.reconnect_callbacks.discard(self._reconnected)
        self._channel = None
