"""The fault suite of "No conversation stalls".

Each scenario runs 2 ingresses, 2 bot workers (echo bot) and 2 delivery workers as separate
`relay` processes on a private RabbitMQ node and a private PostgreSQL cluster (started by
this module beside the system ones, which are never touched), streams at least 1,500
messages over 30 conversations (one paced sender per conversation, sending a message again
after a 503, a 5xx or a connection error, like a back end), injects its faults mid-stream,
and checks:

- nothing accepted is lost: both responses of every message answered 200 are delivered;
- every conversation is complete within 60 s of the end of the last fault;
- duplicates only under the same webhook-id (one webhook-id per response);
- per conversation, by first arrival: sequences 1..2N, and the echoed texts in order;
- the ingress answered 503, never 500, while a dependency was away.

Faults: `kill -9` of each role (a replacement started), the broker's `stop_app`/`start_app`
three times, the broker connection cut (a partition, not a close) for longer than the AMQP
heartbeat, a PostgreSQL restart, the response endpoint flapping between 500s, timeouts
and resets for 30 s, and all of these in one run.

Every run writes `summary.txt` (fault timeline, answers, deliveries per 5 s, how long after
the last fault each conversation completed) and the services' output to the test's
tmp_path. On failure it prints, and writes to `diagnosis.txt`, what tells a Relay bug from a
harness bug: the problems, what the senders were answered, the queues and who consumes
each partition (rabbitmqctl, mapped to the service by its connection), the store's view of
the incomplete conversations (their partition, the first message not finished with, and
every log line naming it), the services' metrics, their log events counted, and the end
of every log.

Run: `make test-faults` (marked `faults`, which `make test` leaves out; about 6-9 minutes on
2 cores when every scenario passes, each failing one adds up to 80 s of waiting). Processes
log at warning level; `RELAY_FAULTS_LOG_LEVEL=info` makes them log every message.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aio_pika
import aiohttp
import asyncpg
import pytest

from relay.broker import partition_of, topology_of
from relay.broker.topology import delete
from relay.settings import Settings
from relay.store import DeliveryOptions, open_store
from relay.store.postgres import drop_schema
from tests import private_broker, private_postgres
from tests.conversations import (
    Stream,
    first_deliveries,
    lateness,
    missing_counts,
    problems,
    spans,
)
from tests.flapping import FlappingEndpoint, serve_flapping
from tests.fleet import Fleet, Samples, fleet
from tests.helpers import eventually, make_integration
from tests.partition import PartitionProxy
from tests.private_broker import PrivateBroker
from tests.private_postgres import PrivateCluster

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (private_broker.available() and private_postgres.available()),
        reason="needs Debian's rabbitmq-server and PostgreSQL cluster tools, as root",
    ),
    # `make test` leaves it to `make test-faults` (about 9 minutes); CI runs both.
    pytest.mark.faults,
]

PARTITIONS = 4
BOT_RETRY_DELAYS = (0.2, 0.5, 1.0, 2.0)
DELIVERY_DELAY_QUEUES = (0.1, 0.5, 2.0)
DELIVERY_TIMEOUT = 1.0
HEARTBEAT = 2  # seconds, in the AMQP URL of the services behind the partition proxy
# aiormq gives up on a silent connection after (heartbeat + 1) * 3 = 9 s and the broker after
# two missed heartbeats (4 s): a 12 s partition is noticed by both sides on their own.
PARTITION_SECONDS = 12.0
BROKER_DOWN_SECONDS = 3.0  # each stop_app .. start_app
FLAP_SECONDS = 30.0
COMPLETE_WITHIN = 60.0  # every conversation complete this long after the last fault
GAP_ROUNDS = 5  # messages per conversation accepted between two faults: each mid-stream
ROLES = {"ingress": 2, "bot-worker": 2, "delivery-worker": 2}
FAULT_ENV = {
    "RELAY_PUBLISH_TIMEOUT": "1.5",
    "RELAY_OUTBOX_LEASE": "4",
    "RELAY_OUTBOX_INTERVAL": "0.5",
    "RELAY_DELIVERY_TIMEOUT": str(DELIVERY_TIMEOUT),
    "RELAY_DELIVERY_CONNECT_TIMEOUT": "1",
    # 33 attempts over about a minute: a response outlives the 30 s of flapping.
    "RELAY_DELIVERY_RETRY_SCHEDULE": ",".join(["0", "0.5", "1"] + ["2"] * 30),
    # Scaled down with the retry schedule (the default is 30 s): an endpoint back from an
    # outage is probed within seconds, as it would be within a minute in production.
    "RELAY_BREAKER_COOLDOWN": "5",
    "RELAY_SHUTDOWN_TIMEOUT": "5",
    "RELAY_QUEUE_WATCH_INTERVAL": "5",
    # `RELAY_FAULTS_LOG_LEVEL=info pytest tests/test_faults.py` to see more when digging.
    "RELAY_LOG_LEVEL": os.environ.get("RELAY_FAULTS_LOG_LEVEL", "warning"),
}
METRICS_SHOWN = (
    "relay_partitions_held",
    "relay_messages_consumed_total",
    "relay_delivery_attempts_total",
    "relay_inbound_messages_total",
)


@pytest.fixture(scope="module")
def fault_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateBroker]:
    with private_broker.private_broker(tmp_path_factory.mktemp("broker")) as node:
        yield node


@pytest.fixture(scope="module")
def fault_postgres() -> Iterator[PrivateCluster]:
    with private_postgres.private_postgres() as cluster:
        yield cluster


@pytest.fixture(scope="module")
async def flapping_endpoint() -> AsyncIterator[FlappingEndpoint]:
    async with serve_flapping(hang=3 * DELIVERY_TIMEOUT) as endpoint:
        yield endpoint


@dataclass
class Scene:
    """One scenario's world: private services, its own queue prefix and schema, the
    processes, the stream, and the faults as they happened (name, start, end)."""

    name: str
    broker: PrivateBroker
    postgres: PrivateCluster
    endpoint: FlappingEndpoint
    proxy: PartitionProxy
    prefix: str
    schema: str
    logs: Path
    faults: list[tuple[str, float, float]] = field(default_factory=list)
    ingresses: list[str] = field(default_factory=list)  # what the load balancer sends to
    gap: int = GAP_ROUNDS
    services: Fleet | None = None
    stream: Stream | None = None
    started: float = field(default_factory=time.monotonic)

    def settings(self, via_proxy: bool) -> Settings:
        amqp_url = (
            f"amqp://guest:guest@{self.proxy.url_host}/?heartbeat={HEARTBEAT}"
            if via_proxy
            else self.broker.url
        )
        return Settings(
            _env_file=None,  # type: ignore[call-arg]
            amqp_url=amqp_url,
            database_url=f"{self.postgres.url}?schema={self.schema}",
            queue_prefix=self.prefix,
            partitions=PARTITIONS,
            auth_cache_seconds=0,
            rate_limit_per_second=0,
            publish_timeout=1.5,
            outbox_lease=4.0,
            bot_retry_delays=list(BOT_RETRY_DELAYS),
            delivery_delay_queues=list(DELIVERY_DELAY_QUEUES),
            delivery_overload_penalty=0.5,
            breaker_cooldown=1.0,
            presence_interval=0.5,
            allowed_endpoint_networks=["127.0.0.0/8"],
        )

    @property
    def fleet(self) -> Fleet:
        assert self.services is not None
        return self.services

    @contextlib.asynccontextmanager
    async def fault(self, name: str) -> AsyncIterator[None]:
        """Record a fault's start and end (the end: the fault is over, e.g. the replacement
        is ready, the broker booted, the endpoint healthy again)."""
        start = time.monotonic()
        try:
            yield
        finally:
            self.faults.append((name, start, time.monotonic()))

    async def progress(self) -> None:
        """Until `gap` more messages per conversation were accepted (bounded)."""
        assert self.stream is not None
        await self.at_round(self.stream.total // self.stream.conversations + self.gap)

    async def at_round(self, rounds: int) -> None:
        """Until `rounds` messages per conversation were accepted in all (bounded)."""
        assert self.stream is not None
        stream, target = self.stream, rounds * self.stream.conversations

        async def reached() -> bool:
            return stream.total >= target

        await eventually(reached, timeout=180, interval=0.1)

    def timeline(self) -> str:
        return "\n".join(
            f"  {name}: {start - self.started:.1f} s .. {end - self.started:.1f} s"
            for name, start, end in self.faults
        )


@pytest.fixture
async def scene(
    request: pytest.FixtureRequest,
    fault_broker: PrivateBroker,
    fault_postgres: PrivateCluster,
    flapping_endpoint: FlappingEndpoint,
    tmp_path: Path,
) -> AsyncIterator[Scene]:
    proxy = PartitionProxy("127.0.0.1", fault_broker.port)
    await proxy.start()
    world = Scene(
        name=request.node.name.removeprefix("test_")[:40],
        broker=fault_broker,
        postgres=fault_postgres,
        endpoint=flapping_endpoint,
        proxy=proxy,
        prefix="fault-" + uuid.uuid4().hex[:8],
        schema="f_" + uuid.uuid4().hex[:12],
        logs=tmp_path,
    )
    try:
        yield world
    finally:
        flapping_endpoint.flapping = False
        proxy.heal()
        await proxy.stop()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(_delete_topology(world), 60)
        with contextlib.suppress(Exception):
            await drop_schema(fault_postgres.url, world.schema)


async def _delete_topology(world: Scene) -> None:
    connection = await aio_pika.connect(world.broker.url, timeout=10)
    async with connection, connection.channel() as channel:
        await delete(channel, topology_of(world.settings(via_proxy=False)))


# ---------------------------------------------------------------- the faults


async def kill_each_role(scene: Scene) -> None:
    """`kill -9` of an ingress, a bot worker and a delivery worker in turn, each replaced.
    The load balancer (the senders' list) drops a killed ingress; requests in flight to it
    fail and are sent again to the other one."""
    for role in ROLES:
        await scene.progress()
        async with scene.fault(f"kill -9 {role}"):
            victim = scene.fleet.running(role)[0]
            if role == "ingress":
                scene.ingresses.remove(victim.url)
            await scene.fleet.kill(victim)
            replacement = await scene.fleet.start(role)
            if role == "ingress":
                scene.ingresses.append(replacement.url)


async def restart_the_broker_three_times(scene: Scene) -> None:
    for turn in range(1, 4):
        await scene.progress()
        async with scene.fault(f"broker stop_app/start_app #{turn}"):
            await scene.broker.stop_app()
            try:
                await asyncio.sleep(BROKER_DOWN_SECONDS)  # the outage itself
            finally:
                await scene.broker.start_app()


async def cut_the_broker_connection(scene: Scene) -> None:
    await scene.progress()
    async with scene.fault(f"AMQP partition {PARTITION_SECONDS:.0f} s"):
        scene.proxy.partition()
        try:
            await asyncio.sleep(PARTITION_SECONDS)  # the outage itself
        finally:
            scene.proxy.heal()


async def restart_postgres(scene: Scene) -> None:
    await scene.progress()
    async with scene.fault("PostgreSQL restart"):
        await scene.postgres.restart()


async def flap_the_endpoint(scene: Scene) -> None:
    await scene.progress()
    async with scene.fault(f"endpoint flapping {FLAP_SECONDS:.0f} s"):
        scene.endpoint.flapping = True
        try:
            await asyncio.sleep(FLAP_SECONDS)  # the outage itself
        finally:
            scene.endpoint.flapping = False


async def everything(scene: Scene) -> None:
    for inject in (
        kill_each_role,
        restart_the_broker_three_times,
        cut_the_broker_connection,
        restart_postgres,
        flap_the_endpoint,
    ):
        await inject(scene)


# ---------------------------------------------------------------- the scenarios


@pytest.mark.timeout(240)
async def test_kill_9_of_each_role_mid_stream(scene: Scene) -> None:
    await run_scenario(scene, kill_each_role, pace=0.45, lead=10)


@pytest.mark.timeout(240)
async def test_broker_stop_app_start_app_three_times(scene: Scene) -> None:
    await run_scenario(scene, restart_the_broker_three_times, pace=0.45, lead=25)


@pytest.mark.timeout(240)
async def test_broker_connection_cut_longer_than_the_heartbeat(scene: Scene) -> None:
    await run_scenario(scene, cut_the_broker_connection, pace=0.45, lead=35, via_proxy=True)


@pytest.mark.timeout(240)
async def test_postgres_restart_mid_stream(scene: Scene) -> None:
    await run_scenario(scene, restart_postgres, pace=0.45, lead=40)


@pytest.mark.timeout(240)
async def test_response_endpoint_flapping_for_30_s(scene: Scene) -> None:
    await run_scenario(scene, flap_the_endpoint, pace=0.6, lead=0)


@pytest.mark.timeout(420)
async def test_all_faults_in_one_run(scene: Scene) -> None:
    await run_scenario(scene, everything, pace=1.0, lead=0, gap=3, via_proxy=True)


# ---------------------------------------------------------------- the run and its checks


async def run_scenario(
    scene: Scene,
    inject: Callable[[Scene], Awaitable[None]],
    pace: float,
    lead: int,
    gap: int = GAP_ROUNDS,
    via_proxy: bool = False,
) -> None:
    """Stream at `pace` (seconds between two messages of a conversation); after `lead`
    rounds (messages per conversation), the faults, each after `gap` more rounds; then
    the checks.

    The stream lasts at least 50 rounds and until 3 rounds after the last fault: `lead`
    puts short faults late in it, so that the conversations are complete soon after the
    last fault rather than after a long stream that the fault did not disturb.
    """
    scene.gap = gap
    settings = scene.settings(via_proxy)
    store = await open_store(settings.database_url)
    try:
        # Nothing expires: the checks want every response delivered, whatever the outage
        # (a typing indicator past 30 s is dropped by default: tests/test_expiring_types.py).
        integration_id, token = await make_integration(
            store,
            settings,
            "faults",
            scene.endpoint.url(scene.name),
            DeliveryOptions(expiring_types={}),
        )
    finally:
        await store.close()
    connector = aiohttp.TCPConnector(limit=200)
    async with (
        fleet(settings, FAULT_ENV, scene.logs) as services,
        aiohttp.ClientSession(connector=connector) as client,
    ):
        scene.services = services
        started = await asyncio.gather(
            *(services.start(role) for role, count in ROLES.items() for _ in range(count))
        )
        scene.ingresses = [s.url for s in started if s.role == "ingress"]
        scene.stream = Stream(client, integration_id, token, lambda: scene.ingresses, pace)
        scene.started = time.monotonic()
        try:
            await stream_with_faults(scene, inject, lead)
            found = await outcome(scene)
        except BaseException as error:
            print(await diagnosis(scene, [f"{type(error).__name__}: {error}"]))
            raise
        report = summary(scene)
        print(report)
        (scene.logs / "summary.txt").write_text(report)
        if found:
            text = await diagnosis(scene, found)
            (scene.logs / "diagnosis.txt").write_text(text)
            print(text)
            shown = "\n".join(found[:15])
            raise AssertionError(f"{len(found)} problems (diagnosis above):\n{shown}")


async def stream_with_faults(
    scene: Scene, inject: Callable[[Scene], Awaitable[None]], lead: int
) -> None:
    assert scene.stream is not None
    stream = scene.stream

    async def faults() -> None:
        try:
            await scene.at_round(lead)
            await inject(scene)
        finally:
            stream.faults_over.set()

    async with asyncio.TaskGroup() as group:
        group.create_task(stream.run())
        group.create_task(faults())


async def outcome(scene: Scene) -> list[str]:
    """Wait (bounded) for every conversation to complete, then everything wrong."""
    assert scene.stream is not None
    stream, last_end = scene.stream, scene.faults[-1][2]

    async def complete() -> bool:
        return not missing_counts(stream, scene.endpoint.at(scene.name))

    # Past the 60 s only to tell slow from stalled in the diagnosis.
    wait = last_end + COMPLETE_WITHIN + 20 - time.monotonic()
    with contextlib.suppress(AssertionError):
        await eventually(complete, timeout=max(wait, 1), interval=0.5)
    found = problems(stream, scene.endpoint.at(scene.name), last_end, COMPLETE_WITHIN)
    server_errors = {answer: n for answer, n in stream.answers.items() if answer[:1] == "5"}
    server_errors.pop("503", None)
    if server_errors:
        found.append(
            f"the ingress answered {server_errors} where it must answer 503; first: "
            f"{stream.errors[:3]}"
        )
    return found


def summary(scene: Scene) -> str:
    assert scene.stream is not None
    stream, hits = scene.stream, scene.endpoint.at(scene.name)
    late = lateness(stream, hits, scene.faults[-1][2]) if scene.faults else {}
    statuses = Counter(hit.status for hit in hits)
    return (
        f"\n=== {scene.name}: {stream.total} messages accepted over {stream.conversations} "
        f"conversations ({min(stream.accepted)}..{max(stream.accepted)} each) in "
        f"{time.monotonic() - scene.started:.1f} s; the last accepted at "
        f"{stream.last_accepted_at - scene.started:.1f} s\n"
        f"faults (seconds from the stream's start):\n{scene.timeline()}\n"
        f"answers to the senders: {dict(stream.answers)}\n"
        f"  other than 200, first .. last seen: "
        + ", ".join(
            f"{answer} {first - scene.started:.1f} .. {last - scene.started:.1f} s"
            for answer, (first, last) in stream.seen.items()
        )
        + "\n"
        f"endpoint requests by status: {dict(statuses)} ({len(hits)} in all)\n"
        f"first deliveries per 5 s: {throughput(scene)}\n"
        f"last first delivery after the last fault: "
        f"max {max(late.values(), default=0):.1f} s, min {min(late.values(), default=0):.1f} s\n"
        f"code under test: {code_version()}"
    )


def code_version() -> str:
    """The commit and a digest of the uncommitted changes to relay/ and workers/: which
    code a run saw, while it is being changed."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
        diff = subprocess.run(
            ["git", "diff", "HEAD", "--", "relay", "workers"], capture_output=True, timeout=10
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return f"{head} + changes {hashlib.sha1(diff).hexdigest()[:10]}" if diff else head


def throughput(scene: Scene, bucket: float = 5.0) -> list[int]:
    """First deliveries in each `bucket` seconds since the stream's start: a stall shows."""
    counts: Counter[int] = Counter(
        int((hit.at - scene.started) // bucket)
        for hits in first_deliveries(scene.endpoint.at(scene.name)).values()
        for hit in hits
    )
    return [counts[i] for i in range(max(counts, default=-1) + 1)]


# ---------------------------------------------------------------- diagnosis


async def diagnosis(scene: Scene, found: list[str]) -> str:
    """Everything that helps tell a Relay bug from a harness bug."""
    sections = [
        f"\n##### DIAGNOSIS of {scene.name} ({len(found)} problems)",
        "\n".join(found[:40]),
        f"faults (seconds from the stream's start):\n{scene.timeline()}",
        f"first deliveries per 5 s: {throughput(scene)}",
    ]
    if scene.stream is not None:
        stream = scene.stream
        sections.append(
            f"accepted per conversation: {stream.accepted}\n"
            f"answers to the senders: {dict(stream.answers)}\nfirst 5xx: {stream.errors[:5]}"
        )
        incomplete = missing_counts(stream, scene.endpoint.at(scene.name))
        sections.append(f"responses still missing, per conversation: {incomplete}")
        sections.append(await _store_view(scene, sorted(incomplete)))
    sections.append(await _queues_view(scene))
    sections.append(await asyncio.to_thread(_consumers_view, scene))
    if scene.services is not None:
        sections.append(await _metrics_view(scene.services))
        sections.append(scene.services.events())
        sections.append(scene.services.tails(25))
    sections.append(f"=== private broker log\n{scene.broker.log_tail(15)}")
    sections.append(f"=== private PostgreSQL log\n{scene.postgres.log_tail(15)}")
    return "\n\n".join(sections)


async def _store_view(scene: Scene, conversations: list[str]) -> str:
    """Per incomplete conversation: its partition, inbound messages not handled, and the
    responses not delivered with their attempts."""
    if not conversations:
        return "store: nothing incomplete"
    try:
        rows = await _store_rows(scene, conversations[:10])
    except Exception as error:
        return f"store: could not look ({type(error).__name__}: {error})"
    lines = ["store view of the incomplete conversations (first 10):"]
    by_conversation: dict[str, list[asyncpg.Record]] = {}
    for row in rows:
        by_conversation.setdefault(row["conversation"], []).append(row)
    for conversation, found in by_conversation.items():
        lines.append(_conversation_line(conversation, found))
    stuck = [_stuck_head(found) for found in list(by_conversation.values())[:3]]
    lines.append(_log_mentions(scene, [head for head in stuck if head]))
    return "\n".join(lines)


def _stuck_head(rows: list[asyncpg.Record]) -> str | None:
    """The id the logs know the conversation's first unfinished message by: an inbound
    message not handled, else the first response without a 2xx (its delivery id)."""
    for row in rows:
        if row["direction"] == "incoming" and row["handled_at"] is None:
            return str(row["id"])
    for row in rows:
        if row["direction"] == "outgoing" and not 200 <= (row["last_status"] or 0) < 300:
            return f"msg_{row['id']}"
    return None


def _log_mentions(scene: Scene, ids: list[str], limit: int = 12) -> str:
    """Every service's log lines that name these messages: what became of each head."""
    if scene.services is None or not ids:
        return ""
    lines = []
    for message_id in ids:
        lines.append(f"log lines naming {message_id} (the first unfinished of its conversation):")
        found = [
            f"    [{service.name}] {line[:500]}"
            for service in scene.services.services
            for line in service.lines()
            if message_id in line
        ]
        lines += found[:limit] or ["    (none at this log level)"]
    return "\n".join(lines)


async def _store_rows(scene: Scene, conversations: list[str]) -> list[asyncpg.Record]:
    connection = await asyncpg.connect(
        scene.postgres.url, server_settings={"search_path": scene.schema}, timeout=10
    )
    try:
        return await connection.fetch(
            """
            SELECT c.external_id AS conversation, c.id AS relay_conversation, m.id, m.direction,
                   m.state, m.sequence, m.external_id, m.handled_at, m.retry_at, m.dead_at,
                   (SELECT count(*) FROM delivery_attempts a WHERE a.message_id = m.id)
                       AS attempts,
                   (SELECT a.status FROM delivery_attempts a WHERE a.message_id = m.id
                    ORDER BY a.created_at DESC LIMIT 1) AS last_status
            FROM messages m JOIN conversations c ON c.id = m.conversation_id
            WHERE c.external_id = ANY($1::text[])
            ORDER BY c.external_id, m.created_at
            """,
            conversations,
            timeout=30,
        )
    finally:
        await connection.close()


def _conversation_line(conversation: str, rows: list[asyncpg.Record]) -> str:
    partition = partition_of(rows[0]["relay_conversation"], PARTITIONS)
    incoming = [r for r in rows if r["direction"] == "incoming"]
    unhandled = [r for r in incoming if r["handled_at"] is None]
    outgoing = [r for r in rows if r["direction"] == "outgoing"]
    undelivered = [r for r in outgoing if not 200 <= (r["last_status"] or 0) < 300]
    states = Counter(r["state"] for r in outgoing)
    first = unhandled[0] if unhandled else None
    return (
        f"  {conversation} (partition {partition}): {len(incoming)} inbound, "
        f"{len(unhandled)} not handled"
        + (
            f" (first {first['external_id']}: {first['state']}, retry_at {first['retry_at']}, "
            f"dead_at {first['dead_at']})"
            if first
            else ""
        )
        + f"; {len(outgoing)} responses stored {dict(states)}, {len(undelivered)} without a 2xx"
        + (
            f": sequences {spans([r['sequence'] for r in undelivered])}, "
            f"attempts {[r['attempts'] for r in undelivered[:5]]}, "
            f"last statuses {[r['last_status'] for r in undelivered[:5]]}"
            if undelivered
            else ""
        )
    )


async def _queues_view(scene: Scene) -> str:
    """Ready messages and consumers of every queue of the scenario (passive declares)."""
    try:
        connection = await aio_pika.connect(scene.broker.url, timeout=10)
    except Exception as error:
        return f"queues: broker unreachable ({type(error).__name__}: {error})"
    lines = ["queues (ready, consumers):"]
    async with connection:
        for name, _, _ in topology_of(scene.settings(via_proxy=False)).queues():
            try:
                channel = await connection.channel()
                queue = await channel.declare_queue(name, passive=True)
                result = queue.declaration_result
                lines.append(f"  {name}: {result.message_count}, {result.consumer_count}")
                await channel.close()
            except Exception as error:
                lines.append(f"  {name}: {type(error).__name__}")
    return "\n".join(lines)


def _consumers_view(scene: Scene) -> str:
    """Who consumes each partition queue (the broker's view): the active consumer's
    channel, its unacked messages and prefetch, and the service whose connection it is."""
    broker = scene.broker
    queues = broker.listing("queues", "name", "messages_ready", "messages_unacknowledged")
    consumers = broker.listing("consumers", "queue_name", "channel_pid", "active")
    channels = {
        row["pid"]: row
        for row in broker.listing(
            "channels", "pid", "connection", "messages_unacknowledged", "prefetch_count"
        )
    }
    ports = {
        row["pid"]: row["peer_port"] for row in broker.listing("connections", "pid", "peer_port")
    }
    owners = _port_owners(scene)
    lines = ["partition queues as the broker sees them (stats refresh every 5 s):"]
    for queue in queues:
        if not queue["name"].startswith(scene.prefix) or ".delay." in queue["name"]:
            continue
        held = []
        for consumer in (c for c in consumers if c["queue_name"] == queue["name"]):
            channel = channels.get(consumer["channel_pid"], {})
            port = ports.get(channel.get("connection"))
            held.append(
                f"{'active' if consumer['active'] else 'waiting'} on "
                f"{owners.get(port, f'port {port}')} (channel unacked "
                f"{channel.get('messages_unacknowledged')}/{channel.get('prefetch_count')})"
            )
        lines.append(
            f"  {queue['name']}: ready {queue['messages_ready']}, unacked "
            f"{queue['messages_unacknowledged']}; " + ("; ".join(held) or "no consumer")
        )
    return "\n".join(lines)


def _port_owners(scene: Scene) -> dict[int | None, str]:
    """Port of each connection the broker sees -> the service that owns it (by its pid;
    through the partition proxy by the proxy's routes)."""
    names = {s.process.pid: s.name for s in scene.services.services} if scene.services else {}
    direct = _local_ports(scene.broker.port)
    behind_proxy = _local_ports(scene.proxy.port)
    owners: dict[int | None, str] = {}
    for port, pid in direct.items():
        client = scene.proxy.routes.get(port)
        if client is not None and client in behind_proxy:
            pid = behind_proxy[client]
        owners[port] = names.get(pid, f"pid {pid}")
    return owners


def _local_ports(port: int) -> dict[int, int]:
    """Established connections to 127.0.0.1:<port>: their local port -> the owner's pid."""
    try:
        listed = subprocess.run(
            ["ss", "-tnpH", "state", "established", f"( dport = :{port} )"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return {}
    found = (
        re.search(r":(\d+)\s+\S+:\d+\s+users:\(\(\"[^\"]*\",pid=(\d+)", line)
        for line in listed.splitlines()
    )
    return {int(match.group(1)): int(match.group(2)) for match in found if match}


async def _metrics_view(services: Fleet) -> str:
    lines = ["metrics of the running services:"]
    for service in services.services:
        if not service.running:
            lines.append(f"  {service.name}: exited {service.process.returncode}")
            continue
        try:
            samples: Samples = await asyncio.wait_for(services.metrics(service), 10)
        except Exception as error:
            lines.append(f"  {service.name}: no metrics ({type(error).__name__})")
            continue
        shown = {
            f"{name}{dict(labels)}": value
            for (name, labels), value in samples.items()
            if name in METRICS_SHOWN and value
        }
        lines.append(f"  {service.name}: {shown}")
    return "\n".join(lines)
