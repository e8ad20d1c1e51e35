"""A TCP proxy that can partition the network between its clients and its target.

`tests.proxy.Proxy`, with `partition()` / `heal()` modelled on a pulled cable rather than
on a closed socket: while partitioned, nothing crosses, in either direction — no bytes, and
no close or reset either (the proxy stops reading, so whatever is sent waits in the
kernel's buffers, as unacknowledged TCP segments would); a new connection is accepted but
not connected onwards (nothing answers its handshake). When the partition heals, what was
sent crosses in order, and so do the closes of connections that one side gave up meanwhile.

So a client behind it learns that the broker is gone only from missing heartbeats, and the
broker likewise (it closes its end after two missed heartbeats, which the client does not
see until the partition heals).
"""

from __future__ import annotations

import asyncio
import contextlib

from tests.proxy import Proxy


class PartitionProxy(Proxy):
    def __init__(self, target_host: str, target_port: int) -> None:
        super().__init__(target_host, target_port)
        self._healed = asyncio.Event()
        self._healed.set()
        # The proxy's port towards the target -> the client's port: who is behind which
        # connection the target sees (a failure's diagnosis names the service).
        self.routes: dict[int, int] = {}

    @property
    def partitioned(self) -> bool:
        return not self._healed.is_set()

    def partition(self) -> None:
        """From now on nothing crosses, not even a close."""
        self._healed.clear()

    def heal(self) -> None:
        """What waited crosses now, in order; then traffic flows again."""
        self._healed.set()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self._healed.wait()  # a connection made during the partition hangs until it heals
        try:
            up_reader, up_writer = await asyncio.open_connection(*self._target)
        except OSError:
            writer.transport.abort()
            return
        self.routes[up_writer.get_extra_info("sockname")[1]] = writer.get_extra_info("peername")[1]
        self._writers |= {writer, up_writer}
        for source, sink in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pipe(source, sink, False))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pipe(
        self, source: asyncio.StreamReader, sink: asyncio.StreamWriter, reply: bool
    ) -> None:
        with contextlib.suppress(asyncio.CancelledError):  # `cut()`: close at once
            with contextlib.suppress(OSError):
                await self._forward(source, sink)
            await self._healed.wait()  # a close or reset crosses only once the partition heals
        self._writers.discard(sink)
        with contextlib.suppress(Exception):
            sink.transport.abort()

    async def _forward(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        while True:
            await self._healed.wait()
            data = await source.read(65536)
            await self._healed.wait()  # read as the partition began: it crosses after it
            if not data:
                return
            sink.write(data)
            await sink.drain()
