"""A Server-Sent Events client for tests: the events (and comment lines) of a stream as
they come, over aiohttp."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp


@dataclass
class Event:
    id: str
    event: str
    data: str

    @property
    def item(self) -> dict[str, Any]:
        value: dict[str, Any] = json.loads(self.data)
        return value


@dataclass
class EventStream:
    """Reads one stream; `comments` collects the comment lines seen so far."""

    response: aiohttp.ClientResponse
    comments: list[str] = field(default_factory=list)
    retry: str | None = None

    async def next(self, timeout: float = 10.0) -> Event:
        """The next event (fails after `timeout` seconds, or if the stream ends)."""
        async with asyncio.timeout(timeout):
            fields: dict[str, str] = {}
            while True:
                raw = await self.response.content.readline()
                if not raw:
                    raise EOFError("the stream ended")
                line = raw.decode().rstrip("\n")
                if line == "":
                    if "data" in fields:
                        return Event(fields.get("id", ""), fields.get("event", ""), fields["data"])
                    continue
                if line.startswith(":"):
                    self.comments.append(line)
                    continue
                name, _, value = line.partition(": ")
                if name == "retry":
                    self.retry = value
                else:
                    fields[name] = value

    async def take(self, count: int, timeout: float = 10.0) -> list[Event]:
        """The next `count` events."""
        return [await self.next(timeout) for _ in range(count)]

    async def ended(self, timeout: float = 10.0) -> bool:
        """Whether the server closes the stream within `timeout` (reading what is left)."""
        try:
            async with asyncio.timeout(timeout):
                while await self.response.content.readline():
                    pass
        except TimeoutError:
            return False
        return True


@contextlib.asynccontextmanager
async def open_stream(
    http: aiohttp.ClientSession, url: str, headers: dict[str, str] | None = None
) -> AsyncIterator[EventStream]:
    """GET an event stream (asserting 200 and the content type) until the block ends."""
    async with http.get(url, headers=headers, timeout=aiohttp.ClientTimeout(total=None)) as answer:
        assert answer.status == 200, await answer.text()
        assert answer.headers["Content-Type"].startswith("text/event-stream")
        yield EventStream(answer)
