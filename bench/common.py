"""What the benchmarks share: addresses, ports, a fresh store, Relay services as processes,
an integration with its token, and the removal of a run's queues (Relay's and the Celery
yardstick's)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import aio_pika
import aiohttp

from relay import admin
from relay.broker.addresses import parse_addresses
from relay.broker.topology import Topology, delete
from relay.settings import Settings
from relay.store import Store
from relay.store.postgres import drop_schema

# The services' RELAY_AMQP_URL: may list a cluster's nodes (`bench.cluster`); the bench's
# own connections (topology removal, the raw chain, the envelope sample) use the first.
SERVICES_AMQP_URL = os.environ.get("RELAY_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
AMQP_URL = str(parse_addresses(SERVICES_AMQP_URL)[0])
POSTGRES_URL = os.environ.get("RELAY_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1/test")
STORES = ("sqlite", "postgresql")


def free_port() -> int:
    """A TCP port nobody listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@asynccontextmanager
async def database(kind: str) -> AsyncIterator[str]:
    """A fresh SQLite file or PostgreSQL schema, removed afterwards (also on failure)."""
    if kind == "sqlite":
        with tempfile.TemporaryDirectory(prefix="relay-bench-") as folder:
            yield f"sqlite:///{Path(folder) / 'bench.db'}"
        return
    schema = "bench_" + uuid.uuid4().hex[:10]
    try:
        yield f"{POSTGRES_URL}?schema={schema}"
    finally:
        await drop_schema(POSTGRES_URL, schema)


def relay_command() -> list[str]:
    """The `relay` console script of this interpreter's environment.

    The script is a `#!python` file, so the kernel runs the interpreter in the very process
    we start: its pid is the Python process of the service (see `Service.check_pid`).
    """
    script = Path(sys.executable).parent / "relay"
    return [str(script)] if script.exists() else [sys.executable, "-m", "relay.commands"]


@dataclass
class Service:
    """A Relay service running as its own OS process."""

    name: str
    process: asyncio.subprocess.Process
    base_url: str

    @property
    def pid(self) -> int:
        """The service's process id."""
        return self.process.pid

    def check_pid(self) -> None:
        """Fail unless the pid is the Python interpreter itself (not a wrapper shell)."""
        exe = os.path.realpath(f"/proc/{self.pid}/exe")
        if "python" not in Path(exe).name:
            raise RuntimeError(f"{self.name}: pid {self.pid} runs {exe}, not Python")

    def status(self, field: str) -> int:
        """A `kB` field of /proc/<pid>/status (VmHWM, VmRSS), in bytes."""
        return process_status(self.pid, field)

    def cpu_seconds(self) -> float:
        """User plus system CPU time the process used so far."""
        return process_cpu_seconds(self.pid)


def process_status(pid: int, field: str) -> int:
    """A `kB` field of /proc/<pid>/status (VmHWM, VmRSS), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def process_cpu_seconds(pid: int) -> float:
    """User plus system CPU seconds of a process (from /proc/<pid>/stat)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children_of(pid: int) -> list[int]:
    """The processes whose parent is `pid` (a prefork pool's workers)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                stat = (entry / "stat").read_text()
                if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
    return found


def service_env(settings: Settings, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a service: ours and `extra`, with the run's settings written over."""
    return {
        **os.environ,
        **(extra or {}),
        "RELAY_DATABASE_URL": settings.database_url,
        "RELAY_AMQP_URL": settings.amqp_url,
        "RELAY_QUEUE_PREFIX": settings.queue_prefix,
        "RELAY_PARTITIONS": str(settings.partitions),
        "RELAY_HTTP_PORT": str(settings.http_port),
        "RELAY_BOT_WORKER_PORT": str(settings.bot_worker_port),
        "RELAY_DELIVERY_WORKER_PORT": str(settings.delivery_worker_port),
        "RELAY_RATE_LIMIT_PER_SECOND": str(settings.rate_limit_per_second),
        # Logging each message costs CPU the measured path would not spend in production.
        "RELAY_LOG_LEVEL": settings.log_level,
    }


@asynccontextmanager
async def service(
    name: str, args: Sequence[str], env: Mapping[str, str], port: int, cwd: str | None = None
) -> AsyncIterator[Service]:
    """Start `relay <args>`, wait for its /readyz; SIGTERM it (and wait) on the way out."""
    async with spawn(name, [*relay_command(), *args], port, env, cwd) as running:
        yield running


@asynccontextmanager
async def spawn(
    name: str,
    argv: Sequence[str],
    port: int,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
    ready: str = "/readyz",
) -> AsyncIterator[Service]:
    """Start a process serving on `port`, wait until `ready` answers 200; stop it afterwards."""
    process = await asyncio.create_subprocess_exec(
        *argv,
        env=dict(env) if env is not None else None,
        cwd=cwd,
        # Its own session: a Ctrl-C reaches only the benchmark, which then stops it in order.
        start_new_session=True,
    )
    running = Service(name, process, f"http://127.0.0.1:{port}")
    try:
        await wait_ready(running.base_url, process=process, path=ready)
        yield running
    finally:
        await stop_process(process)


async def stop_process(process: asyncio.subprocess.Process, seconds: float = 40) -> None:
    """SIGTERM, wait up to `seconds`, then SIGKILL."""
    if process.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        process.send_signal(signal.SIGTERM)
    try:
        await asyncio.wait_for(asyncio.shield(process.wait()), seconds)
    except TimeoutError:
        print(f"pid {process.pid} ignored SIGTERM for {seconds} s: killed", file=sys.stderr)
        _kill(process)
        await process.wait()
    except asyncio.CancelledError:
        _kill(process)
        raise


def _kill(process: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError):
        process.kill()


async def wait_ready(
    base: str,
    seconds: float = 30,
    process: asyncio.subprocess.Process | None = None,
    path: str = "/readyz",
) -> None:
    """Poll `path` until it answers 200 (fail early if the process died)."""
    deadline = time.monotonic() + seconds
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            if process is not None and process.returncode is not None:
                raise RuntimeError(f"{base}: the process exited with {process.returncode}")
            try:
                async with http.get(f"{base}{path}") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientConnectionError:
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError(f"{base} did not become ready within {seconds} s")


async def create_integration(
    store: Store, settings: Settings, response_url: str = "http://127.0.0.1:9/"
) -> tuple[str, str]:
    """A new integration answering to `response_url`, and an integration token for it."""
    record = await admin.create_integration(store, settings, "bench", response_url, verify=False)
    token, _ = await admin.create_token(store, record.id, "integration")
    return record.id, token


async def remove_topology(topology: Topology, amqp_url: str = AMQP_URL) -> None:
    """Delete the run's queues and exchanges (partitions, delay and dead queues)."""
    connection = await aio_pika.connect(amqp_url)
    async with connection, connection.channel() as channel:
        await delete(channel, topology)


# What a Celery worker on quorum queues declares for native delayed delivery (kombu's
# `native_delayed_delivery`): one exchange and queue per level, and the exchange that routes
# a message back to its queue. Shared by every Celery app on the virtual host.
CELERY_DELAYED_LEVELS = 28
CELERY_DELAYED_DELIVERY = "celery_delayed_delivery"


async def remove_celery_topology(queue: str, amqp_url: str = AMQP_URL) -> None:
    """Delete a Celery yardstick run's queue and exchange (both named `queue`), then the
    shared delayed-delivery topology unless another Celery queue is bound to it or a retry
    waits in it: each delete is conditional, and a refused one leaves the rest."""
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        await channel.queue_delete(queue)
        await channel.exchange_delete(queue)
        if not await _delete_if(connection, exchange=CELERY_DELAYED_DELIVERY):
            return  # another Celery queue still routes through it
        # Level 0 first: each level's exchange is bound to the one below it.
        for level in range(CELERY_DELAYED_LEVELS):
            name = f"celery_delayed_{level}"
            if not (
                await _delete_if(connection, queue=name)
                and await _delete_if(connection, exchange=name)
            ):
                return


async def _delete_if(
    connection: aio_pika.abc.AbstractConnection, *, queue: str = "", exchange: str = ""
) -> bool:
    """Delete an empty queue or an unbound exchange; False if it was not (or not there)."""
    channel = await connection.channel()  # a refusal closes the channel
    try:
        if queue:
            # Quorum queues refuse `if-empty`: look, then delete (a retry published in
            # between would be lost; no run of ours publishes one while this runs).
            declared = await channel.declare_queue(queue, passive=True)
            if declared.declaration_result.message_count:
                return False
            await channel.queue_delete(queue)
        else:
            await channel.exchange_delete(exchange, if_unused=True)
    except (
        aio_pika.exceptions.ChannelPreconditionFailed,
        aio_pika.exceptions.ChannelNotFoundEntity,
    ):
        return False
    with contextlib.suppress(aio_pika.exceptions.AMQPError):
        await channel.close()
    return True


def percentiles(seconds: Sequence[float], cuts: Sequence[int] = (50, 95, 99)) -> list[float]:
    """Percentiles of durations in seconds, as milliseconds (0 for too few samples)."""
    if len(seconds) < 2:
        return [round(seconds[0] * 1000, 1) if seconds else 0.0 for _ in cuts]
    quantiles = statistics.quantiles(seconds, n=100, method="inclusive")
    return [round(quantiles[cut - 1] * 1000, 1) for cut in cuts]
