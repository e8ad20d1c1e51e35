"""Test helpers: a running ingress, queue inspection, integrations, and polling with a deadline."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import aiohttp
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractRobustConnection
from aiohttp.test_utils import TestServer

from relay import admin
from relay.broker import (
    STAGES,
    Broker,
    StageName,
    Topology,
    declare,
    partition_of,
    topology_of,
)
from relay.broker.topology import delete
from relay.ingress.app import BROKER_KEY, create_app
from relay.metrics import Metrics
from relay.pipeline.dlq import DeadLetters
from relay.pipeline.dlq_keeper import Keeper
from relay.pipeline.stage import StageWorker
from relay.settings import Settings
from relay.store import AttemptRecord, DeliveryOptions, SecretBox, SqlStore, Store, open_store
from relay.wire import InboundEnvelope, OutboundEnvelope, utcnow
from workers.bot.adapters import BotAdapter, load_adapter
from workers.bot.worker import bot_worker
from workers.delivery.sender import Sender
from workers.delivery.worker import delivery_worker

T = TypeVar("T")


async def eventually(
    probe: Callable[[], Awaitable[T]],
    timeout: float = 10.0,
    interval: float = 0.02,
) -> T:
    """Poll `probe` until it returns something truthy, or fail at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = await probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s (last value {value!r})")
        await asyncio.sleep(interval)


async def until_ready(
    http: aiohttp.ClientSession, base: str, timeout: float = 30.0, interval: float = 0.1
) -> None:
    """Wait until the service at `base` answers `/readyz` with 200 (a started process
    refuses connections until it listens)."""

    async def ready() -> bool:
        try:
            async with http.get(f"{base}/readyz") as response:
                return response.status == 200
        except aiohttp.ClientConnectionError:
            return False

    await eventually(ready, timeout=timeout, interval=interval)


def with_address(url: str, host_port: str) -> str:
    """The URL with another host:port, keeping user and password."""
    parts = urlsplit(url)
    credentials = parts.netloc.rsplit("@", 1)[0] + "@" if "@" in parts.netloc else ""
    return urlunsplit(parts._replace(netloc=credentials + host_port))


@dataclass
class Ingress:
    """A running ingress on 127.0.0.1 and a client session to it."""

    url: str
    http: aiohttp.ClientSession
    server: TestServer

    async def post(
        self,
        integration_id: str,
        token: str | None,
        body: Any,
        raw: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, dict[str, Any]]:
        """POST a message; the status and the JSON answer."""
        sent = dict(headers or {})
        if token is not None:
            sent.setdefault("Authorization", f"Bearer {token}")
        data = raw if raw is not None else json.dumps(body).encode()
        async with self.http.post(
            f"{self.url}/webhooks/{integration_id}", data=data, headers=sent
        ) as response:
            return response.status, await response.json(content_type=None)


@contextlib.asynccontextmanager
async def start_ingress(settings: Settings) -> AsyncIterator[Ingress]:
    """Run `create_app(settings)` on a free port until the block ends."""
    app = create_app(settings)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        await asyncio.wait_for(app[BROKER_KEY].wait_connected(), 15)
        async with aiohttp.ClientSession() as http:
            yield Ingress(f"http://127.0.0.1:{server.port}", http, server)
    finally:
        await server.close()


class Queues:
    """Reads what the relay put on its queues (consuming it)."""

    def __init__(self, connection: AbstractRobustConnection, topology: Topology) -> None:
        self._connection = connection
        self._topology = topology

    async def take(self, stage: StageName) -> list[dict[str, Any]]:
        """Every message now on the stage's partitions, removed; each with its `_partition`."""
        taken: list[dict[str, Any]] = []
        async with self._connection.channel() as channel:
            await declare(channel, self._topology)
            for partition in range(self._topology.partitions):
                bodies = await self._drain(channel, self._topology.queue(stage, partition))
                taken += [{**body, "_partition": partition} for body in bodies]
        return taken

    async def counts(self, stage: StageName) -> list[tuple[int, int]]:
        """(ready messages, consumers) of each partition of a stage, without consuming."""
        found = []
        async with self._connection.channel() as channel:
            for partition in range(self._topology.partitions):
                queue = await channel.declare_queue(
                    self._topology.queue(stage, partition), passive=True
                )
                result = queue.declaration_result
                found.append((result.message_count or 0, result.consumer_count or 0))
        return found

    async def all_consumed(self, stage: StageName) -> bool:
        """True when every partition of the stage has its (single active) consumer."""
        return all(consumers for _, consumers in await self.counts(stage))

    async def none_ready(self, stage: StageName) -> bool:
        """True when no partition of the stage holds a message not yet handed out."""
        return not any(ready for ready, _ in await self.counts(stage))

    @staticmethod
    async def _drain(channel: AbstractChannel, name: str) -> list[dict[str, Any]]:
        # Single-active-consumer quorum queues refuse basic.get: consume what is there.
        # Auto-acked delivery, and everything that came before the cancel is kept: nothing
        # is ever returned to the queue (a quorum queue puts returned messages back at the
        # head, which races with the next drain and makes the stage's order look broken).
        queue = await channel.declare_queue(name, passive=True)
        count = queue.declaration_result.message_count or 0
        if not count:
            return []
        delivered: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
        tag = await queue.consume(delivered.put, no_ack=True)
        async with asyncio.timeout(10):
            taken = [await delivered.get() for _ in range(count)]
        await queue.cancel(tag)
        await asyncio.sleep(0)  # deliveries that preceded the cancel-ok reach the queue
        while not delivered.empty():
            taken.append(delivered.get_nowait())
        return [
            {**json.loads(incoming.body), "_message_id": incoming.message_id} for incoming in taken
        ]


async def push_text(
    ingress: Ingress, conversation_id: str, bot_token: str, text: str
) -> dict[str, Any]:
    """A text message through the bot push API (asserting 201); the stored message."""
    async with ingress.http.post(
        f"{ingress.url}/bot/conversations/{conversation_id}/messages",
        json={"type": "text", "payload": {"text": text}},
        headers={"Authorization": f"Bearer {bot_token}"},
    ) as answer:
        assert answer.status == 201, await answer.text()
        message_: dict[str, Any] = (await answer.json())["message"]
        return message_


async def make_integration(
    store: Store,
    settings: Settings,
    name: str = "test",
    response_url: str = "http://127.0.0.1:9/r",
    delivery: DeliveryOptions | None = None,
) -> tuple[str, str]:
    """A new integration and a token for it: (integration id, token)."""
    record = await admin.create_integration(
        store, settings, name, response_url, verify=False, delivery=delivery
    )
    token, _ = await admin.create_token(store, record.id, "integration")
    return record.id, token


def message(n: int | str = 1, **overrides: Any) -> dict[str, Any]:
    """A valid inbound message body."""
    body: dict[str, Any] = {
        "userId": "user-1",
        "messageId": f"msg-{n}",
        "conversationId": "conv-1",
        "type": "text",
        "text": f"hello {n}",
    }
    body.update(overrides)
    return body


@contextlib.asynccontextmanager
async def declared(amqp: AbstractRobustConnection, topology: Topology) -> AsyncIterator[Topology]:
    """`topology`'s queues and exchanges declared for the test, deleted after it."""
    async with amqp.channel() as channel:
        await declare(channel, topology)
    yield topology
    async with amqp.channel() as channel:
        await delete(channel, topology)


@contextlib.asynccontextmanager
async def connected_broker(settings: Settings) -> AsyncIterator[Broker]:
    """A broker client of `settings`, connected (within 15 s), closed afterwards."""
    broker = Broker(settings.amqp_url, topology_of(settings), settings.publish_timeout)
    broker.start()
    try:
        await asyncio.wait_for(broker.wait_connected(), 15)
        yield broker
    finally:
        await broker.close()


@contextlib.asynccontextmanager
async def keeping_dead_letters(settings: Settings) -> AsyncIterator[DeadLetters]:
    """The dead letters kept in the store, with a keeper of each stage running meanwhile (as
    the worker services run them), to list, replay and purge."""
    store = await open_store(settings.database_url)
    async with connected_broker(settings) as broker:
        keepers = [Keeper(store, broker, stage, Metrics()) for stage in STAGES]
        for keeper in keepers:
            keeper.start()
        try:
            yield DeadLetters(store, broker)
        finally:
            for keeper in keepers:
                await keeper.stop()
            await store.close()


@contextlib.asynccontextmanager
async def start_bot_worker(
    settings: Settings, adapter: BotAdapter | None = None, consuming: int | None = None
) -> AsyncIterator[StageWorker[InboundEnvelope]]:
    """A bot worker in this process until the block ends; `consuming`: the partition count
    whose queues it consumes, if not its own (as a worker service does for every count)."""
    bot = adapter or load_adapter(settings)
    store = await open_store(settings.database_url)
    broker = Broker(settings.amqp_url, topology_of(settings), settings.publish_timeout)
    broker.start()
    topology = broker.topology.with_partitions(consuming or settings.partitions)
    worker = bot_worker(settings, store, broker, bot, Metrics(), topology)
    keeper = Keeper(store, broker, "inbound", Metrics())  # as the worker service runs one
    try:
        await asyncio.wait_for(worker.start(), 15)
        keeper.start()
        yield worker
    finally:
        await keeper.stop()
        await worker.stop(5)
        await bot.close()
        await broker.close()
        await store.close()


async def take_until(
    queues: Queues, stage: StageName, count: int, timeout: float = 20.0
) -> list[dict[str, Any]]:
    """Consume from a stage until `count` messages arrived (fails at the deadline)."""
    got: list[dict[str, Any]] = []

    async def enough() -> bool:
        got.extend(await queues.take(stage))
        return len(got) >= count

    await eventually(enough, timeout=timeout, interval=0.05)
    return got


def by_conversation(responses: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Outbound envelopes grouped by the caller's conversation id, in sequence order."""
    grouped: dict[str, list[dict[str, Any]]] = {}
    for item in responses:
        grouped.setdefault(item["body"]["conversationId"], []).append(item)
    for items in grouped.values():
        items.sort(key=lambda item: item["body"]["sequence"])
    return grouped


def settled(worker: StageWorker[InboundEnvelope], outcome: str) -> float:
    """How many inbound messages the worker settled with `outcome` (done, drop, dead...)."""
    value = worker.metrics.registry.get_sample_value(
        "relay_messages_consumed_total", {"stage": "inbound", "outcome": outcome}
    )
    return value or 0.0


@contextlib.asynccontextmanager
async def start_delivery_worker(
    settings: Settings, wrap: Callable[[SqlStore], Any] | None = None
) -> AsyncIterator[StageWorker[OutboundEnvelope]]:
    """A delivery worker in this process until the block ends (its store seen through
    `wrap`, e.g. to make one call fail)."""
    opened = await open_store(settings.database_url)
    store = wrap(opened) if wrap else opened
    broker = Broker(settings.amqp_url, topology_of(settings), settings.publish_timeout)
    broker.start()
    sender = Sender(
        settings.allowed_endpoint_networks,
        settings.https_only,
        settings.delivery_connect_timeout,
        settings.delivery_timeout,
    )
    worker = delivery_worker(settings, store, broker, sender, Metrics())
    keeper = Keeper(opened, broker, "outbound", Metrics())  # as the worker service runs one
    try:
        await asyncio.wait_for(worker.start(), 15)
        keeper.start()
        yield worker
    finally:
        await keeper.stop()
        await worker.stop(5)
        await sender.close()
        await broker.close()
        await opened.close()


def attempt_record(message_id: str, **overrides: Any) -> AttemptRecord:
    """A delivery attempt of the response `message_id`: a 200, unless overridden."""
    fields: dict[str, Any] = {
        "delivery_id": f"msg_{message_id}",
        "attempt": 0,
        "integration_id": "i",
        "message_id": message_id,
        "status": 200,
        "latency_ms": 1.0,
        "error": None,
        "next_attempt_at": None,
        "response_body": None,
        "created_at": utcnow(),
    }
    return AttemptRecord(**{**fields, **overrides})


def conversation_in(partition: int, partitions: int) -> str:
    """A conversation id that hashes to `partition`."""
    return next(
        f"c{partition}-{i}"
        for i in range(10_000)
        if partition_of(f"c{partition}-{i}", partitions) == partition
    )


async def admin_call(
    ingress: Ingress,
    method: str,
    path: str,
    token: str | None,
    body: Any = None,
    raw: bytes | None = None,
) -> tuple[int, Any]:
    """An admin API call: (status, its JSON body; None for a 204)."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with ingress.http.request(
        method, f"{ingress.url}/admin/v1{path}", json=body, data=raw, headers=headers
    ) as answer:
        text = await answer.text()
        if answer.status == 204:
            return 204, None
        assert answer.content_type == "application/json", text
        return answer.status, await answer.json(content_type=None)


@contextlib.asynccontextmanager
async def keyed(database_url: str, *keys: str) -> AsyncIterator[SqlStore]:
    """The database as a process with these RELAY_SECRET_KEYS sees it."""
    opened = await open_store(database_url, secrets=SecretBox.of(keys))
    try:
        yield opened
    finally:
        await opened.close()


async def integration_columns(
    store: SqlStore, integration_id: str, *columns: str
) -> dict[str, Any]:
    """Columns of an integration's row as the database holds them (secrets as sealed)."""
    async with store.driver.connection() as conn:
        row = await conn.fetchone(
            f"SELECT {', '.join(columns)} FROM integrations WHERE id = ?", integration_id
        )
    assert row is not None
    return row
