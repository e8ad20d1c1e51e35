"""RELAY_PARTITIONS changed on a running system: 8 -> 16 and back, mid-stream, by rolling
restarts, with workers of both counts running during each roll.

Two ingresses, two bot workers and two delivery workers run as separate `relay` processes
(PostgreSQL, the shared broker under a queue prefix of the test's own) while 30
conversations stream at least 1,500 messages; the bot is slower than the stream in half of
them, so those always have messages unfinished when the count changes (which must go
first), while the others move to the new count. Each roll replaces every service, one role
after the other, by one started with the new count before the old one gets SIGTERM. Checked
as in the fault suite: nothing accepted is lost, duplicates only under the same
webhook-id, per conversation every response in order; and that messages did go through the
queues of both counts. Then `relay partitions` shows the counts, and the one nobody runs
with any more is retired: its queues are deleted.

Marked `faults` (with the fault suite: `make test-faults`, which CI runs).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import aio_pika
import pytest

from relay.broker import topology_of
from relay.broker.topology import delete
from relay.settings import Settings
from relay.store import open_store
from relay.wire import utcnow
from tests.flapping import FlappingEndpoint, serve_flapping
from tests.streaming import ROLES, Run, run_with, stream_settings, streaming
from tests.test_cli import relay

pytestmark = [pytest.mark.slow, pytest.mark.faults]

ENV = {
    "RELAY_PUBLISH_TIMEOUT": "2",
    "RELAY_OUTBOX_LEASE": "5",
    "RELAY_OUTBOX_INTERVAL": "0.5",
    "RELAY_SHUTDOWN_TIMEOUT": "5",
    "RELAY_GENERATIONS_INTERVAL": "0.5",
    # Slower than the stream's pace in half the conversations: those have messages
    # unfinished when the count changes, which must go first; the others move over.
    "RELAY_BOT": "tests.bots:unhurried",
    "RELAY_LOG_LEVEL": os.environ.get("RELAY_FAULTS_LOG_LEVEL", "warning"),
}


@pytest.fixture
async def endpoint() -> AsyncIterator[FlappingEndpoint]:
    async with serve_flapping(hang=3.0) as running:  # never flaps here: records every hit
        yield running


@pytest.fixture
async def settings(amqp_url: str) -> AsyncIterator[Settings]:
    async with stream_settings("repart", amqp_url=amqp_url) as chosen:
        try:
            yield chosen
        finally:
            connection = await aio_pika.connect(amqp_url)
            async with connection:
                for count in (8, 16):
                    async with connection.channel() as channel:
                        with contextlib.suppress(Exception):
                            await delete(channel, topology_of(chosen).with_partitions(count))


async def roll(run: Run, partitions: int) -> None:
    """Replace every service by one with `partitions`, one role after the other: the new
    one is started (and ready) before the old one gets SIGTERM."""
    services, ingresses = run.services, run.ingresses
    services.env["RELAY_PARTITIONS"] = str(partitions)
    for role in ROLES:
        for old in services.running(role):
            new = await services.start(role)
            if role == "ingress":
                ingresses.append(new.url)
                ingresses.remove(old.url)
            assert await services.stop(old) == 0


@pytest.mark.timeout(360)
async def test_partition_count_grows_and_shrinks_mid_stream_by_rolling_restarts(
    settings: Settings, endpoint: FlappingEndpoint, tmp_path: Path
) -> None:
    async with streaming(settings, ENV, tmp_path, endpoint, "repartition", pace=0.15) as run:

        async def rolls() -> None:
            await run.at_round(10)
            for partitions in (16, 8):
                async with run.event(f"roll to {partitions}"):
                    await roll(run, partitions)
                await run.at_round(run.round + 15)  # everything on the new count a while

        await run_with(run, rolls)
    under = await _messages_per_count(settings)
    print(f"messages per partition count (direction, count): {under}")
    for direction in ("incoming", "outgoing"):
        assert under.get((direction, 16), 0) > 0, under  # the new count was used...
        assert under.get((direction, 8), 0) > 0, under  # ...and the old one again after
    await _retire_the_count_nobody_runs_with(settings)


async def _messages_per_count(settings: Settings) -> dict[tuple[str, int], int]:
    store = await open_store(settings.database_url)
    try:
        async with store.driver.connection() as conn:
            rows = await conn.fetchall(
                "SELECT direction, partitions, count(*) AS n FROM messages"
                " GROUP BY direction, partitions"
            )
    finally:
        await store.close()
    return {(row["direction"], row["partitions"]): int(row["n"]) for row in rows}


async def _retire_the_count_nobody_runs_with(settings: Settings) -> None:
    """16 is still noted as running (recently); once that is old, it is retired."""
    refused = await relay(settings, "partitions", "retire", "16")
    assert refused.code == 1, refused.err
    assert "a service runs with 16" in refused.err
    store = await open_store(settings.database_url)
    try:
        async with store.driver.connection() as conn:
            await conn.execute(
                "UPDATE partition_counts SET seen_at = ? WHERE partitions = 16",
                utcnow() - timedelta(hours=1),
            )
    finally:
        await store.close()
    listed = await relay(settings, "partitions")
    assert listed.code == 0, listed.err
    rows = {line.split()[0]: line.split() for line in listed.out.splitlines()[1:]}
    assert rows["16"][2:] == ["no", "0", "0", "0"], listed.out
    retired = await relay(settings, "partitions", "retire", "16")
    assert retired.code == 0, retired.err
    assert "deleted 32 queues" in retired.out  # 16 per stage
    queues = await relay(settings, "queues", "--json")
    assert ".of16." not in queues.out
