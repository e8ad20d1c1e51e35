"""A stage worker's partitions under faults, on the real broker: a connection lost in the
middle of a hand-off, and a partition that stops making progress.

The worker here is a `StageWorker` of a small handler whose `decide` the test holds and
releases, so the fault lands exactly where it must.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import datetime
from urllib.parse import urlsplit

import pytest
from aio_pika.abc import AbstractIncomingMessage
from pydantic import BaseModel

from relay.broker import Broker, StageName, partition_of, topology_of
from relay.metrics import Metrics
from relay.pipeline.settle import Outcome, Verdict
from relay.pipeline.stage import StageWorker
from relay.service.lifecycle import stall_check
from relay.settings import Settings
from relay.store import Unfinished
from relay.wire import utcnow
from tests.helpers import conversation_in, eventually, with_address
from tests.proxy import Proxy


class Note(BaseModel):
    conversation: str
    n: int
    createdAt: datetime


class Notes:
    """A stage handler that records what it handled; a note whose number is in `gates`
    waits for its event."""

    stage: StageName = "outbound"
    envelope_type = Note

    def __init__(self) -> None:
        self.handled: list[tuple[str, int]] = []
        self.gates: dict[int, asyncio.Event] = {}
        self.waiting: set[int] = set()

    def keys(self, envelope: Note) -> tuple[str, str]:
        return envelope.conversation, str(envelope.n)

    def created_at(self, envelope: Note) -> datetime:
        return envelope.createdAt

    def sequence(self, envelope: Note) -> int | None:
        return None

    def parking_key(self, message_id: str) -> str:
        return message_id

    async def unfinished(self, envelope: Note) -> list[Unfinished]:
        return []

    async def unreadable(self, message_id: str) -> None:
        pass

    async def decide(self, message: AbstractIncomingMessage, envelope: Note) -> Verdict:
        gate = self.gates.get(envelope.n)
        if gate is not None:
            self.waiting.add(envelope.n)
            await gate.wait()
        self.handled.append((envelope.conversation, envelope.n))
        return Verdict(Outcome.DONE)


class NoteWorker(StageWorker[Note]):
    """A stage worker of `Notes`, with the handler's records at hand."""

    def __init__(self, broker: Broker, settings: Settings) -> None:
        notes = Notes()
        super().__init__(notes, broker, Metrics(), 8, settings)
        self.broker = broker
        self.handled = notes.handled
        self.gates = notes.gates
        self.waiting = notes.waiting


@contextlib.asynccontextmanager
async def note_worker(settings: Settings, amqp_url: str) -> AsyncIterator[NoteWorker]:
    broker = Broker(amqp_url, topology_of(settings), settings.publish_timeout)
    broker.start()
    worker = NoteWorker(broker, settings)
    try:
        await asyncio.wait_for(broker.wait_connected(), 15)
        await asyncio.wait_for(worker.start(), 15)
        yield worker
    finally:
        await worker.stop(2)
        await broker.close()


async def send(broker: Broker, conversation: str, n: int, partitions: int) -> None:
    note = Note(conversation=conversation, n=n, createdAt=utcnow())
    await broker.publish(
        "outbound",
        conversation,
        note.model_dump_json().encode(),
        message_id=f"{conversation}-{n}",
        partitions=partitions,
    )


@pytest.fixture(scope="module")
def database_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    """These workers keep nothing in a store: one backend is enough."""
    return f"sqlite:///{tmp_path_factory.mktemp('db') / 'relay.db'}"


@pytest.fixture
async def proxy(amqp_url: str) -> AsyncIterator[Proxy]:
    target = urlsplit(amqp_url)
    running = Proxy(target.hostname or "127.0.0.1", target.port or 5672)
    await running.start()
    yield running
    running.blackhole = False
    await running.stop()


@pytest.fixture
def fast(settings: Settings) -> Settings:
    return settings.model_copy(update={"shutdown_timeout": 30.0, "stall_seconds": 1.0})


@pytest.fixture
async def publisher(fast: Settings, amqp_url: str) -> AsyncIterator[Broker]:
    broker = Broker(amqp_url, topology_of(fast), fast.publish_timeout)
    broker.start()
    try:
        await asyncio.wait_for(broker.wait_connected(), 15)
        yield broker
    finally:
        await broker.close()


def handled(worker: NoteWorker, conversation: str) -> list[int]:
    return [n for c, n in worker.handled if c == conversation]


async def start_a_hand_off_that_waits(
    first: NoteWorker, publisher: Broker, fast: Settings, amqp_url: str, conversation: str
) -> None:
    """Note 1 of `conversation` is in hand and stays so; a peer comes and goes, and the
    partition is being handed over, waiting for note 1."""
    partitions = fast.partitions
    first.gates[1] = asyncio.Event()
    await send(publisher, conversation, 1, partitions)
    await eventually(lambda: _true(1 in first.waiting))
    async with note_worker(fast, amqp_url):
        partition = partition_of(conversation, partitions)
        await eventually(lambda: _true(partition in first.releasing), timeout=20)


@pytest.mark.timeout(120)
async def test_a_connection_lost_while_a_hand_off_waits_leaves_no_partition_behind(
    fast: Settings, amqp_url: str, proxy: Proxy, publisher: Broker
):
    partitions = fast.partitions
    conversations = [conversation_in(p, partitions) for p in range(partitions)]
    last = partitions - 1  # handed over first (the highest numbers go)
    # The worker under test reaches the broker through the proxy; it retries fast.
    proxied = with_address(amqp_url, proxy.url_host) + "?reconnect_interval=0.3"
    async with note_worker(fast, proxied) as first:
        for conversation in conversations:
            await send(publisher, conversation, 0, partitions)
        await eventually(lambda: _true(first.active_partitions == set(range(partitions))))
        await start_a_hand_off_that_waits(first, publisher, fast, amqp_url, conversations[last])
        # The peer left again; now the connection goes, and stays gone a while.
        proxy.blackhole = True
        await proxy.cut()
        await eventually(lambda: _true(not first.broker.ready), timeout=10)
        first.gates[1].set()  # the hand-off goes on while the broker is away
        await eventually(lambda: _true(last not in first.releasing), timeout=10)
        proxy.blackhole = False
        await proxy.cut()  # a connection attempt stuck in the blackhole ends now
        for n in range(2, 12):
            await send(publisher, conversations[last], n, partitions)
        await eventually(
            lambda: _true(set(handled(first, conversations[last])) >= set(range(12))),
            timeout=60,
            interval=0.1,
        )
        # The partitions that were not being handed over lost their channels with the
        # connection: each was subscribed again, and consumes.
        assert first.subscribed == set(range(partitions))
        for conversation in conversations[:last]:
            await send(publisher, conversation, 100, partitions)
        await eventually(
            lambda: _true(all(100 in handled(first, c) for c in conversations[:last])),
            timeout=30,
            interval=0.1,
        )
        # Note 1 was handled when released, and again when redelivered (its ack went with
        # the connection); after it, the rest in order.
        assert [n for n in handled(first, conversations[last]) if n > 1] == list(range(2, 12))
        assert first.stalled() == {}


@pytest.mark.timeout(60)
async def test_a_partition_that_makes_no_progress_is_reported(fast: Settings, amqp_url: str):
    partitions = fast.partitions
    conversation = conversation_in(0, partitions)
    publisher = Broker(amqp_url, topology_of(fast), fast.publish_timeout)
    publisher.start()
    try:
        await asyncio.wait_for(publisher.wait_connected(), 15)
        async with note_worker(fast, amqp_url) as worker:
            worker.gates[0] = asyncio.Event()
            await send(publisher, conversation, 0, partitions)
            await send(publisher, conversation, 1, partitions)  # waits behind 0, unstarted
            await eventually(lambda: _true(0 in worker.waiting))

            async def reported() -> bool:
                worker.watch()
                value = worker.metrics.registry.get_sample_value(
                    "relay_partition_oldest_unstarted_seconds",
                    {"stage": "outbound", "partition": "0"},
                )
                return bool(worker.stalled()) and (value or 0) > fast.stall_seconds

            await eventually(reported, timeout=20, interval=0.1)
            assert set(worker.stalled()) == {0}
            reason = await stall_check(worker)()
            assert reason is not None
            assert reason.startswith("stalled partitions")
            worker.gates[0].set()

            async def recovered() -> bool:
                worker.watch()
                return worker.stalled() == {} and len(worker.handled) == 2

            await eventually(recovered, timeout=20)
            assert await stall_check(worker)() is None
    finally:
        await publisher.close()


async def _true(value: bool) -> bool:
    return value
