"""Accepted messages per second of `relay ingress`, on SQLite and on PostgreSQL.

Starts the real `relay ingress` process on a fresh store and queue prefix, posts N
messages over M conversations with a concurrent keep-alive client, checks the broker
holds exactly N messages, and prints throughput and latency percentiles.

    python -m bench.ingress_load [--messages 5000] [--concurrency 32] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass

import aio_pika
import aiohttp

from bench.common import (
    AMQP_URL,
    create_integration,
    database,
    free_port,
    percentiles,
    remove_topology,
    service,
    service_env,
)
from relay.broker import topology_of
from relay.broker.topology import Topology
from relay.commands.output import table
from relay.settings import Settings
from relay.store import open_store

PARTITIONS = 8


@dataclass
class Result:
    """One run's figures."""

    store: str
    messages: int
    concurrency: int
    seconds: float
    accepted_per_second: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    errors: int
    queued: int


@asynccontextmanager
async def ingress_process(settings: Settings) -> AsyncIterator[str]:
    """`relay ingress` as its own process; its base URL."""
    env = service_env(settings)
    async with service("ingress", ["ingress"], env, settings.http_port) as ingress:
        yield ingress.base_url


async def post_all(
    url: str, token: str, count: int, conversations: int, concurrency: int, tag: str
) -> tuple[list[float], int]:
    """Post `count` messages with `concurrency` workers; latencies (s) and error count."""
    latencies: list[float] = []
    errors = 0
    numbers = iter(range(count))
    connector = aiohttp.TCPConnector(limit=concurrency)
    headers = {"Authorization": f"Bearer {token}"}
    async with aiohttp.ClientSession(connector=connector, headers=headers) as http:

        async def worker() -> None:
            nonlocal errors
            for n in numbers:
                body = {
                    "userId": f"u{n % conversations}",
                    "messageId": f"{tag}-{n}",
                    "conversationId": f"c{n % conversations}",
                    "type": "text",
                    "text": f"message {n}",
                }
                started = time.perf_counter()
                async with http.post(url, json=body) as response:
                    await response.read()
                    errors += response.status != 200
                latencies.append(time.perf_counter() - started)

        await asyncio.gather(*[worker() for _ in range(concurrency)])
    return latencies, errors


async def queued_messages(topology: Topology) -> int:
    """Messages now on the inbound partitions."""
    connection = await aio_pika.connect(AMQP_URL)
    async with connection, connection.channel() as channel:
        total = 0
        for partition in range(topology.partitions):
            queue = await channel.declare_queue(topology.queue("inbound", partition), passive=True)
            total += queue.declaration_result.message_count or 0
        return total


async def run_one(kind: str, messages: int, concurrency: int, conversations: int) -> Result:
    """Benchmark one store."""
    async with database(kind) as url:
        settings = Settings(
            _env_file=None,
            amqp_url=AMQP_URL,
            database_url=url,
            queue_prefix="bench-" + uuid.uuid4().hex[:8],
            partitions=PARTITIONS,
            http_port=free_port(),
            rate_limit_per_second=0,
            log_level="warning",
        )
        store = await open_store(url)
        integration_id, token = await create_integration(store, settings)
        await store.close()
        topology = topology_of(settings)  # the same queues the ingress declares
        try:
            async with ingress_process(settings) as base:
                endpoint = f"{base}/webhooks/{integration_id}"
                await post_all(endpoint, token, 200, conversations, concurrency, "warm")
                started = time.perf_counter()
                latencies, errors = await post_all(
                    endpoint, token, messages, conversations, concurrency, "run"
                )
                seconds = time.perf_counter() - started
            queued = await queued_messages(topology) - 200
        finally:
            await remove_topology(topology)
    p50, p95, p99 = percentiles(latencies)
    return Result(
        kind,
        messages,
        concurrency,
        round(seconds, 2),
        round(messages / seconds, 1),
        p50,
        p95,
        p99,
        errors,
        queued,
    )


def print_table(results: list[Result]) -> None:
    """The figures as an aligned table."""
    rows = [asdict(r) for r in results]
    print(table(rows, list(rows[0])))


async def main(args: argparse.Namespace) -> int:
    """Run the benchmark for the chosen stores."""
    results = [
        await run_one(kind, args.messages, args.concurrency, args.conversations)
        for kind in args.stores
    ]
    if args.json:
        print(json.dumps([asdict(r) for r in results], indent=2))
    else:
        print_table(results)
    broken = [r for r in results if r.errors or r.queued != r.messages]
    return 1 if broken else 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--conversations", type=int, default=100)
    parser.add_argument(
        "--stores", nargs="+", default=["sqlite", "postgresql"], choices=["sqlite", "postgresql"]
    )
    parser.add_argument("--json", action="store_true")
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse_args())))
