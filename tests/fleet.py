"""`relay ingress|bot-worker|delivery-worker` as separate processes, for end-to-end tests.

A `Fleet` starts services on free ports and waits until they are ready, stops them
(SIGTERM) or kills them (SIGKILL), scrapes their metrics, and, given a folder, keeps each
process's output in files there so a failing test can show what the services said.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from relay.settings import Settings
from tests.helpers import eventually
from tests.test_cli import RELAY, free_port, relay_env

PORT_SETTING = {
    "ingress": "RELAY_HTTP_PORT",
    "bot-worker": "RELAY_BOT_WORKER_PORT",
    "delivery-worker": "RELAY_DELIVERY_WORKER_PORT",
    "run": "RELAY_HTTP_PORT",
}
# Every sample of a /metrics page: (name, sorted labels) -> value.
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@dataclass
class Service:
    role: str
    port: int
    process: asyncio.subprocess.Process
    name: str = ""
    # Where its stdout and stderr go (`<log>.out`, `<log>.err`), when the fleet keeps logs.
    log: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self.process.returncode is None

    def lines(self) -> list[str]:
        """What the process wrote (stdout, then stderr), if it was kept."""
        if self.log is None:
            return []
        paths = [self.log.with_suffix(suffix) for suffix in (".out", ".err")]
        return [
            line
            for path in paths
            if path.exists()
            for line in path.read_text(errors="replace").splitlines()
        ]

    def tail(self, lines: int = 30, width: int = 400) -> str:
        """The last lines of what the process wrote, each cut to `width` characters."""
        if self.log is None:
            return "(output not kept)"
        return "\n".join(line[:width] for line in self.lines()[-lines:])

    def events(self) -> Counter[str]:
        """How many times each log event occurred (JSON log lines; other lines by text)."""
        counted: Counter[str] = Counter()
        for line in self.lines():
            try:
                event = str(json.loads(line).get("event", line))
            except (ValueError, AttributeError):
                event = line
            counted[event[:100]] += 1
        return counted


@dataclass
class Fleet:
    """`relay` service processes; whatever still runs at the end gets SIGTERM."""

    settings: Settings
    # Readiness and metrics only: a session the load does not use, since busy keep-alive
    # clients re-take a freed connection before a waiting request gets it.
    http: aiohttp.ClientSession
    services: list[Service] = field(default_factory=list)
    # More RELAY_* variables for every process (they override the defaults below).
    env: dict[str, str] = field(default_factory=dict)
    # When set, each process's output goes to files in this folder instead of the test's.
    logs: Path | None = None
    _started: Counter[str] = field(default_factory=Counter)

    async def start(self, role: str) -> Service:
        """Start `role` on a free port and wait until it is ready; another port if the one
        found free was taken before the service bound it."""
        for _ in range(3):
            service = await self._start_on(role, free_port())
            if await self._ready_or_gone(service):
                return service
            self.services.remove(service)
        raise AssertionError(f"{role} did not start")

    async def _ready_or_gone(self, service: Service) -> bool:
        async def settled() -> bool:
            return service.process.returncode is not None or await self.ready(service)

        await eventually(settled, timeout=60, interval=0.2)
        return service.process.returncode is None

    async def _start_on(self, role: str, port: int) -> Service:
        env = relay_env(
            self.settings,
            {
                PORT_SETTING[role]: str(port),
                "RELAY_LOG_LEVEL": "warning",
                "RELAY_RATE_LIMIT_PER_SECOND": "0",
                "RELAY_ALLOWED_ENDPOINT_NETWORKS": "127.0.0.0/8",
                "RELAY_QUEUE_WATCH_INTERVAL": "1",
                # One receiver stands for every back end here: let each worker use all of its
                # concurrency on it, rather than wait in delay queues for an endpoint slot.
                "RELAY_ENDPOINT_CONCURRENCY": "64",
                # Eight processes share PostgreSQL's 100 connections with the test's own.
                "RELAY_DATABASE_POOL_SIZE": "5",
                **self.env,
            },
        )
        # Counted before the first await: services started together get distinct names.
        self._started[role] += 1
        name = f"{role}-{self._started[role]}"
        log = self.logs / name if self.logs is not None else None
        with contextlib.ExitStack() as files:
            out = err = None
            if log is not None:
                out = files.enter_context(log.with_suffix(".out").open("ab"))
                err = files.enter_context(log.with_suffix(".err").open("ab"))
            # The child has its own copies of the files: ours close when it has started.
            process = await asyncio.create_subprocess_exec(
                *RELAY, role, env=env, stdout=out, stderr=err
            )
        service = Service(role, port, process, name, log)
        self.services.append(service)
        return service

    def running(self, role: str) -> list[Service]:
        """The services of a role still running, oldest first."""
        return [s for s in self.services if s.role == role and s.running]

    async def ready(self, service: Service) -> bool:
        try:
            async with self.http.get(f"{service.url}/readyz") as answer:
                return answer.status == 200
        except aiohttp.ClientError:
            return False

    async def stop(self, service: Service) -> int:
        """SIGTERM, and the exit code (bounded wait)."""
        service.process.send_signal(signal.SIGTERM)
        return await asyncio.wait_for(service.process.wait(), 60)

    async def kill(self, service: Service) -> int:
        """SIGKILL (`kill -9`): no goodbye, nothing finished; the exit code."""
        service.process.kill()
        return await asyncio.wait_for(service.process.wait(), 30)

    async def metrics(self, service: Service) -> Samples:
        async with self.http.get(f"{service.url}/metrics") as answer:
            text = await answer.text()
        return {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }

    def events(self) -> str:
        """Each service's log events, counted: what went wrong where, at a glance."""
        return "log events per service:\n" + "\n".join(
            f"  {s.name}: {dict(s.events().most_common(12))}" for s in self.services
        )

    def tails(self, lines: int = 30) -> str:
        """The end of every service's output, for a failure's diagnosis."""
        return "\n".join(
            f"=== {s.name} (port {s.port}, exit {s.process.returncode})\n{s.tail(lines)}"
            for s in self.services
        )


@contextlib.asynccontextmanager
async def fleet(
    settings: Settings, env: dict[str, str] | None = None, logs: Path | None = None
) -> AsyncIterator[Fleet]:
    async with aiohttp.ClientSession() as http:
        running = Fleet(settings, http, env=dict(env or {}), logs=logs)
        try:
            yield running
        finally:
            stuck = await _stop_all(running)
        # Only when the block itself went well: a failure's own error matters more.
        assert not stuck, f"did not stop on SIGTERM within 60 s (killed): {stuck}"


async def _stop_all(running: Fleet) -> list[str]:
    """SIGTERM to whatever still runs; the names of those that did not exit (then killed)."""
    for service in running.services:
        if service.process.returncode is None:
            service.process.send_signal(signal.SIGTERM)
    stuck = []
    for service in running.services:
        try:
            await asyncio.wait_for(service.process.wait(), 60)
        except TimeoutError:
            stuck.append(service.name)
            await running.kill(service)
    return stuck


def sample(metrics: Samples, name: str, **labels: str) -> float:
    return metrics.get((name, tuple(sorted(labels.items()))), 0.0)
