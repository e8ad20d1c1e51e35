"""End-to-end throughput and latency of Relay on one machine, against the broker's ceiling.

For each store (SQLite, PostgreSQL), bot and run mode, on a fresh database and queue
prefix: starts the real `relay ingress`, `relay bot-worker` and `relay delivery-worker` as
separate processes (mode `services`) or `relay run` as one (mode `run`), and a webhook
receiver; posts N messages over M conversations from a concurrent keep-alive client
(closed loop, full load), then N/10 (at least 1,000) at half the delivered rate (open
loop); matches every echoed text at the receiver to its POST. Bots: `one-reply`
(`bench.bots:one_reply`, one response per message: the raw chain's shape) and `echo` (a
typing indicator, then the text: two responses).

Then, on the same broker, the raw two-hop chain (`bench.raw`): aio-pika publish with
confirms -> a hop process that consumes, publishes on with a confirm and acks -> a sink
process that consumes and acks, with as many messages of the inbound envelope's size over
the same partitions. That is the least a relay keeping at-least-once can make the broker
do per user message; `e2e/raw` is Relay's delivered rate over it.

Then the second yardstick, the Celery relay a user writes in an afternoon
(`bench.celery_relay`): an aiohttp ingress publishing a Celery task with a confirm on a
quorum queue, a Celery prefork worker (8 processes, late acks) running the same one-reply
bot and POSTing each reply with `requests`; one hop, no store, no dedupe, no order within a
conversation. It goes through the same warm-up, full-load and half-load phases with the same
messages, conversations, client and receiver; `e2e/celery` is Relay's delivered rate over
its. `--no-celery` leaves it out.

Reported per case: accepted and delivered msgs/s, POST->webhook latency percentiles at full
and half load, errors, missing and duplicate deliveries, peak RSS and CPU milliseconds per
user message of every process (each service, the receiver, RabbitMQ, PostgreSQL), and on
PostgreSQL the commits, rows inserted, updated and read per user message.

    python -m bench.e2e [--messages 5000] [--conversations 50] [--concurrency 32]
                        [--half-messages N] [--stores sqlite,postgresql]
                        [--bots one-reply,echo] [--modes services,run] [--json]
                        [--no-celery] [--set RELAY_NAME=value ...]

`--set` passes a setting to the three services (e.g. RELAY_ENDPOINT_CONCURRENCY=64).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import aio_pika
import aiohttp
import asyncpg
from aio_pika.abc import AbstractIncomingMessage

from bench.common import (
    AMQP_URL,
    SERVICES_AMQP_URL,
    STORES,
    Service,
    children_of,
    create_integration,
    database,
    free_port,
    percentiles,
    process_cpu_seconds,
    process_status,
    remove_celery_topology,
    remove_topology,
    service,
    service_env,
    spawn,
    stop_process,
)
from bench.profile import Profiles, print_summaries
from bench.raw import RawResult, raw_ceiling
from relay.broker import topology_of
from relay.broker.topology import Topology
from relay.commands.output import table
from relay.settings import Settings
from relay.store import open_store

RAW_BODY_BYTES = 1200  # the raw chain's body when no inbound envelope was sampled
TRICKLE_MESSAGES = 50  # the no-load phase: one message at a time
TRICKLE_PAUSE_SECONDS = 0.02  # between one message's arrival and the next POST
TRICKLE_WAIT_SECONDS = 10.0  # for one message to arrive before the next is sent anyway
PROFILED_MESSAGES = 2000  # --profile: the profiled phase's messages (at most --messages)
WARM_UP = 200  # messages through the whole pipeline before measuring (connections, caches)
BOTS = {"one-reply": "bench.bots:one_reply", "echo": "echo"}
MODES = ("services", "run")
# PostgreSQL backends report their counters at most once a second when idle.
PG_STATS_LAG = 1.2
STALL_SECONDS = 60.0  # give up waiting for deliveries after this long without any
SETTLE_SECONDS = 2.0  # after the last phase, how long late duplicates may take to show
CELERY_CONCURRENCY = 8  # the Celery yardstick's prefork processes
CELERY_PREFETCH = 4  # its worker_prefetch_multiplier (Celery's default)
CELERY_READY_SECONDS = 60.0  # for its worker to consume with every process forked
ROOT = Path(__file__).resolve().parent.parent
METRICS = (
    "relay_messages_consumed_total",
    "relay_delivery_attempts_total",
    "relay_bot_failures_total",
    "relay_inbound_messages_total",
    "relay_messages_published_total",
)


# ---------------------------------------------------------------------------- results


@dataclass
class Phase:
    """One load phase's figures; times in seconds, latencies in milliseconds."""

    messages: int
    accepted: int
    errors: dict[str, int]
    accept_seconds: float
    accepted_per_second: float
    delivered: int
    missing: int
    deliver_seconds: float
    delivered_per_second: float
    latency_p50_ms: float
    latency_p95_ms: float
    latency_p99_ms: float
    latency_max_ms: float
    post_p50_ms: float
    post_p99_ms: float
    # Replies that arrived before the reply to an earlier message of their conversation, one
    # whose POST was answered before theirs was sent: an order any relay could keep.
    reordered: int = 0
    # Open loop only: the rate asked for, the rate sent, the pacer's worst lateness.
    target_per_second: float | None = None
    sent_per_second: float | None = None
    pacing_lag_max_ms: float | None = None


@dataclass
class Resources:
    """A process's peak memory and its CPU during the full-load phase."""

    peak_rss_mb: float | None
    cpu_seconds_full_load: float
    cpu_percent_full_load: float  # of one core
    cpu_ms_per_message: float  # CPU of the full-load phase / its messages
    cpu_ms_per_message_half_load: float  # the same at half load (no backlog anywhere)


@dataclass
class StoreResult:
    """Everything measured for one case: a store, a bot, a run mode."""

    store: str
    bot: str
    mode: str
    full: Phase
    half: Phase
    trickle: Phase  # one message at a time: the latency without load
    duplicates: int
    out_of_order: int  # responses with a sequence not above the conversation's last
    out_of_order_examples: list[dict[str, Any]]
    typing_delivered: int  # the whole run, warm-up included
    inbound_envelope_bytes: int
    resources: dict[str, Resources]
    machine_cpu_percent_full_load: float  # of all cores
    other_cpu_percent_full_load: float  # of one core: busy, but none of the processes above
    machine_iowait_percent_full_load: float  # of all cores: idle waiting for the disk
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    # PostgreSQL only, per user message of the full-load phase: commits, rows in, up, read.
    database: dict[str, float] = field(default_factory=dict)
    ratio: float = 0.0  # delivered msgs/s / the raw two-hop chain's msgs/s
    celery_ratio: float | None = None  # delivered msgs/s / the Celery relay's (if it ran)
    # --profile: each process's CPU by layer (%) and busiest frames in a profiled phase.
    profile: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def case(self) -> str:
        """How the case is named in the tables."""
        return f"{self.store} {self.mode} {self.bot}"

    # Whether a reply out of its conversation's order fails the case (Relay's promise).
    keeps_order: ClassVar[bool] = True

    @property
    def failed(self) -> bool:
        """Anything lost, refused, repeated or (where order is kept) reordered."""
        phases = (self.full, self.half, self.trickle)
        reordered = self.out_of_order and self.keeps_order
        return any(p.errors or p.missing for p in phases) or bool(self.duplicates or reordered)


@dataclass
class CeleryResult(StoreResult):
    """The Celery yardstick's figures (store `none`, mode `celery`). It numbers nothing, so
    `out_of_order` is both phases' `reordered`: a figure, not a failure (it keeps no order)."""

    keeps_order: ClassVar[bool] = False
    queue: str = ""
    concurrency: int = CELERY_CONCURRENCY
    prefetch_multiplier: int = CELERY_PREFETCH

    @property
    def case(self) -> str:
        """How the case is named in the tables."""
        return f"celery prefork {self.bot}"


# ---------------------------------------------------------------------------- client


@dataclass
class Post:
    """One POST: its message's id, when it was sent and answered, and the status (0: error)."""

    uid: str
    sent: float
    answered: float
    status: int


def messages(
    tag: str, count: int, conversations: int, prefix: str = "c"
) -> list[tuple[str, bytes]]:
    """(uid, body) of `count` messages over `conversations`; the text is the uid itself."""
    out = []
    for n in range(count):
        uid = f"{tag}-{n}"
        body = {
            "userId": f"u{n % conversations}",
            "messageId": uid,
            "conversationId": f"{prefix}{n % conversations}",
            "type": "text",
            "text": uid,
        }
        out.append((uid, json.dumps(body).encode()))
    return out


class Client:
    """The back end: a keep-alive session with at most `concurrency` connections."""

    def __init__(self, url: str, token: str, concurrency: int) -> None:
        self.url = url
        self.concurrency = concurrency
        self._http = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=concurrency),
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        )

    async def close(self) -> None:
        """Close the connections."""
        await self._http.close()

    async def post(self, uid: str, body: bytes) -> Post:
        """POST one message; a connection error is status 0."""
        sent = time.monotonic()
        try:
            async with self._http.post(self.url, data=body) as response:
                await response.read()
                status = response.status
        except (aiohttp.ClientError, OSError):
            status = 0
        return Post(uid, sent, time.monotonic(), status)

    async def closed_loop(self, batch: Sequence[tuple[str, bytes]]) -> list[Post]:
        """Full load: `concurrency` senders, each posting its next message once answered."""
        pending = iter(batch)
        posts: list[Post] = []

        async def sender() -> None:
            for uid, body in pending:
                posts.append(await self.post(uid, body))

        await asyncio.gather(*[sender() for _ in range(self.concurrency)])
        return posts

    async def open_loop(
        self, batch: Sequence[tuple[str, bytes]], rate: float
    ) -> tuple[list[Post], float, float]:
        """A fixed rate, whatever the answers: the posts, the rate sent, the worst lag (s)."""
        tasks = []
        lag = 0.0
        started = time.monotonic() + 0.05
        for i, (uid, body) in enumerate(batch):
            due = started + i / rate
            if (wait := due - time.monotonic()) > 0:
                await asyncio.sleep(wait)
            lag = max(lag, time.monotonic() - due)
            tasks.append(asyncio.create_task(self.post(uid, body)))
        sent_rate = len(batch) / max(time.monotonic() - started, 1e-9)
        return list(await asyncio.gather(*tasks)), sent_rate, lag


# ---------------------------------------------------------------------------- receiver


class Inbox:
    """What the receiver got, fetched incrementally, with the checks on it."""

    def __init__(self, base: str, ordered: bool = True) -> None:
        self._base = base
        self._ordered = ordered  # whether the replies carry a sequence to check
        self._http = aiohttp.ClientSession()
        self.rows = 0
        self.texts: dict[str, float] = {}  # uid -> first arrival of its echoed text
        self.conversation_of: dict[str, str] = {}  # uid -> its reply's conversationId
        self.typing = 0
        self.webhook_ids: Counter[str] = Counter()
        self.out_of_order = 0
        self.disorder: list[dict[str, Any]] = []  # the first few responses out of order
        self._sequence: dict[str, int] = {}

    async def close(self) -> None:
        """Close the control connection."""
        await self._http.close()

    @property
    def duplicates(self) -> int:
        """Webhooks that arrived again under a webhook-id already seen."""
        return sum(n - 1 for n in self.webhook_ids.values() if n > 1)

    async def fetch(self) -> int:
        """Take the webhooks that arrived since the last fetch; how many."""
        async with self._http.get(f"{self._base}/_records", params={"since": self.rows}) as got:
            got.raise_for_status()
            rows = await got.json()
        for row in rows:
            self._take(*row)
        self.rows += len(rows)
        return len(rows)

    def _take(
        self, arrived: float, webhook_id: str, kind: str, text: str, conv: str, seq: int
    ) -> None:
        self.webhook_ids[webhook_id] += 1
        if self.webhook_ids[webhook_id] > 1:
            return
        if self._ordered:
            self._check_sequence(conv, seq)
        if kind == "typing":
            self.typing += 1
        elif kind == "text" and text.startswith("echo: "):
            uid = text.removeprefix("echo: ")
            self.texts.setdefault(uid, arrived)
            self.conversation_of.setdefault(uid, conv)

    def _check_sequence(self, conv: str, seq: int) -> None:
        if seq <= self._sequence.get(conv, -1):
            self.out_of_order += 1
            if len(self.disorder) < 10:
                self.disorder.append(
                    {"conversationId": conv, "after": self._sequence[conv], "sequence": seq}
                )
        self._sequence[conv] = max(seq, self._sequence.get(conv, -1))

    async def wait_for(self, uids: Iterable[str]) -> None:
        """Until every uid's text arrived, or nothing arrived for STALL_SECONDS."""
        waiting = set(uids)
        quiet_since = time.monotonic()
        while waiting:
            if await self.fetch():
                quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since > STALL_SECONDS:
                return
            waiting = {uid for uid in waiting if uid not in self.texts}
            await asyncio.sleep(0.2)


# ---------------------------------------------------------------------------- phases


def phase_figures(posts: Sequence[Post], inbox: Inbox) -> Phase:
    """Throughput and latencies of one phase, from its posts and what arrived."""
    first = min(p.sent for p in posts)
    accepted = [p for p in posts if p.status == 200]
    errors = Counter(str(p.status or "connection") for p in posts if p.status != 200)
    arrivals = {p.uid: inbox.texts[p.uid] for p in accepted if p.uid in inbox.texts}
    accept_seconds = max((p.answered for p in accepted), default=first) - first
    deliver_seconds = max(arrivals.values(), default=first) - first
    latencies = [arrivals[p.uid] - p.sent for p in accepted if p.uid in arrivals]
    p50, p95, p99 = percentiles(latencies)
    post_p50, post_p99 = percentiles([p.answered - p.sent for p in posts], (50, 99))
    return Phase(
        messages=len(posts),
        accepted=len(accepted),
        errors=dict(errors),
        accept_seconds=round(accept_seconds, 2),
        accepted_per_second=_rate(len(accepted), accept_seconds),
        delivered=len(arrivals),
        missing=len(accepted) - len(arrivals),
        deliver_seconds=round(deliver_seconds, 2),
        delivered_per_second=_rate(len(arrivals), deliver_seconds),
        latency_p50_ms=p50,
        latency_p95_ms=p95,
        latency_p99_ms=p99,
        latency_max_ms=round(max(latencies, default=0) * 1000, 1),
        post_p50_ms=post_p50,
        post_p99_ms=post_p99,
        reordered=reordered(accepted, inbox),
    )


def reordered(accepted: Sequence[Post], inbox: Inbox) -> int:
    """Replies that overtook the reply to an earlier message of their conversation, one whose
    POST was answered before theirs was sent (messages in flight together have no order)."""
    by_conversation: dict[str, list[Post]] = {}
    for post in accepted:
        if post.uid in inbox.texts:
            by_conversation.setdefault(inbox.conversation_of[post.uid], []).append(post)
    count = 0
    for posts in by_conversation.values():
        answered = sorted(posts, key=lambda p: p.answered)
        latest, earlier = float("-inf"), 0  # the latest arrival of the replies answered before
        for post in sorted(posts, key=lambda p: p.sent):
            while earlier < len(answered) and answered[earlier].answered < post.sent:
                latest = max(latest, inbox.texts[answered[earlier].uid])
                earlier += 1
            if inbox.texts[post.uid] < latest:
                count += 1
    return count


def _rate(count: int, seconds: float) -> float:
    return round(count / seconds, 1) if seconds > 0 else 0.0


async def full_load(client: Client, inbox: Inbox, batch: Sequence[tuple[str, bytes]]) -> Phase:
    """Closed loop at the client's concurrency, then wait for every delivery."""
    posts = await client.closed_loop(batch)
    await inbox.wait_for(p.uid for p in posts if p.status == 200)
    return phase_figures(posts, inbox)


async def half_load(
    client: Client, inbox: Inbox, batch: Sequence[tuple[str, bytes]], rate: float
) -> Phase:
    """Open loop at `rate` msgs/s, then wait for every delivery."""
    posts, sent_rate, lag = await client.open_loop(batch, rate)
    await inbox.wait_for(p.uid for p in posts if p.status == 200)
    figures = phase_figures(posts, inbox)
    figures.target_per_second = round(rate, 1)
    figures.sent_per_second = round(sent_rate, 1)
    figures.pacing_lag_max_ms = round(lag * 1000, 1)
    return figures


async def one_at_a_time(client: Client, inbox: Inbox, batch: Sequence[tuple[str, bytes]]) -> Phase:
    """No load: each message posted once the one before it arrived (and a pause), so its
    latency is the pipeline's own, without any queue in front of it."""
    posts = []
    for uid, body in batch:
        post = await client.post(uid, body)
        posts.append(post)
        deadline = time.monotonic() + TRICKLE_WAIT_SECONDS
        while post.status == 200 and uid not in inbox.texts and time.monotonic() < deadline:
            if not await inbox.fetch():
                await asyncio.sleep(0.002)
        await asyncio.sleep(TRICKLE_PAUSE_SECONDS)
    return phase_figures(posts, inbox)


# ---------------------------------------------------------------------------- CPU and memory


def pids_named(name: str) -> list[int]:
    """Processes whose command name is `name` (the broker's beam.smp, postgres)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if (entry / "comm").read_text().strip() == name:
                    found.append(int(entry.name))
    return found


def process_groups(services: Sequence[Service]) -> dict[str, list[int]]:
    """Each service's process, and each process it started (`relay run`'s workers) as a
    group of its own, named after the role it runs."""
    groups = {running.name: [running.pid] for running in services}
    for running in services:
        for child in children_of(running.pid):
            with contextlib.suppress(OSError):
                args = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
                role = next((a.decode() for a in args if a.endswith(b"-worker")), str(child))
                groups[f"{running.name}:{role}"] = [child]
    return groups


def cpu_of(groups: Mapping[str, Sequence[int]]) -> dict[str, dict[int, float]]:
    """CPU seconds used so far by each process of each group (gone processes left out)."""
    totals: dict[str, dict[int, float]] = {}
    for name, pids in groups.items():
        totals[name] = {}
        for pid in pids:
            with contextlib.suppress(OSError):
                totals[name][pid] = process_cpu_seconds(pid)
    return totals


def machine_busy() -> tuple[float, float, float]:
    """(busy, iowait, total) jiffies of all cores since boot."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle, iowait = values[3], values[4]
    return sum(values) - idle - iowait, iowait, sum(values)


class CpuMeter:
    """CPU of each process group between `start` and `stop`."""

    def __init__(self, groups: Mapping[str, Sequence[int]], receiver: Service) -> None:
        self._groups: dict[str, list[int]] = {name: list(pids) for name, pids in groups.items()}
        self._groups["receiver"] = [receiver.pid]
        self._groups["client"] = [os.getpid()]
        self._before: dict[str, dict[int, float]] = {}
        self._machine = (0.0, 0.0, 0.0)
        self._started = 0.0
        self.result: dict[str, tuple[float, float]] = {}  # group -> (seconds, % of a core)
        self.machine_percent = 0.0
        self.other_percent = 0.0
        self.iowait_percent = 0.0

    def _refresh_shared(self) -> None:
        # Postgres forks a backend per connection: take whatever runs now.
        self._groups["rabbitmq"] = pids_named("beam.smp")
        self._groups["postgres"] = pids_named("postgres")

    def start(self) -> None:
        """Take the first reading."""
        self._refresh_shared()
        self._before = cpu_of(self._groups)
        self._machine = machine_busy()
        self._started = time.monotonic()

    def stop(self) -> None:
        """Take the second reading and compute the shares."""
        wall = time.monotonic() - self._started
        after = cpu_of(self._groups)
        for name, seconds in after.items():
            # Only what ran throughout: a process gone by now (a PostgreSQL backend of another
            # client) would take its whole past off the group's figure.
            before = self._before.get(name, {})
            used = sum(cpu - before[pid] for pid, cpu in seconds.items() if pid in before)
            self.result[name] = (round(used, 2), round(100 * used / wall, 1))
        busy, iowait, total = machine_busy()
        elapsed = max(total - self._machine[2], 1)
        self.machine_percent = round(100 * (busy - self._machine[0]) / elapsed, 1)
        self.iowait_percent = round(100 * (iowait - self._machine[1]) / elapsed, 1)
        # Busy CPU no process of ours used: the kernel, other jobs on a shared machine.
        ours = sum(seconds for seconds, _ in self.result.values())
        other = (busy - self._machine[0]) / os.sysconf("SC_CLK_TCK") - ours
        self.other_percent = round(100 * max(other, 0.0) / wall, 1)


async def scrape(services: Sequence[Service]) -> dict[str, dict[str, float]]:
    """The counters of interest from each service's /metrics, non-zero ones only."""
    found: dict[str, dict[str, float]] = {}
    async with aiohttp.ClientSession() as http:
        for svc in services:
            async with http.get(f"{svc.base_url}/metrics") as response:
                text = await response.text()
            lines = [line.rsplit(" ", 1) for line in text.splitlines() if line.startswith(METRICS)]
            found[svc.name] = {name: float(v) for name, v in lines if float(v)}
    return found


# ---------------------------------------------------------------------------- one store


@dataclass
class Options:
    """The command line."""

    messages: int
    conversations: int
    concurrency: int
    half_messages: int
    stores: list[str]
    bots: list[str]
    modes: list[str]
    json: bool
    settings: dict[str, str]  # RELAY_* values for the services
    celery: bool = True  # the Celery yardstick after the raw chain
    profile: Path | None = None  # where --profile keeps each process's folded stacks


def run_settings(database_url: str, bot: str, options: Options) -> Settings:
    """The services' settings: bench defaults, then --set values, then what must be fresh."""
    chosen: dict[str, Any] = {
        "bot": BOTS[bot],
        "log_level": "warning",
        "rate_limit_per_second": 0,  # 0 disables the per-integration rate limit
        "allowed_endpoint_networks": "127.0.0.0/8",  # the receiver is on loopback
    }
    chosen.update({k.removeprefix("RELAY_").lower(): v for k, v in options.settings.items()})
    chosen.update(
        amqp_url=SERVICES_AMQP_URL,
        database_url=database_url,
        queue_prefix="bench-" + uuid.uuid4().hex[:8],
        http_port=free_port(),
        bot_worker_port=free_port(),
        delivery_worker_port=free_port(),
    )
    return Settings(_env_file=None, **chosen)


def extra_env(settings: Settings, options: Options) -> dict[str, str]:
    """Variables the services get besides those `service_env` writes from the settings."""
    networks = ",".join(str(n) for n in settings.allowed_endpoint_networks)
    return {
        **options.settings,
        "RELAY_BOT": settings.bot,
        # The services run in an empty folder: the bench's bots must stay importable.
        "PYTHONPATH": str(Path(__file__).resolve().parent.parent),
        "RELAY_ALLOWED_ENDPOINT_NETWORKS": networks,
    }


@contextlib.asynccontextmanager
async def receiver_process() -> AsyncIterator[Service]:
    """The webhook receiver in its own process.

    Not in the client's event loop: the client's sending and the receiver's timestamps
    would delay each other on one loop (one core), inflating both the latency and the
    send times; as separate processes they are, like a real back end's sender and webhook
    endpoint, scheduled independently.
    """
    port = free_port()
    argv = [sys.executable, "-m", "bench.receiver", f"--port={port}"]
    async with spawn("receiver", argv, port, ready="/_count") as receiver:
        yield receiver


async def sample_envelope(topology: Topology, client: Client) -> bytes:
    """Post one message while no bot worker runs and take its envelope off the queue."""
    probe = messages("probe-" + uuid.uuid4().hex[:6], 1, 1, prefix="probe")[0]
    answer = await client.post(*probe)
    if answer.status != 200:
        raise RuntimeError(f"the ingress answered the probe with {answer.status}")
    connection = await aio_pika.connect(AMQP_URL)
    async with connection, connection.channel() as channel:
        # A quorum queue with a single active consumer refuses basic.get: consume instead
        # (we are the only consumer) and close the channel after the first message.
        got: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

        async def take(message: AbstractIncomingMessage) -> None:
            if not got.done():
                got.set_result(message.body)

        for partition in range(topology.partitions):
            queue = await channel.get_queue(topology.queue("inbound", partition))
            await queue.consume(take, no_ack=True)
        async with asyncio.timeout(10):
            return await got


@dataclass
class Case:
    """One configuration to measure."""

    store: str
    bot: str
    mode: str


async def run_case(case: Case, options: Options) -> tuple[StoreResult, Settings, bytes | None]:
    """Start everything on a fresh store, run both phases, stop and clean up.

    Also the settings used and, in `services` mode, an inbound envelope as the ingress wrote
    it (the raw chain's message body)."""
    async with contextlib.AsyncExitStack() as stack:
        url = await stack.enter_async_context(database(case.store))
        folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="relay-bench-"))
        receiver = await stack.enter_async_context(receiver_process())
        settings = run_settings(url, case.bot, options)
        store = await open_store(url)
        try:
            integration_id, token = await create_integration(
                store, settings, f"{receiver.base_url}/hook"
            )
        finally:
            await store.close()
        topology = topology_of(settings)
        stack.push_async_callback(remove_topology, topology)  # after the services stopped
        env = service_env(settings, extra_env(settings, options))

        async def start(name: str, port: int) -> Service:
            # cwd: a folder without a .env file, so only the variables above count.
            running = service(name, [name], env, port, cwd=folder)
            return await stack.enter_async_context(running)

        client = Client(
            f"http://127.0.0.1:{settings.http_port}/webhooks/{integration_id}",
            token,
            options.concurrency,
        )
        stack.push_async_callback(client.close)
        envelope: bytes | None = None
        if case.mode == "run":
            services = [await start("run", settings.http_port)]
        else:
            ingress = await start("ingress", settings.http_port)
            envelope = await sample_envelope(topology, client)
            services = [
                ingress,
                await start("bot-worker", settings.bot_worker_port),
                await start("delivery-worker", settings.delivery_worker_port),
            ]
        for running in services:
            running.check_pid()
        inbox = Inbox(receiver.base_url)
        stack.push_async_callback(inbox.close)
        counters = PostgresCounters(url) if case.store == "postgresql" else None
        label = "-".join((case.store, case.mode, case.bot))
        measured = await measure(services, receiver, client, inbox, options, counters, label)
    result = StoreResult(
        store=case.store,
        bot=case.bot,
        mode=case.mode,
        inbound_envelope_bytes=len(envelope or b""),
        **measured,
    )
    return result, settings, envelope


class PostgresCounters:
    """The database's own counters (pg_stat_database), read before and after a phase."""

    FIELDS = ("xact_commit", "tup_inserted", "tup_updated", "tup_fetched")
    NAMES = ("commits", "inserted", "updated", "read")

    def __init__(self, url: str) -> None:
        self._url = url.split("?", 1)[0]
        self._before: dict[str, int] = {}

    async def _read(self) -> dict[str, int]:
        await asyncio.sleep(PG_STATS_LAG)  # until every backend has reported
        connection = await asyncpg.connect(self._url)
        try:
            row = await connection.fetchrow(
                f"SELECT {', '.join(self.FIELDS)} FROM pg_stat_database"
                " WHERE datname = current_database()"
            )
        finally:
            await connection.close()
        assert row is not None
        return {name: int(row[f]) for name, f in zip(self.NAMES, self.FIELDS, strict=True)}

    async def start(self) -> None:
        """Take the first reading."""
        self._before = await self._read()

    async def per_message(self, messages: int) -> dict[str, float]:
        """What the database did since `start`, per user message."""
        after = await self._read()
        return {k: round((after[k] - self._before[k]) / messages, 2) for k in self.NAMES}


async def measure(
    services: Sequence[Service],
    receiver: Service,
    client: Client,
    inbox: Inbox,
    options: Options,
    counters: PostgresCounters | None,
    label: str,
) -> dict[str, Any]:
    """Warm up, full load, half load; the figures, memory, CPU and the services' counters."""
    groups = process_groups(services)
    measured = await run_phases(groups, receiver, client, inbox, options, counters, label)
    return measured | {"metrics": await scrape(services)}


async def profiled_phase(
    groups: Mapping[str, Sequence[int]], client: Client, inbox: Inbox, options: Options, label: str
) -> dict[str, dict[str, Any]]:
    """--profile: one more full-load phase with py-spy on each process (after the measured
    ones, which it would slow); each process's CPU by layer and its busiest frames."""
    if options.profile is None:
        return {}
    profiles = Profiles(options.profile, label)
    await profiles.start(groups)
    count = min(options.messages, PROFILED_MESSAGES)
    try:
        await full_load(client, inbox, messages(f"{label}-prof", count, options.conversations))
    finally:
        found = await profiles.stop()
    return found


async def run_phases(
    groups: Mapping[str, Sequence[int]],
    receiver: Service,
    client: Client,
    inbox: Inbox,
    options: Options,
    counters: PostgresCounters | None,
    label: str,
    profiled: bool = True,
) -> dict[str, Any]:
    """Warm up, full load, half load, one at a time, then --profile's phase (if
    `profiled`); the figures, and the memory and CPU of each group of processes (the
    relay's: Relay's services, or the Celery yardstick's), the receiver, the client and
    the shared servers."""
    tag = uuid.uuid4().hex[:6]
    warm = messages(f"{tag}-warm", WARM_UP, min(options.conversations, WARM_UP), prefix="w")
    await full_load(client, inbox, warm)
    if counters is not None:
        await counters.start()
    meter = CpuMeter(groups, receiver)
    meter.start()
    full = await full_load(
        client, inbox, messages(f"{tag}-full", options.messages, options.conversations)
    )
    meter.stop()
    database_figures = await counters.per_message(options.messages) if counters else {}
    batch = messages(f"{tag}-half", options.half_messages, options.conversations)
    half_meter = CpuMeter(groups, receiver)
    half_meter.start()
    half = await half_load(client, inbox, batch, max(full.delivered_per_second / 2, 1.0))
    half_meter.stop()
    trickle = await one_at_a_time(
        client, inbox, messages(f"{tag}-one", TRICKLE_MESSAGES, options.conversations)
    )
    profile = await profiled_phase(groups, client, inbox, options, label) if profiled else {}
    await asyncio.sleep(SETTLE_SECONDS)
    await inbox.fetch()
    resources = {
        name: Resources(
            peak_rss_mb=_peak_rss(groups[name]) if name in groups else None,
            cpu_seconds_full_load=seconds,
            cpu_percent_full_load=percent,
            cpu_ms_per_message=round(seconds * 1000 / options.messages, 2),
            cpu_ms_per_message_half_load=round(
                half_meter.result[name][0] * 1000 / options.half_messages, 2
            ),
        )
        for name, (seconds, percent) in meter.result.items()
    }
    return {
        "full": full,
        "half": half,
        "trickle": trickle,
        "duplicates": inbox.duplicates,
        "out_of_order": inbox.out_of_order,
        "out_of_order_examples": inbox.disorder,
        "typing_delivered": inbox.typing,
        "resources": resources,
        "machine_cpu_percent_full_load": meter.machine_percent,
        "other_cpu_percent_full_load": meter.other_percent,
        "machine_iowait_percent_full_load": meter.iowait_percent,
        "database": database_figures,
        "profile": profile,
    }


def _peak_rss(pids: Sequence[int]) -> float:
    """The processes' peak resident sets, added up (MB)."""
    return round(sum(process_status(pid, "VmHWM") for pid in pids) / 2**20, 1)


# ---------------------------------------------------------------------------- the Celery yardstick


async def run_celery(options: Options) -> CeleryResult:
    """The Celery relay (`bench.celery_relay`) through the same phases: a fresh queue, a
    receiver, the worker, then the ingress; all stopped and the queue removed afterwards."""
    queue = "bench-celery-" + uuid.uuid4().hex[:8]
    token = uuid.uuid4().hex
    async with contextlib.AsyncExitStack() as stack:
        receiver = await stack.enter_async_context(receiver_process())
        stack.push_async_callback(remove_celery_topology, queue)  # after both stopped
        env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "BENCH_CELERY_AMQP_URL": AMQP_URL,
            "BENCH_CELERY_QUEUE": queue,
            "BENCH_CELERY_TOKEN": token,
            "BENCH_CELERY_RESPONSE_URL": f"{receiver.base_url}/hook",
            "BENCH_CELERY_PREFETCH": str(CELERY_PREFETCH),
        }
        worker = await stack.enter_async_context(celery_worker(queue, env))
        port = free_port()
        argv = [sys.executable, "-m", "bench.celery_relay", "ingress", f"--port={port}"]
        ingress = await stack.enter_async_context(spawn("ingress", argv, port, env))
        for running in (worker, ingress):
            running.check_pid()
        client = Client(f"{ingress.base_url}/webhooks/celery", token, options.concurrency)
        stack.push_async_callback(client.close)
        inbox = Inbox(receiver.base_url, ordered=False)
        stack.push_async_callback(inbox.close)
        groups = {"ingress": [ingress.pid], "worker": [worker.pid, *children_of(worker.pid)]}
        # Not profiled: py-spy would sample the prefork parent, not the processes that work.
        measured = await run_phases(
            groups, receiver, client, inbox, options, None, "celery", profiled=False
        )
    result = CeleryResult(
        store="none", bot="one-reply", mode="celery", inbound_envelope_bytes=0, **measured
    )
    result.queue = queue
    result.out_of_order = result.full.reordered + result.half.reordered
    return result


@contextlib.asynccontextmanager
async def celery_worker(queue: str, env: Mapping[str, str]) -> AsyncIterator[Service]:
    """`celery worker` (prefork) on `queue`, once it consumes with every process forked;
    SIGTERM (a warm shutdown) and wait on the way out."""
    argv = [
        *(sys.executable, "-m", "celery", "--quiet", "-A", "bench.celery_relay", "worker"),
        *("--pool", "prefork", "--concurrency", str(CELERY_CONCURRENCY), "-Q", queue),
        *("--without-gossip", "--without-mingle", "--without-heartbeat", "-l", "warning"),
        *("--hostname", f"{queue}@%h"),
    ]
    # Its stdout to our stderr: it prints its shutdown there even with --quiet (and --json
    # prints the report on stdout).
    process = await asyncio.create_subprocess_exec(
        *argv, env=dict(env), stdout=sys.stderr.fileno(), start_new_session=True
    )
    try:
        await _consuming(queue, process)
        yield Service("worker", process, "")
    finally:
        await stop_process(process)


async def _consuming(queue: str, process: asyncio.subprocess.Process) -> None:
    """Until `queue` has a consumer and the pool all its processes (fail if the worker died
    or took longer than CELERY_READY_SECONDS)."""
    deadline = time.monotonic() + CELERY_READY_SECONDS
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        while time.monotonic() < deadline:
            if process.returncode is not None:
                raise RuntimeError(f"the Celery worker exited with {process.returncode}")
            channel = await connection.channel()  # a passive declare of no queue closes it
            with contextlib.suppress(aio_pika.exceptions.ChannelNotFoundEntity):
                declared = await channel.declare_queue(queue, passive=True)
                forked = len(children_of(process.pid))
                if declared.declaration_result.consumer_count and forked >= CELERY_CONCURRENCY:
                    return
                await channel.close()
            await asyncio.sleep(0.2)
    raise RuntimeError(f"the Celery worker did not consume {queue} within {CELERY_READY_SECONDS} s")


# ---------------------------------------------------------------------------- output


def print_report(
    relay: Sequence[StoreResult],
    raw: RawResult,
    celery: CeleryResult | None,
    options: Options,
) -> None:
    """The figures as aligned tables: Relay's cases, then the Celery yardstick's row."""
    print(
        f"{options.messages} messages over {options.conversations} conversations, "
        f"{options.concurrency} concurrent keep-alive connections; latency = POST sent -> "
        "echoed text at the receiver (ms)\n"
    )
    results = [*relay, *([celery] if celery else [])]
    rows = [
        {
            "case": r.case,
            "accepted/s": r.full.accepted_per_second,
            "delivered/s": r.full.delivered_per_second,
            "p50": r.full.latency_p50_ms,
            "p95": r.full.latency_p95_ms,
            "p99": r.full.latency_p99_ms,
            "half rate/s": r.half.target_per_second,
            "half p50": r.half.latency_p50_ms,
            "half p95": r.half.latency_p95_ms,
            "half p99": r.half.latency_p99_ms,
            "1-by-1 p50": r.trickle.latency_p50_ms,
            "1-by-1 p99": r.trickle.latency_p99_ms,
            "e2e/raw": r.ratio,
            "e2e/celery": r.celery_ratio,
        }
        for r in results
    ]
    columns = [c for c in rows[0] if c != "e2e/celery" or celery]
    print(table(rows, columns))
    print("\nchecks (full load, half load, one at a time)")
    checks = [
        {
            "case": r.case,
            "posted": sum(p.messages for p in (r.full, r.half, r.trickle)),
            "accepted": sum(p.accepted for p in (r.full, r.half, r.trickle)),
            "errors": _merge(r.full.errors, r.half.errors, r.trickle.errors) or 0,
            "delivered": sum(p.delivered for p in (r.full, r.half, r.trickle)),
            "missing": sum(p.missing for p in (r.full, r.half, r.trickle)),
            "duplicates": r.duplicates,
            "out of order": r.out_of_order,
            "half sent/s": r.half.sent_per_second,
            "pacing lag ms": r.half.pacing_lag_max_ms,
        }
        for r in results
    ]
    print(table(checks, list(checks[0])))
    if celery:
        print(
            f"{celery.case}: out of order = replies that overtook the reply to an earlier"
            " message of their conversation, one answered before theirs was sent (it numbers"
            " nothing and keeps no order: a figure, not a failure)"
        )
    for r in results:
        if r.out_of_order_examples:
            shown = "; ".join(
                f"{e['conversationId']}: {e['sequence']} after {e['after']}"
                for e in r.out_of_order_examples[:5]
            )
            print(f"{r.case}: responses out of order, e.g. {shown}")
    print(
        "\npeak RSS and CPU during full load, and CPU per message at half load (rabbitmq,"
        " postgres: every user of the shared server; (other): busy CPU of no process here,"
        " e.g. other jobs or the hypervisor's steal)"
    )
    resources = [row for r in results for row in _resource_rows(r)]
    print(table(resources, list(resources[0])))
    machine = ", ".join(
        f"{r.case} {r.machine_cpu_percent_full_load}% busy,"
        f" {r.machine_iowait_percent_full_load}% iowait"
        for r in results
    )
    print(f"machine during full load (all cores): {machine}")
    database = [{"case": r.case, **r.database} for r in results if r.database]
    if database:
        print("\nPostgreSQL per user message during full load")
        print(table(database, list(database[0])))
    print(f"\nraw two-hop chain: {raw.per_second} msgs/s; {_raw_line(raw)}")
    if celery:
        print(f"celery relay: {celery.full.delivered_per_second} msgs/s; {_celery_line(celery)}")
    _print_ends(relay, results)


def _print_ends(relay: Sequence[StoreResult], results: Sequence[StoreResult]) -> None:
    """Each case's profile (with --profile) and Relay's counters at the end."""
    for r in results:
        if r.profile:
            print_summaries(f"{r.case}: where each process's CPU goes (profiled phase)", r.profile)
    for r in results:
        if layered := layer_rows(r):
            print(
                f"\n{r.case}: CPU ms per user message by layer (each process's full-load CPU"
                " per message, shared out as its profile's samples)"
            )
            print(table(layered, list(layered[0])))
    for r in relay:
        print(f"\n{r.case}: counters at the end")
        for name, counters in r.metrics.items():
            shown = ", ".join(f"{k} {v:g}" for k, v in counters.items())
            print(f"  {name}: {shown}")


def layer_rows(result: StoreResult) -> list[dict[str, Any]]:
    """The case's CPU per message by layer and process (its full-load figure, in the
    shares of its profile), with the processes' total: one row per layer."""
    shares = {
        name: found["layers"]
        for name, found in result.profile.items()
        if name in result.resources and found["samples"]
    }
    layers = list(dict.fromkeys(layer for each in shares.values() for layer in each))
    rows = []
    for layer in layers:
        row: dict[str, Any] = {"layer": layer}
        for name, each in shares.items():
            per_message = result.resources[name].cpu_ms_per_message
            row[name] = round(per_message * each.get(layer, 0.0) / 100, 3)
        row["total"] = round(sum(v for k, v in row.items() if k in shares), 3)
        rows.append(row)
    return sorted(rows, key=lambda row: -row["total"])


def _merge(*counts: Mapping[str, int]) -> dict[str, int]:
    total: Counter[str] = Counter()
    for count in counts:
        total.update(count)
    return dict(total)


def _resource_rows(result: StoreResult) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = [
        {
            "case": result.case,
            "process": name,
            "peak RSS MB": res.peak_rss_mb,
            "CPU % of a core": res.cpu_percent_full_load,
            "CPU ms/msg": res.cpu_ms_per_message,
            "at half load": res.cpu_ms_per_message_half_load,
        }
        for name, res in result.resources.items()
    ]
    rows.append(
        {
            "case": result.case,
            "process": "(other)",
            "CPU % of a core": result.other_cpu_percent_full_load,
        }
    )
    return rows


def _raw_line(raw: RawResult) -> str:
    cpu = ", ".join(f"{name} {ms}" for name, ms in raw.cpu_ms_per_message.items())
    return (
        f"aio-pika publish (persistent, confirms, {raw.concurrency} in flight) -> hop (consume,"
        f" publish + confirm, ack; prefetch {raw.prefetch}) -> sink (consume, ack) of"
        f" {raw.messages} x {raw.body_bytes}-byte messages over the same partitions;"
        f" CPU ms/msg: {cpu}"
    )


def _celery_line(celery: CeleryResult) -> str:
    cpu = ", ".join(
        f"{name} {res.cpu_ms_per_message}"
        for name, res in celery.resources.items()
        if name in ("ingress", "worker", "rabbitmq")
    )
    return (
        "aiohttp ingress (token check, apply_async in a thread, publisher confirms) -> quorum"
        f" queue -> Celery prefork worker ({celery.concurrency} processes, prefetch multiplier"
        f" {celery.prefetch_multiplier}, late acks) -> one-reply bot -> requests POST; e2e/raw"
        f" {celery.ratio}; CPU ms/msg: {cpu} (worker: the parent and its processes added up,"
        " in its peak RSS too, so pages they share count once per process)"
    )


def report_json(
    results: Sequence[StoreResult],
    raw: RawResult,
    celery: CeleryResult | None,
    options: Options,
) -> str:
    """One JSON document with the configuration and every figure."""
    config = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(options).items()}
    config.pop("json")
    cases = [_case_json(r) for r in results]
    document = {
        "config": config,
        "raw": asdict(raw),
        "celery": _case_json(celery) if celery else None,
        "results": cases,
    }
    return json.dumps(document, indent=2)


def _case_json(result: StoreResult) -> dict[str, Any]:
    return asdict(result) | {"case": result.case, "ok": not result.failed}


# ---------------------------------------------------------------------------- main


async def main(options: Options) -> int:
    """Run every chosen store in turn; 1 if anything was lost, refused or repeated."""
    task = asyncio.current_task()
    assert task is not None
    # SIGTERM unwinds like Ctrl-C: every process stopped, every queue and schema removed.
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    results = []
    settings: Settings | None = None
    envelope: bytes | None = None
    for case in cases(options):
        print(f"running {case.store} {case.mode} {case.bot}...", file=sys.stderr, flush=True)
        result, settings, sampled = await run_case(case, options)
        results.append(result)
        envelope = envelope or sampled
    assert settings is not None
    print("running the raw two-hop chain...", file=sys.stderr, flush=True)
    raw = await raw_ceiling(
        AMQP_URL,
        settings.partitions,
        options.messages,
        options.conversations,
        envelope or b"x" * RAW_BODY_BYTES,
        options.concurrency,
        settings.bot_concurrency * 2,  # the prefetch of the workers' consuming channels
        broker_pids=pids_named("beam.smp"),
    )
    celery: CeleryResult | None = None
    if options.celery:
        print("running the Celery relay...", file=sys.stderr, flush=True)
        celery = await run_celery(options)
        celery.ratio = round(celery.full.delivered_per_second / raw.per_second, 3)
    for result in results:
        result.ratio = round(result.full.delivered_per_second / raw.per_second, 3)
        if celery and celery.full.delivered_per_second:
            rate = result.full.delivered_per_second / celery.full.delivered_per_second
            result.celery_ratio = round(rate, 3)
    if options.json:
        print(report_json(results, raw, celery, options))
    else:
        print_report(results, raw, celery, options)
    return 1 if any(r.failed for r in [*results, *([celery] if celery else [])]) else 0


def cases(options: Options) -> list[Case]:
    """Every combination, the separate services first (they sample the raw chain's body)."""
    return [
        Case(store, bot, mode)
        for mode in options.modes
        for store in options.stores
        for bot in options.bots
    ]


def parse_args(argv: list[str] | None = None) -> Options:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # The yardstick: 5,000 messages, 50 conversations, 32 connections.
    parser.add_argument("--messages", type=int, default=5_000)
    parser.add_argument("--conversations", type=int, default=50)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument(
        "--half-messages",
        type=int,
        help="messages of the half-load phase (default: a tenth of --messages, at least 1000)",
    )
    parser.add_argument("--stores", default=",".join(STORES), help="comma-separated")
    parser.add_argument("--bots", default=",".join(BOTS), help="comma-separated")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    parser.add_argument(
        "--no-celery",
        dest="celery",
        action="store_false",
        help="leave out the Celery yardstick (and the e2e/celery ratio)",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="FOLDER",
        help="after the measured phases, one more full-load phase with py-spy on each process:"
        " its CPU by layer in the report, its folded stacks in FOLDER",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="RELAY_NAME=VALUE",
        help="a setting for the services (repeatable)",
    )
    args = parser.parse_args(argv)
    stores, bots, modes = (
        [s.strip() for s in text.split(",") if s.strip()]
        for text in (args.stores, args.bots, args.modes)
    )
    for name, chosen, known in (
        ("stores", stores, STORES),
        ("bots", bots, BOTS),
        ("modes", modes, MODES),
    ):
        if not chosen or set(chosen) - set(known):
            parser.error(f"--{name}: a comma-separated list of {', '.join(known)}")
    if min(args.messages, args.conversations, args.concurrency, args.half_messages or 1) < 1:
        parser.error("--messages, --conversations, --concurrency, --half-messages: at least 1")
    pairs = [item.split("=", 1) for item in args.set]
    if any(len(p) != 2 or not p[0].startswith("RELAY_") for p in pairs):
        parser.error("--set takes RELAY_NAME=VALUE")
    half = args.half_messages or max(1000, args.messages // 10)
    return Options(
        args.messages,
        args.conversations,
        args.concurrency,
        half,
        stores,
        bots,
        modes,
        args.json,
        dict(pairs),
        args.celery,
        args.profile,
    )


if __name__ == "__main__":
    try:
        sys.exit(asyncio.run(main(parse_args())))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("interrupted: processes stopped, queues and databases removed", file=sys.stderr)
        sys.exit(130)
