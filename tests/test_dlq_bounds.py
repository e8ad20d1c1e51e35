"""The dead-letter bounds on the real broker: what is older than the age bound or beyond the
length bound goes from the head, counted and logged with its ids; the rest stays."""

from __future__ import annotations

import json
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import aio_pika
import pytest
from aio_pika.abc import AbstractRobustConnection
from structlog.testing import capture_logs

from relay.broker import StageName, Topology, declare, topology_of
from relay.metrics import Metrics
from relay.pipeline.dlq_bounds import Bounds, enforce
from relay.settings import Settings
from relay.wire import DEAD_AT_HEADER, REASON_HEADER
from tests.helpers import eventually

HOUR = 3600.0


@pytest.fixture(scope="module")
def database_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    """No store is involved: the module's settings need some database."""
    return f"sqlite:///{tmp_path_factory.mktemp('db') / 'relay.db'}"


@pytest.fixture
async def topology(amqp: AbstractRobustConnection, settings: Settings) -> Topology:
    """The module's queues (its own prefix), with empty dead-letter queues."""
    topology = topology_of(settings)
    async with amqp.channel() as channel:
        await declare(channel, topology)
        for stage in ("inbound", "outbound"):
            queue = await channel.get_queue(topology.dead_queue(stage))
            await queue.purge()
    return topology


def body_of(stage: StageName, integration_id: str, conversation_id: str) -> dict[str, Any]:
    """A dead letter's body, as each stage's envelope has the ids."""
    if stage == "outbound":
        return {
            "integrationId": integration_id,
            "body": {"botpressConversationId": conversation_id},
        }
    return {"integrationId": integration_id, "bundle": {"conversation": {"id": conversation_id}}}


async def bury(
    amqp: AbstractRobustConnection,
    topology: Topology,
    stage: StageName,
    age: float | None,
    headers: dict[str, Any] | None = None,
) -> str:
    """Dead-letter a message that died `age` seconds ago (None: no Relay header); its id."""
    letter_id = f"dead-{uuid.uuid4().hex[:8]}"
    sent = {REASON_HEADER: "the bot failed", **(headers or {})}
    if age is not None:
        sent[DEAD_AT_HEADER] = int(time.time() - age)
    body = json.dumps(body_of(stage, f"int-{letter_id}", f"conv-{letter_id}")).encode()
    async with amqp.channel() as channel:  # with confirms: it is there once this returns
        exchange = await channel.get_exchange(topology.dead_exchange())
        await exchange.publish(
            aio_pika.Message(body, message_id=letter_id, headers=sent), routing_key=stage
        )
    return letter_id


async def left(
    amqp: AbstractRobustConnection, topology: Topology, stage: StageName, count: int
) -> list[str]:
    """The ids of the `count` dead letters left in a stage, taken off it (the one a pass
    handed back reaches the queue again a moment after its channel closed)."""
    got: list[str] = []

    async def all_there() -> bool:
        async with amqp.channel() as channel:
            queue = await channel.get_queue(topology.dead_queue(stage))
            while (message := await queue.get(no_ack=True, fail=False)) is not None:
                got.append(message.message_id or "")
        return len(got) >= count

    await eventually(all_there)
    return got


def expired(metrics: Metrics, stage: str, reason: str) -> float:
    value = metrics.registry.get_sample_value(
        "relay_dead_letters_expired_total", {"stage": stage, "reason": reason}
    )
    return value or 0.0


async def test_dead_letters_past_the_age_bound_go_counted_and_logged(
    amqp: AbstractRobustConnection, topology: Topology
) -> None:
    old = [await bury(amqp, topology, "outbound", 2 * HOUR) for _ in range(3)]
    young = [await bury(amqp, topology, "outbound", 60) for _ in range(2)]
    old_inbound = await bury(amqp, topology, "inbound", 3 * HOUR)
    metrics = Metrics()

    with capture_logs() as logs:
        done = await enforce(amqp, topology, Bounds(max_age=HOUR, max_length=0), metrics)

    assert done == {"inbound": 1, "outbound": 3}
    assert expired(metrics, "outbound", "age") == 3
    assert expired(metrics, "inbound", "age") == 1
    lines = [line for line in logs if line["event"] == "dead_letter_expired"]
    assert [line.get("delivery_id") for line in lines if line["stage"] == "outbound"] == old
    [inbound] = [line for line in lines if line["stage"] == "inbound"]
    assert inbound["message_id"] == old_inbound
    assert inbound["integration_id"] == f"int-{old_inbound}"
    assert inbound["conversation_id"] == f"conv-{old_inbound}"
    assert (inbound["reason"], inbound["dead_reason"], inbound["log_level"]) == (
        "age",
        "the bot failed",
        "warning",
    )
    assert inbound["age"] >= 3 * HOUR
    assert await left(amqp, topology, "outbound", 2) == young
    assert await left(amqp, topology, "inbound", 0) == []


async def test_the_length_bound_takes_the_oldest(
    amqp: AbstractRobustConnection, topology: Topology
) -> None:
    letters = [await bury(amqp, topology, "outbound", 60) for _ in range(5)]
    metrics = Metrics()

    with capture_logs() as logs:
        done = await enforce(amqp, topology, Bounds(max_age=HOUR, max_length=3), metrics)

    assert done["outbound"] == 2
    assert expired(metrics, "outbound", "length") == 2
    assert expired(metrics, "outbound", "age") == 0
    lines = [line for line in logs if line["event"] == "dead_letter_expired"]
    assert [(line["delivery_id"], line["reason"]) for line in lines] == [
        (letters[0], "length"),
        (letters[1], "length"),
    ]
    assert await left(amqp, topology, "outbound", 3) == letters[2:]


async def test_the_broker_s_own_dead_letters_age_by_its_death_header(
    amqp: AbstractRobustConnection, topology: Topology
) -> None:
    # Over its delivery limit, the broker dead-letters a message with an x-death header.
    died = datetime.fromtimestamp(time.time() - 2 * HOUR, UTC)
    await bury(amqp, topology, "inbound", None, {"x-death": [{"time": died}]})
    # One of no known age stays, and so does what is behind it (the pass ends there).
    unknown = await bury(amqp, topology, "inbound", None)
    behind = await bury(amqp, topology, "inbound", 2 * HOUR)
    metrics = Metrics()

    done = await enforce(amqp, topology, Bounds(max_age=HOUR, max_length=0), metrics)

    assert done["inbound"] == 1
    assert expired(metrics, "inbound", "age") == 1
    assert await left(amqp, topology, "inbound", 2) == [unknown, behind]


async def test_no_bounds_touch_nothing(amqp: AbstractRobustConnection, topology: Topology) -> None:
    letters = [await bury(amqp, topology, "outbound", 30 * 24 * HOUR) for _ in range(2)]

    done = await enforce(amqp, topology, Bounds(max_age=0, max_length=0), Metrics())

    assert done == {"inbound": 0, "outbound": 0}
    assert await left(amqp, topology, "outbound", 2) == letters
