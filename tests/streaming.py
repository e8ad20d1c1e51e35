"""A paced stream of conversations through separate `relay` processes, with events injected
mid-stream, and its checks: what the cluster and repartitioning tests share (the fault
suite, `tests/test_faults.py`, has a richer diagnosis of its own).

Checked after the events: nothing accepted is lost, every conversation completes within
60 s of the end of the last event, duplicates only under the same webhook-id, per
conversation every response in order, and the ingress answered 503, never another 5xx.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from relay.settings import Settings
from relay.store import open_store
from relay.store.postgres import drop_schema
from tests.conftest import postgres_url
from tests.conversations import Stream, lateness, missing_counts, problems
from tests.flapping import FlappingEndpoint
from tests.fleet import Fleet, fleet
from tests.helpers import eventually, make_integration

ROLES = {"ingress": 2, "bot-worker": 2, "delivery-worker": 2}
COMPLETE_WITHIN = 60.0  # every conversation complete this long after the last event


@contextlib.asynccontextmanager
async def stream_settings(name: str, **chosen: Any) -> AsyncIterator[Settings]:
    """Settings for a stream: a fresh PostgreSQL schema (dropped after) and queue prefix,
    short retry delays, `chosen` on top (the broker's address at least)."""
    with postgres_url() as server:
        schema = f"{name[:1]}_{uuid.uuid4().hex[:12]}"
        try:
            yield Settings(
                **{
                    "_env_file": None,
                    "database_url": f"{server}?schema={schema}",
                    "queue_prefix": f"{name}-{uuid.uuid4().hex[:8]}",
                    "partitions": 8,
                    "auth_cache_seconds": 0,
                    "rate_limit_per_second": 0,
                    "presence_interval": 0.5,
                    "bot_retry_delays": [0.2, 0.5, 1.0, 2.0],
                    "delivery_delay_queues": [0.1, 0.5, 2.0],
                    "allowed_endpoint_networks": ["127.0.0.0/8"],
                    **chosen,
                }
            )
        finally:
            with contextlib.suppress(Exception):
                await drop_schema(server, schema)


@dataclass
class Run:
    """A stream under way: the processes, the ingresses the senders use, what happened."""

    stream: Stream
    services: Fleet
    ingresses: list[str]
    endpoint: FlappingEndpoint
    path: str  # the endpoint path the responses go to
    events: list[tuple[str, float, float]] = field(default_factory=list)

    async def at_round(self, rounds: int) -> None:
        """Until `rounds` messages per conversation were accepted in all (bounded)."""
        target = rounds * self.stream.conversations

        async def reached() -> bool:
            return self.stream.total >= target

        await eventually(reached, timeout=180, interval=0.1)

    @property
    def round(self) -> int:
        """Messages per conversation accepted so far."""
        return self.stream.total // self.stream.conversations

    @contextlib.asynccontextmanager
    async def event(self, name: str) -> AsyncIterator[None]:
        """Record an event's start and end (the end: it is over)."""
        start = time.monotonic()
        try:
            yield
        finally:
            self.events.append((name, start, time.monotonic()))


@contextlib.asynccontextmanager
async def streaming(
    settings: Settings,
    env: dict[str, str],
    logs: Path,
    endpoint: FlappingEndpoint,
    path: str,
    pace: float,
) -> AsyncIterator[Run]:
    """Every role of `ROLES` running, an integration answering to `endpoint`/`path`, and a
    stream ready to run (`run_with`)."""
    store = await open_store(settings.database_url)
    try:
        integration_id, token = await make_integration(store, settings, path, endpoint.url(path))
    finally:
        await store.close()
    connector = aiohttp.TCPConnector(limit=200)
    async with (
        fleet(settings, env, logs) as services,
        aiohttp.ClientSession(connector=connector) as client,
    ):
        started = await asyncio.gather(
            *(services.start(role) for role, count in ROLES.items() for _ in range(count))
        )
        ingresses = [s.url for s in started if s.role == "ingress"]
        stream = Stream(client, integration_id, token, lambda: ingresses, pace, prefix=path)
        yield Run(stream, services, ingresses, endpoint, path)


async def run_with(run: Run, inject: Callable[[], Awaitable[None]]) -> None:
    """Stream while `inject` runs its events, then check everything (AssertionError)."""
    stream = run.stream

    async def events() -> None:
        try:
            await inject()
        finally:
            stream.faults_over.set()

    try:
        async with asyncio.TaskGroup() as group:
            group.create_task(stream.run())
            group.create_task(events())
        found = await _outcome(run)
    except BaseException:
        print(run.services.tails(40))
        raise
    hits = run.endpoint.at(run.path)
    late = lateness(stream, hits, run.events[-1][2])
    print(
        f"\n{stream.total} messages accepted; answers {dict(stream.answers)}; "
        + "; ".join(f"{name} {end - start:.1f} s" for name, start, end in run.events)
        + f"; last conversation complete {max(late.values()):.1f} s after the last event"
    )
    if found:
        print(run.services.tails(40))
    assert not found, "\n".join(found[:15])
    assert stream.total >= 1500


async def _outcome(run: Run) -> list[str]:
    """Wait (bounded) for every conversation to complete, then everything wrong."""
    stream, last_end = run.stream, run.events[-1][2]

    async def complete() -> bool:
        return not missing_counts(stream, run.endpoint.at(run.path))

    with contextlib.suppress(AssertionError):
        wait = max(last_end + COMPLETE_WITHIN - time.monotonic(), 1)
        await eventually(complete, timeout=wait, interval=0.5)
    found = problems(stream, run.endpoint.at(run.path), last_end, COMPLETE_WITHIN)
    server_errors = {a: n for a, n in stream.answers.items() if a[:1] == "5" and a != "503"}
    if server_errors:
        found.append(f"the ingress answered {server_errors}; first: {stream.errors[:3]}")
    return found
