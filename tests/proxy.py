"""A TCP proxy on 127.0.0.1 that a test can cut, blackhole and restore.

It makes "the broker is down" happen for one client without stopping the shared broker.
"""

from __future__ import annotations

import asyncio
import contextlib


class Proxy:
    """Forwards 127.0.0.1:<port> to a target; `cut()` drops every connection."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self._target = (target_host, target_port)
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.port = 0
        # When set, bytes are read and thrown away: a peer that silently stopped answering.
        self.blackhole = False
        self.swallowed = 0  # bytes thrown away while blackholed
        # When set, only the target's answers are thrown away: requests still arrive.
        self.mute_replies = False

    @property
    def url_host(self) -> str:
        """host:port to put in a URL."""
        return f"127.0.0.1:{self.port}"

    async def start(self) -> None:
        """Listen (on the same port again after a `stop`)."""
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Stop listening and drop every connection: the target looks down."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        # Dropped before waiting: since Python 3.12 wait_closed() waits for every connection.
        await self.cut()
        if server is not None:
            await server.wait_closed()

    async def cut(self) -> None:
        """Drop every open connection."""
        for writer in list(self._writers):
            writer.transport.abort()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self._target)
        except OSError:
            writer.transport.abort()
            return
        self._writers |= {writer, up_writer}
        for source, sink, reply in ((reader, up_writer, False), (up_reader, writer, True)):
            task = asyncio.create_task(self._pipe(source, sink, reply))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pipe(
        self, source: asyncio.StreamReader, sink: asyncio.StreamWriter, reply: bool
    ) -> None:
        try:
            while data := await source.read(65536):
                if self.blackhole or (reply and self.mute_replies):
                    self.swallowed += len(data)
                    continue
                sink.write(data)
                await sink.drain()
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            self._writers.discard(sink)
            with contextlib.suppress(Exception):
                sink.transport.abort()
