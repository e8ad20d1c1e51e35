"""Relay on a three-node RabbitMQ cluster, with nodes lost mid-stream.

Three private RabbitMQ nodes (their own names, ports and folders, beside the system broker,
which is never touched; see `tests/private_broker.py`) are clustered; Relay's queues are
quorum queues with a member on each node and their leaders spread over the nodes. Two
ingresses, two bot workers and two delivery workers run as separate `relay` processes
with the three nodes in RELAY_AMQP_URL, each connected to one of them. Mid-stream (1,500
messages over 30 conversations) the node that leads the most partition queues is stopped
(`rabbitmqctl stop_app`) and started again; later another one. Checked as in the fault
suite: nothing accepted is lost, every conversation completes within 60 s of the last
fault, duplicates only under the same webhook-id, order per conversation holds, the
ingress answers 503 and never 500 meanwhile. `relay queues` shows each queue's leader and
members, a node down as a member down; with two of three nodes down it reports the lost
quorum.

Marked `faults` (with the fault suite: `make test-faults`, which CI runs).
"""

from __future__ import annotations

import asyncio
import json
import os
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from relay.settings import Settings
from tests import private_broker
from tests.flapping import FlappingEndpoint, serve_flapping
from tests.helpers import eventually
from tests.private_broker import PrivateBroker
from tests.streaming import run_with, stream_settings, streaming
from tests.test_cli import RELAY, relay_env

RELAY_QUEUES = [*RELAY, "queues", "--json"]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not private_broker.available(),
        reason="needs Debian's rabbitmq-server tools, as root",
    ),
    pytest.mark.faults,
]

DOWN_SECONDS = 5.0  # each node stays stopped this long
ENV = {
    "RELAY_PUBLISH_TIMEOUT": "2",
    "RELAY_OUTBOX_LEASE": "5",
    "RELAY_OUTBOX_INTERVAL": "0.5",
    "RELAY_SHUTDOWN_TIMEOUT": "5",
    "RELAY_QUEUE_WATCH_INTERVAL": "2",
    "RELAY_LOG_LEVEL": os.environ.get("RELAY_FAULTS_LOG_LEVEL", "warning"),
}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[PrivateBroker]]:
    with private_broker.private_cluster(tmp_path_factory.mktemp("cluster")) as nodes:
        yield nodes


@pytest.fixture
async def endpoint() -> AsyncIterator[FlappingEndpoint]:
    async with serve_flapping(hang=3.0) as running:  # never flaps here: records every hit
        yield running


@pytest.fixture
async def settings(cluster: list[PrivateBroker]) -> AsyncIterator[Settings]:
    async with stream_settings(
        "cluster",
        amqp_url=",".join(node.url for node in cluster),
        management_url=",".join(node.management_url for node in cluster),
    ) as chosen:
        yield chosen


async def queue_view(settings: Settings) -> dict[str, dict[str, Any]]:
    """`relay queues --json`, by queue name."""
    process = await asyncio.create_subprocess_exec(
        *RELAY_QUEUES,
        env=relay_env(settings),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, err.decode()
    return {queue["name"]: queue for queue in json.loads(out)["queues"]}


def partition_queues(view: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {name: q for name, q in view.items() if q["kind"] == "partition"}


def busiest_leader(view: dict[str, dict[str, Any]], nodes: list[PrivateBroker]) -> PrivateBroker:
    """The node that leads the most partition queues."""
    led = Counter(q["leader"] for q in partition_queues(view).values())
    return max(nodes, key=lambda node: led[node.node])


@pytest.mark.timeout(420)
async def test_nodes_lost_mid_stream_lose_nothing_and_keep_order(
    cluster: list[PrivateBroker],
    settings: Settings,
    endpoint: FlappingEndpoint,
    tmp_path: Path,
) -> None:
    async with streaming(settings, ENV, tmp_path, endpoint, "cluster", pace=0.45) as run:
        view = await _whole_cluster_shown(settings, cluster)
        leaders = Counter(q["leader"] for q in partition_queues(view).values())
        assert len(leaders) >= 2, f"every leader on one node: {leaders}"

        async def lose(node: PrivateBroker) -> None:
            async with run.event(f"{node.node} stopped"):
                await node.stop_app()
                try:
                    await _shows_a_member_down(settings, node)
                    await asyncio.sleep(DOWN_SECONDS)
                finally:
                    await node.start_app()

        async def inject() -> None:
            await run.at_round(10)
            first = busiest_leader(await queue_view(settings), cluster)
            await lose(first)
            await run.at_round(run.round + 8)
            others = [node for node in cluster if node is not first]
            await lose(busiest_leader(await queue_view(settings), others))

        await run_with(run, inject)

    await _quorum_lost_is_reported(settings, cluster)


async def _whole_cluster_shown(
    settings: Settings, cluster: list[PrivateBroker]
) -> dict[str, dict[str, Any]]:
    """`relay queues` once it shows every partition queue with a member on each node, all
    online (the management API lists a new queue's figures within seconds)."""
    members = {node.node for node in cluster}
    views: list[dict[str, dict[str, Any]]] = []

    async def shown() -> bool:
        views.append(await queue_view(settings))
        return all(
            set(q["members"]) == members == set(q["online"]) and q["leader"] in members
            for q in partition_queues(views[-1]).values()
        )

    await eventually(shown, timeout=60, interval=1)
    return views[-1]


async def _shows_a_member_down(settings: Settings, node: PrivateBroker) -> None:
    """`relay queues` lists the stopped node as a member that is not online."""

    async def shown() -> bool:
        queues = partition_queues(await queue_view(settings)).values()
        return all(node.node in q["members"] and node.node not in q["online"] for q in queues)

    await eventually(shown, timeout=30, interval=1)


async def _quorum_lost_is_reported(settings: Settings, cluster: list[PrivateBroker]) -> None:
    """With two of three nodes down, every queue has lost its quorum: `relay queues` says so
    (through the management API of the node left)."""
    down = cluster[1:]
    await asyncio.gather(*(node.stop_app() for node in down))
    try:
        left = settings.model_copy(update={"amqp_url": cluster[0].url})

        async def reported() -> bool:
            queues = partition_queues(await queue_view(left)).values()
            return all(q["quorum_lost"] for q in queues)

        await eventually(reported, timeout=60, interval=1)
    finally:
        await asyncio.gather(*(node.start_app() for node in down))
