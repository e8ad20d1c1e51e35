"""A response the broker dead-letters (past a partition queue's delivery limit) is told to its
integration's operations URL as `relay.response.dead` once the outbound keeper has kept it,
with the broker's reason, under the same `webhook-id` however often it is kept; what a
worker dead-lettered itself (told when it gave it up), an unreadable envelope and an
integration with no operations URL tell nothing from the keeper. Real broker, both stores,
a real receiver; the keeper and the dispatcher in this process, and once as a
`relay delivery-worker` process."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import aio_pika
import pytest
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection

from relay.broker import Broker, BrokerUnavailable, Topology, declare, topology_of
from relay.broker.operations import OperationsEvents
from relay.metrics import Metrics
from relay.pipeline.dlq_keeper import Keeper
from relay.settings import Settings
from relay.store import DeadLetter, DeadLetterFilter, DeliveryOptions, SqlStore, open_store
from relay.wire import (
    ATTEMPTS_HEADER,
    LAST_STATUS_HEADER,
    REASON_HEADER,
    OutboundEnvelope,
    WebhookResponse,
    utcnow,
)
from tests.helpers import declared, eventually, make_integration
from tests.receivers import Hit, Receiver
from tests.test_cli import relay_processes
from tests.test_dead_letters import depth, return_until_gone
from tests.test_operations_events import verified
from workers.delivery.operations import OperationsDispatcher
from workers.delivery.service import sender_of
from workers.delivery.telling import BrokerDeaths


@pytest.fixture(autouse=True)
def fresh_receiver(healthy_receiver: Receiver) -> None:
    healthy_receiver.hits.clear()
    healthy_receiver.scripts.clear()


@pytest.fixture
async def topology(amqp: AbstractRobustConnection, settings: Settings) -> AsyncIterator[Topology]:
    """Queues of the test's own (operations queues included), with a delivery limit of 2 on
    the partition queues."""
    prefix = f"{settings.queue_prefix}-{uuid.uuid4().hex[:6]}"
    own = dataclasses.replace(topology_of(settings), prefix=prefix, delivery_limit=2)
    async with declared(amqp, own):
        yield own


@dataclasses.dataclass
class Keeping:
    metrics: Metrics  # the keeper's

    def kept(self, cause: str) -> float:
        labels = {"stage": "outbound", "cause": cause}
        return self.metrics.registry.get_sample_value("relay_dead_letters_kept_total", labels) or 0


@pytest.fixture
async def keeping(
    topology: Topology, store: SqlStore, settings: Settings
) -> AsyncIterator[Keeping]:
    """The outbound keeper of `topology`, telling as the delivery worker service's does."""
    broker = Broker(settings.amqp_url, topology, settings.publish_timeout)
    broker.start()
    metrics = Metrics()
    telling = BrokerDeaths(store, OperationsEvents(broker))
    keeper = Keeper(store, broker, "outbound", metrics, telling)
    keeper.start()
    try:
        yield Keeping(metrics)
    finally:
        await keeper.stop()
        await broker.close()


@contextlib.asynccontextmanager
async def dispatching(settings: Settings, topology: Topology) -> AsyncIterator[None]:
    """The operations dispatcher of `topology`, as a delivery worker service runs one."""
    store = await open_store(settings.database_url)
    sender = sender_of(settings)
    broker = Broker(settings.amqp_url, topology, settings.publish_timeout)
    broker.start()
    dispatcher = OperationsDispatcher(settings, store, broker, sender, Metrics())
    dispatcher.start()
    try:
        yield
    finally:
        await dispatcher.stop()
        await sender.close()
        await broker.close()
        await store.close()


async def listening_integration(store: SqlStore, settings: Settings, url: str | None) -> str:
    delivery = DeliveryOptions(operations_url=url)
    integration_id, _ = await make_integration(store, settings, delivery=delivery)
    return integration_id


def envelope_of(integration_id: str) -> OutboundEnvelope:
    """A response of the integration, as the bot worker queues it."""
    message_id = uuid.uuid4().hex[:12]
    body = WebhookResponse(
        type="text",
        payload={"text": "hi"},
        conversationId="their-conv",
        botpressUserId="u",
        botpressMessageId=message_id,
        botpressConversationId=f"conv-{message_id}",
        sequence=3,
    )
    return OutboundEnvelope(
        integrationId=integration_id, deliveryId=f"msg_{message_id}", body=body, createdAt=utcnow()
    )


def deaths(queue: str) -> dict[str, Any]:
    """The `x-death` header the broker sets on a message dead-lettered past its limit."""
    death = {
        "reason": "delivery_limit",
        "queue": queue,
        "count": 1,
        "exchange": "",
        "routing-keys": [queue],
        "time": datetime.now(UTC),
    }
    return {"x-death": [death]}


async def bury(
    amqp: AbstractRobustConnection,
    topology: Topology,
    body: bytes,
    message_id: str,
    headers: dict[str, Any],
) -> None:
    """Put a letter on the outbound dead-letter queue, as a partition queue dead-letters."""
    async with amqp.channel() as channel:
        exchange = await channel.get_exchange(topology.dead_exchange())
        letter = aio_pika.Message(body, message_id=message_id, headers=headers)
        await exchange.publish(letter, routing_key="outbound")


async def hits(receiver: Receiver, path: str, count: int) -> list[Hit] | None:
    found = receiver.at(path)
    return found if len(found) >= count else None


async def test_a_response_past_the_delivery_limit_is_told_once_however_often_it_is_kept(
    amqp: AbstractRobustConnection,
    topology: Topology,
    store: SqlStore,
    settings: Settings,
    healthy_receiver: Receiver,
    keeping: Keeping,
) -> None:
    integration_id = await listening_integration(
        store,
        settings,
        healthy_receiver.on("ops-limit", 503),  # told again on a 503
    )
    envelope = envelope_of(integration_id)
    body, partition = envelope.model_dump_json().encode(), topology.queue("outbound", 0)
    async with amqp.channel() as channel:
        message = aio_pika.Message(body, message_id=envelope.deliveryId)
        await channel.default_exchange.publish(message, routing_key=partition)
    # Returned past its limit of 2: the broker dead-letters it, with its own reason.
    assert await return_until_gone(amqp, partition, 10) == 3
    await eventually(lambda: _kept(keeping, 1))
    # Carried a second time (a keeper stopped before its ack): kept and told again.
    await bury(amqp, topology, body, envelope.deliveryId, deaths(partition))
    await eventually(lambda: _kept(keeping, 2))
    async with dispatching(settings, topology):
        found = await eventually(lambda: hits(healthy_receiver, "ops-limit", 3), timeout=15)
    assert [hit.status for hit in found] == [503, 200, 200]
    # One event, however often it is sent: the receiver deduplicates on its `webhook-id`.
    assert len({hit.headers["webhook-id"] for hit in found}) == 1
    events = [await verified(store, integration_id, hit) for hit in found]
    selection = DeadLetterFilter("outbound", ids=frozenset({envelope.deliveryId}))
    [letter] = await store.dead_letters(selection, None, 10)
    assert letter.deaths == 2
    for event in events:
        assert event["type"] == "relay.response.dead"
        assert event["data"] == {
            "integrationId": integration_id,
            "webhookId": envelope.deliveryId,
            "conversationId": "their-conv",
            "botpressConversationId": envelope.body.botpressConversationId,
            "botpressMessageId": envelope.body.botpressMessageId,
            "sequence": 3,
            "reason": letter.reason,
            "lastStatus": None,
            "attempts": 0,
        }
    assert letter.reason.startswith("delivery_limit"), letter.reason
    assert partition in letter.reason


async def _kept(keeping: Keeping, count: int) -> bool:
    return keeping.kept("broker") == count


async def test_only_broker_deaths_of_listening_integrations_are_told(
    amqp: AbstractRobustConnection,
    topology: Topology,
    store: SqlStore,
    settings: Settings,
    healthy_receiver: Receiver,
    keeping: Keeping,
) -> None:
    listening = await listening_integration(store, settings, healthy_receiver.url("ops-only"))
    deaf = await listening_integration(store, settings, None)
    partition = topology.queue("outbound", 0)
    # Given up on by a worker, which told of it then: the keeper tells nothing more.
    own = envelope_of(listening)
    relays = {
        REASON_HEADER: "the endpoint answered 400",
        ATTEMPTS_HEADER: 1,
        LAST_STATUS_HEADER: 400,
    }
    await bury(amqp, topology, own.model_dump_json().encode(), own.deliveryId, relays)
    told = envelope_of(listening)
    unknown = envelope_of(f"int-gone-{uuid.uuid4().hex[:6]}")  # the dispatcher looks
    for envelope in (told, envelope_of(deaf), unknown):
        body = envelope.model_dump_json().encode()
        await bury(amqp, topology, body, envelope.deliveryId, deaths(partition))
    await bury(amqp, topology, b"not an envelope", "unreadable", deaths(partition))
    await eventually(lambda: _all_kept(keeping))
    # Each event is queued before its letter is acked and counted: all of them are there.
    queue = topology.operations_exchange  # the queue bears its name
    assert await depth(amqp, queue) == 2
    async with amqp.channel() as channel:
        events = await channel.get_queue(queue)
        queued = [json.loads((await events.get(no_ack=True)).body) for _ in range(2)]
    assert sorted(e["event"]["data"]["webhookId"] for e in queued) == sorted(
        [told.deliveryId, unknown.deliveryId]
    )
    assert {e["event"]["type"] for e in queued} == {"relay.response.dead"}


async def _all_kept(keeping: Keeping) -> bool:
    return keeping.kept("relay") == 1 and keeping.kept("broker") == 4


async def test_a_delivery_worker_process_tells_a_response_the_broker_dead_lettered(
    amqp: AbstractRobustConnection,
    store: SqlStore,
    settings: Settings,
    healthy_receiver: Receiver,
) -> None:
    integration_id = await listening_integration(
        store, settings, healthy_receiver.url("ops-process")
    )
    envelope = envelope_of(integration_id)
    topology = topology_of(settings)
    async with amqp.channel() as channel:
        await declare(channel, topology)
    partition = topology.queue("outbound", 1)
    env = {"RELAY_ALLOWED_ENDPOINT_NETWORKS": "127.0.0.0/8", "RELAY_LOG_LEVEL": "warning"}
    async with relay_processes(settings, "delivery-worker", 1, env):
        body = envelope.model_dump_json().encode()
        await bury(amqp, topology, body, envelope.deliveryId, deaths(partition))
        [hit] = await eventually(lambda: hits(healthy_receiver, "ops-process", 1), timeout=30)
    event = await verified(store, integration_id, hit)
    assert event["type"] == "relay.response.dead"
    assert event["data"]["webhookId"] == envelope.deliveryId
    assert event["data"]["reason"].startswith("delivery_limit")


class BrokerAway:
    """A telling whose events the broker will not take."""

    def __init__(self) -> None:
        self.tried = 0

    async def broker_dead(self, message: AbstractIncomingMessage, letter: DeadLetter) -> None:
        self.tried += 1
        raise BrokerUnavailable("not connected to the broker")


async def test_an_event_the_broker_will_not_take_neither_loses_nor_holds_the_letter(
    amqp: AbstractRobustConnection, topology: Topology, store: SqlStore, settings: Settings
) -> None:
    broker = Broker(settings.amqp_url, topology, settings.publish_timeout)
    broker.start()
    metrics, away = Metrics(), BrokerAway()
    keeper = Keeper(store, broker, "outbound", metrics, away)
    keeper.start()
    try:
        envelope = envelope_of("int-away")
        body, partition = envelope.model_dump_json().encode(), topology.queue("outbound", 0)
        await bury(amqp, topology, body, envelope.deliveryId, deaths(partition))
        await eventually(lambda: _kept(Keeping(metrics), 1))
    finally:
        await keeper.stop()
        await broker.close()
    assert away.tried == 1
    selection = DeadLetterFilter("outbound", ids=frozenset({envelope.deliveryId}))
    assert len(await store.dead_letters(selection, None, 10)) == 1
    assert await depth(amqp, topology.dead_queue("outbound")) == 0
