"""`relay queues` and the queue gauges: depth, unacked and consumers of every relay queue."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import AsyncIterator
from dataclasses import replace

import aio_pika
import aiohttp
import pytest
from aio_pika.abc import AbstractRobustConnection
from aiohttp.test_utils import TestServer

from relay.broker import Broker, Topology, declare, queues, topology_of
from relay.broker.operations import OperationsEvents
from relay.broker.topology import delete
from relay.commands.roles import create_all_app
from relay.metrics import Metrics
from relay.service.app import METRICS_KEY
from relay.service.gauges import watch
from relay.settings import Settings
from relay.store import DeadLetter, open_store
from relay.wire import utcnow
from relay.wire.operations import integration_disabled
from tests.helpers import connected_broker, eventually
from tests.test_cli import RELAY, relay, relay_env

MANAGEMENT_URL = os.environ.get("RELAY_TEST_MANAGEMENT_URL", "http://guest:guest@127.0.0.1:15672/")


@pytest.fixture(scope="module")
def database_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    """No store is involved: one SQLite file is enough for the commands to start."""
    return f"sqlite:///{tmp_path_factory.mktemp('db') / 'relay.db'}"


@pytest.fixture(scope="module")
async def topology(amqp: AbstractRobustConnection, settings: Settings) -> AsyncIterator[Topology]:
    topology = topology_of(settings)
    async with amqp.channel() as channel:
        await declare(channel, topology)
    return topology


async def publish(amqp: AbstractRobustConnection, topology: Topology, queue: str, n: int) -> None:
    async with amqp.channel() as channel:
        for i in range(n):
            await channel.default_exchange.publish(
                aio_pika.Message(f"m{i}".encode(), delivery_mode=2), routing_key=queue
            )


async def ignore(message: aio_pika.abc.AbstractIncomingMessage) -> None:
    """A consumer that takes nothing: it only has to be there."""


async def management_answers() -> bool:
    try:
        async with (
            aiohttp.ClientSession() as http,
            http.get(
                MANAGEMENT_URL.rstrip("/") + "/api/overview", timeout=aiohttp.ClientTimeout(total=2)
            ) as answer,
        ):
            return answer.status in (200, 401)
    except (aiohttp.ClientError, TimeoutError):
        return False


async def test_look_counts_ready_messages_and_consumers_of_every_queue(
    amqp: AbstractRobustConnection, topology: Topology
):
    await publish(amqp, topology, topology.queue("inbound", 1), 3)
    await publish(amqp, topology, topology.dead_queue("outbound"), 2)
    async with amqp.channel() as channel:
        queue = await channel.get_queue(topology.queue("outbound", 0))
        tag = await queue.consume(ignore)
        stats = {stat.name: stat for stat in await queues.look(amqp, topology)}
        await queue.cancel(tag)
    assert [name for name, _, _ in topology.queues()] == list(stats)
    assert stats[topology.queue("inbound", 1)].ready == 3
    assert stats[topology.queue("inbound", 0)].ready == 0
    assert stats[topology.dead_queue("outbound")].ready == 2
    assert stats[topology.queue("outbound", 0)].consumers == 1
    assert stats[topology.queue("inbound", 0)].consumers == 0
    kinds = {stat.kind for stat in stats.values()}
    assert kinds == {"partition", "delay", "dead", "operations"}

    metrics = Metrics()
    queues.export(list(stats.values()), metrics)
    sample = metrics.registry.get_sample_value
    labels = {"stage": "inbound", "queue": topology.queue("inbound", 1)}
    assert sample("relay_queue_messages", labels) == 3


async def test_a_missing_queue_is_shown_as_missing(amqp: AbstractRobustConnection):
    elsewhere = Topology("nothing-here-" + os.urandom(4).hex(), 2)
    stats = await queues.look(amqp, elsewhere)
    assert stats
    assert all(stat.ready is None for stat in stats)
    assert "missing" in queues.render_table(stats)


async def test_relay_queues_prints_a_table_and_json(
    amqp: AbstractRobustConnection, topology: Topology, settings: Settings
):
    await publish(amqp, topology, topology.queue("outbound", 2), 4)
    table = await relay(settings, "queues")
    assert table.code == 0, table.err
    lines = table.out.splitlines()
    assert lines[0].split() == [
        *("QUEUE", "STAGE", "KIND", "READY", "UNACKED", "CONSUMERS", "LEADER", "MEMBERS")
    ]
    row = next(line.split() for line in lines if line.startswith(topology.queue("outbound", 2)))
    assert row[:4] == [topology.queue("outbound", 2), "outbound", "partition", "4"]

    as_json = await relay(settings, "queues", "--json")
    assert as_json.code == 0, as_json.err
    found = {q["name"]: q for q in json.loads(as_json.out)["queues"]}
    assert found[topology.queue("outbound", 2)]["ready"] == 4
    assert set(found) == {name for name, _, _ in topology.queues()}


async def test_the_operations_queues_are_listed_with_their_depth(
    amqp: AbstractRobustConnection, settings: Settings
):
    # A prefix of the test's own: the module's services consume the module's operations queue.
    own = settings.model_copy(update={"queue_prefix": f"{settings.queue_prefix}-ops"})
    topology = topology_of(own)
    try:
        async with connected_broker(own) as broker:  # declares the topology
            events = OperationsEvents(broker)
            for n in range(3):
                await events.publish(integration_disabled(f"i{n}", "operator", utcnow()))
        as_json = await relay(own, "queues", "--json")
        assert as_json.code == 0, as_json.err
        found = {q["name"]: q for q in json.loads(as_json.out)["queues"]}
        assert set(found) == set(topology.queue_names())
        queue, *delays = topology.operations_queues()
        assert len(delays) == len(own.delivery_delay_queues)
        assert (found[queue]["stage"], found[queue]["kind"], found[queue]["ready"]) == (
            "operations",
            "operations",
            3,
        )
        assert [(found[d]["stage"], found[d]["kind"], found[d]["ready"]) for d in delays] == [
            ("operations", "delay", 0)
        ] * len(delays)
        table = await relay(own, "queues")
        assert [queue, "operations", "operations", "3"] in [
            line.split()[:4] for line in table.out.splitlines()
        ]

        metrics = Metrics()
        queues.export(await queues.look(amqp, topology), metrics)
        labels = {"stage": "operations", "queue": queue}
        assert metrics.registry.get_sample_value("relay_queue_messages", labels) == 3
    finally:
        async with amqp.channel() as channel:
            await delete(channel, topology)


async def test_relay_queues_shows_unacked_counts_from_the_management_api(
    amqp: AbstractRobustConnection, topology: Topology, settings: Settings
):
    if not await management_answers():
        pytest.skip(
            "RabbitMQ's management API does not answer (scripts/ensure-services enables it)"
        )
    name = topology.queue("inbound", 3)
    await publish(amqp, topology, name, 2)
    async with amqp.channel() as channel:
        queue = await channel.get_queue(name)
        held: list[aio_pika.abc.AbstractIncomingMessage] = []

        async def hold(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            held.append(message)  # never acked: unacked until the channel closes

        tag = await queue.consume(hold)

        async def both_held() -> bool:
            return len(held) == 2

        await eventually(both_held)

        async def shows_unacked() -> bool:
            run = await relay(
                settings, "queues", "--json", env={"RELAY_MANAGEMENT_URL": MANAGEMENT_URL}
            )
            found = {q["name"]: q for q in json.loads(run.out)["queues"]}
            return bool(found[name]["unacked"] == 2)

        # The management API refreshes its figures every few seconds.
        await eventually(shows_unacked, timeout=30, interval=1)
        await queue.cancel(tag)


async def test_relay_queues_watch_looks_again_until_interrupted(
    topology: Topology, settings: Settings
):
    process = await asyncio.create_subprocess_exec(
        *RELAY,
        "queues",
        "--watch",
        "0.2",
        env=relay_env(settings),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        # As from a terminal: a suite started as a background job (`make test &`) ignores
        # SIGINT, and an ignored signal stays ignored across exec.
        preexec_fn=_interruptible,
    )
    assert process.stdout is not None
    headers = 0
    async with asyncio.timeout(30):
        while headers < 2:
            line = await process.stdout.readline()
            headers += "QUEUE" in line.decode()
    process.send_signal(signal.SIGINT)
    # Reading what is left meanwhile: a full pipe must not be what holds the process.
    _, err = await asyncio.wait_for(process.communicate(), 20)
    assert process.returncode == 130, err.decode()[-2000:]


async def test_one_process_running_every_service_watches_the_queues_once(
    settings: Settings, topology: Topology
):
    app = create_all_app(settings.model_copy(update={"queue_watch_interval": 0.1}))
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        watchers = [task for task in asyncio.all_tasks() if task.get_name() == "queue-watch"]
        assert len(watchers) == 1  # not one per service
        registry = app[METRICS_KEY].registry

        async def gauges_set() -> bool:
            return any(
                sample.labels.get("queue") == topology.queue("outbound", 0)
                for metric in registry.collect()
                if metric.name == "relay_queue_messages"
                for sample in metric.samples
            )

        await eventually(gauges_set)
    finally:
        await server.close()
    assert all(task.done() for task in watchers)


def test_a_quorum_queue_without_a_majority_of_its_members_is_shown_and_exported():
    members = ("rabbit@a", "rabbit@b", "rabbit@c")
    healthy = queues.QueueStat(
        "q.inbound.0", "inbound", "partition", 1, 1, 0, "rabbit@a", members, members
    )
    one_down = replace(healthy, name="q.inbound.1", online=members[:2])
    two_down = replace(healthy, name="q.inbound.2", leader=None, online=members[:1])
    stats = [healthy, one_down, two_down]
    assert [s.quorum_lost for s in stats] == [False, False, True]
    table = queues.render_table(stats)
    assert "rabbit@a,rabbit@b,rabbit@c-" in table  # a member down is marked
    assert table.splitlines()[-1] == (
        "QUORUM LOST (no messages in or out until members return): q.inbound.2"
    )
    assert json.loads(queues.render_json(stats))["queues"][2]["quorum_lost"] is True
    metrics = Metrics()
    queues.export(stats, metrics)
    sample = metrics.registry.get_sample_value
    lost = {"stage": "inbound", "queue": "q.inbound.2"}
    assert sample("relay_queue_quorum_lost", lost) == 1
    assert sample("relay_queue_members_online", lost) == 1
    assert sample("relay_queue_members", lost) == 3
    assert sample("relay_queue_quorum_lost", {"stage": "inbound", "queue": "q.inbound.1"}) == 0


async def test_the_gauges_and_the_table_cover_every_partition_count_in_use(
    amqp: AbstractRobustConnection, topology: Topology, settings: Settings
):
    # A service with another count (a change of RELAY_PARTITIONS under way) declared its
    # queues and noted its count: its queues are watched and listed too.
    other = topology.with_partitions(16)
    async with amqp.channel() as channel:
        await declare(channel, other)
    await publish(amqp, other, other.queue("inbound", 11), 3)
    broker = Broker(settings.amqp_url, topology, settings.publish_timeout)
    broker.start()
    metrics = Metrics()

    # The store's word: two partition counts in use, and two inbound dead letters kept.
    store = await open_store(settings.database_url)
    await store.register_partitions(topology.partitions, utcnow())
    await store.register_partitions(16, utcnow())
    for n in range(2):
        await store.keep_dead_letter(
            DeadLetter(f"gauged-{n}", "inbound", "i", "c", "r", 1, None, 0, {})
        )
    kept = await store.dead_letter_summary()  # the module's other tests kept some too
    fast = settings.model_copy(update={"queue_watch_interval": 0.1})
    watching = asyncio.create_task(watch(broker, metrics, fast, store))
    try:

        async def exported() -> bool:
            labels = {"stage": "inbound", "queue": other.queue("inbound", 11)}
            sample = metrics.registry.get_sample_value
            return (
                sample("relay_queue_messages", labels) == 3
                and sample("relay_dead_letters", {"stage": "inbound"}) == kept["inbound"][0]
                and sample("relay_dead_letters", {"stage": "outbound"})
                == kept.get("outbound", (0, None))[0]
            )

        await eventually(exported)
    finally:
        watching.cancel()
        await asyncio.gather(watching, return_exceptions=True)
        await broker.close()
        await store.close()
    table = await relay(settings, "queues")
    assert table.code == 0, table.err
    assert table.err.startswith("broker: RabbitMQ ")
    assert "warning" not in table.err
    assert any(
        line.split()[:4] == [other.queue("inbound", 11), "inbound", "partition", "3"]
        for line in table.out.splitlines()
    )
    async with amqp.channel() as channel:
        for partition in range(16):
            for stage in ("inbound", "outbound"):
                await channel.queue_delete(other.queue(stage, partition))


def _interruptible() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)
