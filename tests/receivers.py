"""Real HTTP endpoints on 127.0.0.1 for delivery tests: each path answers from a script."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web


@dataclass
class Hit:
    """One request a receiver got."""

    path: str
    headers: dict[str, str]
    body: dict[str, Any]
    raw: bytes
    at: float
    status: int = 0


@dataclass
class Receiver:
    """Real HTTP endpoints on 127.0.0.1; each path answers from its own script."""

    base: str
    scripts: dict[str, list[tuple[int, dict[str, str]]]] = field(default_factory=dict)
    hits: list[Hit] = field(default_factory=list)
    hang: set[str] = field(default_factory=set)
    hang_once: set[str] = field(default_factory=set)

    def url(self, path: str) -> str:
        return f"{self.base}/{path}"

    def on(self, path: str, *answers: int | tuple[int, dict[str, str]]) -> str:
        """Answer these statuses in turn, then 200; the endpoint's URL."""
        self.scripts[path] = [a if isinstance(a, tuple) else (a, {}) for a in answers]
        return self.url(path)

    def at(self, path: str) -> list[Hit]:
        return [hit for hit in self.hits if hit.path == path]


@contextlib.asynccontextmanager
async def serve_receiver() -> AsyncIterator[Receiver]:
    state = Receiver("")

    async def handle(request: web.Request) -> web.StreamResponse:
        path = request.match_info["path"]
        raw = await request.read()
        hit = Hit(
            path,
            {k.lower(): v for k, v in request.headers.items()},
            json.loads(raw),
            raw,
            time.monotonic(),
        )
        state.hits.append(hit)
        if path in state.hang:
            await asyncio.sleep(3600)
        if path in state.hang_once:
            state.hang_once.discard(path)
            await asyncio.sleep(3600)
        script = state.scripts.get(path, [])
        hit.status, headers = script.pop(0) if script else (200, {})
        return web.Response(status=hit.status, headers=headers)

    app = web.Application()
    app.router.add_post("/{path}", handle)
    async with serving(app) as base:
        state.base = base
        yield state


@contextlib.asynccontextmanager
async def serving(app: web.Application) -> AsyncIterator[str]:
    """Serve `app` on a free port of 127.0.0.1 until the block ends; its base URL."""
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
    finally:
        await runner.cleanup()
