"""Scale-out: 2 ingresses, 3 bot workers and 3 delivery workers as separate `relay`
processes on one RabbitMQ and one PostgreSQL; 5,000 messages over 100 conversations,
while a worker of each kind joins and another leaves on SIGTERM.

Every response must arrive, none twice under different webhook-ids, each conversation's
responses in order, and the partitions must really move: the workers that join end up
holding partitions (they can only get them handed over by the others), and the bot worker
consuming.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest

from relay.settings import Settings
from relay.store import SqlStore
from relay.store.postgres import drop_schema
from tests.fleet import Service, fleet, sample
from tests.helpers import eventually, make_integration, message
from tests.receivers import Hit, Receiver

CONVERSATIONS = 100
PER_CONVERSATION = 50


@pytest.fixture(scope="module")
async def database_url(postgres_server: str) -> AsyncIterator[str]:
    """Several machines' worth of processes: PostgreSQL only."""
    schema = "t_" + uuid.uuid4().hex[:12]
    yield f"{postgres_server}?schema={schema}"
    await drop_schema(postgres_server, schema)


async def reached(count: list[int], target: int) -> bool:
    return count[0] >= target


@dataclass(frozen=True)
class Sender:
    """Posts one message to a conversation of its own, after the stream."""

    client: aiohttp.ClientSession
    url: str
    integration_id: str
    token: str

    async def post(self, conversation: str) -> None:
        body = message(conversation, conversationId=conversation, text="later")
        async with self.client.post(
            f"{self.url}/webhooks/{self.integration_id}",
            json=body,
            headers={"Authorization": f"Bearer {self.token}"},
        ) as answer:
            assert answer.status == 200, await answer.text()


def check_once_and_in_order(hits: list[Hit], total: int) -> None:
    """Every response once under one webhook-id, each conversation's in order."""
    ids: dict[str, set[str]] = {}
    for hit in hits:
        ids.setdefault(hit.body["botpressMessageId"], set()).add(hit.headers["webhook-id"])
    assert len(ids) == 2 * total
    assert all(len(webhook_ids) == 1 for webhook_ids in ids.values())
    # Each conversation's responses, in the order they first arrived.
    first_seen: dict[str, list[dict[str, Any]]] = {}
    seen: set[str] = set()
    for hit in hits:
        if hit.body["botpressMessageId"] not in seen:
            seen.add(hit.body["botpressMessageId"])
            first_seen.setdefault(hit.body["conversationId"], []).append(hit.body)
    assert len(first_seen) == CONVERSATIONS
    for c in range(CONVERSATIONS):
        bodies = first_seen[f"scale-{c}"]
        assert [b["sequence"] for b in bodies] == list(range(1, 2 * PER_CONVERSATION + 1))
        texts = [b["payload"]["text"] for b in bodies if b["type"] == "text"]
        assert texts == [f"echo: {c}:{n}" for n in range(PER_CONVERSATION)]


@pytest.mark.timeout(600)
async def test_5000_messages_through_a_changing_fleet_arrive_once_and_in_order(
    settings: Settings, store: SqlStore, receiver: Receiver
):
    receiver.hits.clear()
    integration_id, token = await make_integration(
        store, settings, response_url=receiver.url("scale")
    )
    total = CONVERSATIONS * PER_CONVERSATION
    async with fleet(settings) as services, aiohttp.ClientSession() as client:
        ingresses = [await services.start("ingress") for _ in range(2)]
        bots = [await services.start("bot-worker") for _ in range(3)]
        deliverers = [await services.start("delivery-worker") for _ in range(3)]
        posted = [0]
        joined: list[Service] = []
        left_codes: list[int] = []

        async def conversation(c: int) -> None:
            for n in range(PER_CONVERSATION):
                ingress = ingresses[(c + n) % 2]
                body = message(f"{c}-{n}", conversationId=f"scale-{c}", text=f"{c}:{n}")
                async with client.post(
                    f"{ingress.url}/webhooks/{integration_id}",
                    json=body,
                    headers={"Authorization": f"Bearer {token}"},
                ) as answer:
                    assert answer.status == 200, await answer.text()
                posted[0] += 1

        async def change_the_fleet() -> None:
            await eventually(lambda: reached(posted, total // 3), timeout=300, interval=0.1)
            joined.append(await services.start("bot-worker"))
            joined.append(await services.start("delivery-worker"))
            await eventually(lambda: reached(posted, 2 * total // 3), timeout=300, interval=0.1)
            stopped = await asyncio.gather(services.stop(bots[0]), services.stop(deliverers[0]))
            left_codes.extend(stopped)

        await asyncio.gather(change_the_fleet(), *[conversation(c) for c in range(CONVERSATIONS)])

        async def delivered() -> bool:
            return len({hit.body["botpressMessageId"] for hit in receiver.at("scale")}) >= 2 * total

        await eventually(delivered, timeout=300, interval=0.5)
        assert left_codes == [0, 0]  # SIGTERM: finished or returned what they held, exit 0

        # A delivery worker keeps a partition while a conversation of it waits in a delay
        # queue holding its order (that hold is in its memory only): under a steady stream
        # to one busy endpoint that can be all of them, so the one that joined may get its
        # share only once the stream ends. A worker knows it holds a partition only once
        # a message of it comes (the broker does not say who its active consumer is), so
        # a trickle of new conversations follows the stream until it has.
        rounds = [0]

        async def holds_outbound() -> bool:
            metrics = await services.metrics(joined[1])
            if sample(metrics, "relay_partitions_held", stage="outbound") >= 1:
                return True
            rounds[0] += 1
            sender = Sender(client, ingresses[0].url, integration_id, token)
            await asyncio.gather(*[sender.post(f"later-{c}-{rounds[0]}") for c in range(20)])
            return False

        await eventually(holds_outbound, timeout=60, interval=1.0)
        bot_metrics = await services.metrics(joined[0])
        delivery_metrics = await services.metrics(joined[1])
        ingress_metrics = await services.metrics(ingresses[0])

    hits = [hit for hit in receiver.at("scale") if hit.body["conversationId"].startswith("scale-")]
    check_once_and_in_order(hits, total)
    # The workers that joined got partitions handed over, and worked.
    done = sample(bot_metrics, "relay_messages_consumed_total", stage="inbound", outcome="done")
    assert done > 0
    assert sample(bot_metrics, "relay_partitions_held", stage="inbound") >= 1
    assert sample(delivery_metrics, "relay_partitions_held", stage="outbound") >= 1
    # Every service watches the queues: nothing was dead-lettered.
    for stage in ("inbound", "outbound"):
        assert sample(delivery_metrics, "relay_dead_letters", stage=stage) == 0
    route = "/webhooks/{integrationId}"
    requests = sample(
        ingress_metrics, "relay_http_requests_total", method="POST", route=route, status="200"
    )
    assert requests > 0
