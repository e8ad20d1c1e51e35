"""A response endpoint on 127.0.0.1 that records every request and, while flapping, fails
each one in turn with a 500, a timeout (it hangs longer than the caller waits) or a
connection reset. Only a request answered 200 counts as delivered."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import struct
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from aiohttp import web

from tests.receivers import Hit, serving

# Hit.status of a request that was not answered.
TIMED_OUT = -1
RESET = -2
FAILURES = ("500", "timeout", "reset")


@dataclass
class FlappingEndpoint:
    base: str
    hang: float  # how long a "timeout" hangs: more than the caller's timeout
    hits: list[Hit] = field(default_factory=list)
    flapping: bool = False
    _turn: int = 0

    def url(self, path: str) -> str:
        return f"{self.base}/{path}"

    def at(self, path: str) -> list[Hit]:
        return [hit for hit in self.hits if hit.path == path]

    def next_failure(self) -> str:
        failure = FAILURES[self._turn % len(FAILURES)]
        self._turn += 1
        return failure


def _reset(request: web.Request) -> None:
    """Close the connection with a TCP reset (SO_LINGER 0), not a FIN."""
    transport = request.transport
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


@contextlib.asynccontextmanager
async def serve_flapping(hang: float) -> AsyncIterator[FlappingEndpoint]:
    state = FlappingEndpoint("", hang)

    async def handle(request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        headers = {k.lower(): v for k, v in request.headers.items()}
        hit = Hit(request.match_info["path"], headers, json.loads(raw), raw, time.monotonic())
        state.hits.append(hit)
        if not state.flapping:
            hit.status = 200
            return web.Response(status=200)
        failure = state.next_failure()
        if failure == "500":
            hit.status = 500
            return web.Response(status=500)
        if failure == "timeout":
            hit.status = TIMED_OUT
            await asyncio.sleep(state.hang)  # the caller has given up by now
            return web.Response(status=503)
        hit.status = RESET
        _reset(request)
        return web.Response(status=500)  # never sent: the connection is gone

    app = web.Application()
    app.router.add_post("/{path}", handle)
    async with serving(app) as base:
        state.base = base
        yield state
