"""Operations events (issue 24, point 3): an integration's operations URL hears, signed as
its responses are, of a response given up on, of an endpoint's circuit opened and closed, and
of the integration disabled by a 410; retried with the same `webhook-id`; never holding a
conversation's deliveries; never sent where the SSRF guard refuses. Real broker, both stores,
real HTTP receivers; the delivery worker and the dispatcher in this process, and once as a
`relay delivery-worker` process."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from typing import Any

import pytest
from standardwebhooks import Webhook

from relay import admin
from relay.metrics import Metrics
from relay.pipeline.breaker import Breakers, Change, endpoint_of
from relay.settings import Settings
from relay.store import DeliveryOptions, SqlStore, open_store
from relay.wire import OutboundEnvelope, WebhookResponse, utcnow
from relay.wire.operations import response_dead
from tests.helpers import (
    Ingress,
    admin_call,
    connected_broker,
    eventually,
    make_integration,
    message,
    push_text,
    start_delivery_worker,
)
from tests.receivers import Hit, Receiver
from tests.ssrf_forms import Listener, listening
from tests.test_cli import relay_processes
from workers.delivery.operations import OperationsDispatcher
from workers.delivery.service import sender_of


@pytest.fixture(autouse=True)
def fresh_receivers(receiver: Receiver, healthy_receiver: Receiver) -> None:
    """Each test sees only its own requests and scripts (responses to `receiver`, events to
    `healthy_receiver`: another origin)."""
    for each in (receiver, healthy_receiver):
        each.hits.clear()
        each.scripts.clear()
        each.hang.clear()
        each.hang_once.clear()


@contextlib.asynccontextmanager
async def dispatching(settings: Settings) -> AsyncIterator[Metrics]:
    """The operations dispatcher in this process (as a delivery worker service runs one);
    its metrics count the events it settled."""
    store = await open_store(settings.database_url)
    sender, metrics = sender_of(settings), Metrics()
    async with connected_broker(settings) as broker:
        dispatcher = OperationsDispatcher(settings, store, broker, sender, metrics)
        dispatcher.start()
        try:
            yield metrics
        finally:
            await dispatcher.stop()
            await sender.close()
            await store.close()


@contextlib.asynccontextmanager
async def delivering(settings: Settings) -> AsyncIterator[Metrics]:
    """A delivery worker and the operations dispatcher."""
    async with start_delivery_worker(settings), dispatching(settings) as metrics:
        yield metrics


async def responses(
    ingress: Ingress,
    store: SqlStore,
    settings: Settings,
    response_url: str,
    operations_url: str,
    count: int = 1,
) -> tuple[str, list[dict[str, Any]]]:
    """An integration with both URLs, and `count` responses pushed in one conversation."""
    integration_id, token = await make_integration(store, settings, response_url=response_url)
    assert await store.set_delivery(integration_id, DeliveryOptions(operations_url=operations_url))
    _, sent = await ingress.post(integration_id, token, message(1, conversationId="ops-conv"))
    bot_token, _ = await admin.create_token(store, integration_id, "bot")
    conversation = sent["conversation"]["id"]
    pushed = [await push_text(ingress, conversation, bot_token, f"r{n}") for n in range(count)]
    return integration_id, pushed


async def hits(receiver: Receiver, path: str, count: int) -> list[Hit] | None:
    found = receiver.at(path)
    return found if len(found) >= count else None


async def verified(store: SqlStore, integration_id: str, hit: Hit) -> dict[str, Any]:
    """The event a hit carries, once its signature verifies with the integration's secret."""
    integration = await store.get_integration(integration_id)
    assert integration is not None
    event: dict[str, Any] = Webhook(integration.signing_secret).verify(hit.raw, hit.headers)
    assert set(event) == {"type", "timestamp", "data"}
    assert hit.headers["webhook-id"].startswith("evt_")
    return event


def parsed(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


async def test_a_response_given_up_on_is_told_signed_and_retried_with_the_same_id(
    ingress: Ingress,
    store: SqlStore,
    settings: Settings,
    receiver: Receiver,
    healthy_receiver: Receiver,
):
    integration_id, [pushed] = await responses(
        ingress,
        store,
        settings,
        receiver.on("refuses", 400),
        healthy_receiver.on("ops-dead", 503),  # the first attempt fails: told again
    )
    async with delivering(settings):
        first, second = await eventually(lambda: hits(healthy_receiver, "ops-dead", 2))
    assert first.status == 503
    assert second.status == 200
    assert first.headers["webhook-id"] == second.headers["webhook-id"]
    assert first.raw == second.raw
    event = await verified(store, integration_id, second)
    assert event["type"] == "relay.response.dead"
    assert event["data"] == {
        "integrationId": integration_id,
        "webhookId": f"msg_{pushed['id']}",
        "conversationId": "ops-conv",
        "botpressConversationId": pushed["conversationId"],
        "botpressMessageId": pushed["id"],
        "sequence": pushed["sequence"],
        "reason": "the endpoint answered 400",
        "lastStatus": 400,
        "attempts": 1,
    }
    [answered] = receiver.at("refuses")
    assert first.headers["webhook-id"] != answered.headers["webhook-id"]


async def test_an_endpoints_circuit_opened_then_closed_is_told(
    ingress: Ingress,
    store: SqlStore,
    settings: Settings,
    receiver: Receiver,
    healthy_receiver: Receiver,
):
    tripping = settings.model_copy(
        update={"breaker_threshold": 2, "delivery_retry_schedule": [0, 0.2, 0.2, 0.2, 0.2]}
    )
    integration_id, _ = await responses(
        ingress, store, settings, receiver.on("tripping", 500, 500), healthy_receiver.on("ops-cb")
    )
    async with delivering(tripping):
        events = await eventually(lambda: hits(healthy_receiver, "ops-cb", 2), timeout=20)
        await eventually(lambda: hits(receiver, "tripping", 3))
    told = sorted([await verified(store, integration_id, hit) for hit in events], key=_at)
    assert [e["type"] for e in told] == [
        "relay.endpoint.circuit_opened",
        "relay.endpoint.circuit_closed",
    ]
    opened, closed = told[0]["data"], told[1]["data"]
    endpoint = endpoint_of(receiver.base)
    assert opened["integrationId"] == closed["integrationId"] == integration_id
    assert opened["endpoint"] == closed["endpoint"] == endpoint
    assert closed["openedAt"] == opened["openedAt"]
    cooldown = parsed(opened["probeAt"]) - parsed(opened["openedAt"])
    assert cooldown == timedelta(seconds=settings.breaker_cooldown)
    assert parsed(closed["closedAt"]) >= parsed(opened["probeAt"])
    assert receiver.at("tripping")[-1].status == 200  # the probe, delivered


def _at(event: dict[str, Any]) -> str:
    return str(event["timestamp"])


async def test_a_410_disables_the_integration_and_is_told_once(
    ingress: Ingress,
    store: SqlStore,
    settings: Settings,
    receiver: Receiver,
    healthy_receiver: Receiver,
):
    integration_id, pushed = await responses(
        ingress, store, settings, receiver.on("gone", 410), healthy_receiver.on("ops-gone"), 2
    )
    async with delivering(settings):
        found = await eventually(lambda: hits(healthy_receiver, "ops-gone", 3))
    events = [await verified(store, integration_id, hit) for hit in found]
    [disabled] = [e["data"] for e in events if e["type"] == "relay.integration.disabled"]
    dead = {e["data"]["webhookId"]: e["data"] for e in events if e["type"] == "relay.response.dead"}
    record = await store.get_integration(integration_id)
    assert record is not None
    assert record.disabled_at is not None
    assert disabled["integrationId"] == integration_id
    assert disabled["reason"] == "gone"
    assert abs(parsed(disabled["disabledAt"]) - record.disabled_at) < timedelta(milliseconds=1)
    first, second = (f"msg_{p['id']}" for p in pushed)
    assert dead[first]["lastStatus"] == 410
    assert dead[first]["reason"] == "410 Gone: endpoint disabled"
    # The one behind it was never sent: it died with its integration disabled.
    assert dead[second]["lastStatus"] is None
    assert dead[second]["attempts"] == 0
    assert len(receiver.at("gone")) == 1


async def test_an_operations_endpoint_that_hangs_does_not_slow_the_deliveries(
    ingress: Ingress,
    store: SqlStore,
    settings: Settings,
    receiver: Receiver,
    healthy_receiver: Receiver,
):
    # Were an event sent in the response's lane, each would hold it for this timeout.
    slow = settings.model_copy(update={"delivery_timeout": 6.0})
    healthy_receiver.hang.add("ops-down")
    await responses(
        ingress,
        store,
        settings,
        receiver.on("behind", 400, 400, 200, 200),
        healthy_receiver.url("ops-down"),
        4,
    )
    async with delivering(slow):
        delivered = await eventually(lambda: hits(receiver, "behind", 4))
        await eventually(lambda: hits(healthy_receiver, "ops-down", 2))  # both told, hanging
    assert [hit.status for hit in delivered] == [400, 400, 200, 200]
    assert [hit.body["sequence"] for hit in delivered] == [1, 2, 3, 4]
    assert delivered[-1].at - delivered[0].at < 2.0


async def test_an_operations_url_the_ssrf_guard_refuses_is_never_called(
    ingress: Ingress, store: SqlStore, settings: Settings
):
    guarded = settings.model_copy(update={"allowed_endpoint_networks": []})
    async with listening() as internal:
        await responses(
            ingress,
            store,
            settings,
            internal.url("http://127.0.0.1:{port}/responses"),
            _ops(internal),
        )
        async with delivering(guarded) as metrics:
            await eventually(lambda: _dropped(metrics))
        assert internal.connections == 0


def _ops(internal: Listener) -> str:
    return internal.url("http://127.0.0.1:{port}/operations")


async def _dropped(metrics: Metrics) -> bool:
    sample = metrics.registry.get_sample_value
    return (
        sample("relay_messages_consumed_total", {"stage": "operations", "outcome": "drop"}) or 0
    ) >= 1


async def test_a_delivery_worker_process_tells_a_give_up_and_a_circuit(
    ingress: Ingress,
    store: SqlStore,
    settings: Settings,
    receiver: Receiver,
    healthy_receiver: Receiver,
):
    integration_id, [pushed] = await responses(
        ingress,
        store,
        settings,
        receiver.on("down", *[500] * 10),
        healthy_receiver.on("ops-process"),
    )
    env = {
        "RELAY_ALLOWED_ENDPOINT_NETWORKS": "127.0.0.0/8",
        "RELAY_BREAKER_THRESHOLD": "2",
        "RELAY_DELIVERY_RETRY_SCHEDULE": "0,0.2,0.2",
        "RELAY_LOG_LEVEL": "warning",
    }
    async with relay_processes(settings, "delivery-worker", 1, env):
        found = await eventually(lambda: hits(healthy_receiver, "ops-process", 2), timeout=30)
    events = {
        e["type"]: e["data"] for e in [await verified(store, integration_id, h) for h in found]
    }
    assert events["relay.endpoint.circuit_opened"]["endpoint"] == endpoint_of(receiver.base)
    dead = events["relay.response.dead"]
    assert dead["webhookId"] == f"msg_{pushed['id']}"
    assert dead["lastStatus"] == 500
    assert dead["reason"] == "gave up after 3 attempts: the endpoint answered 500"


def test_a_circuit_changes_once_when_it_opens_and_once_when_it_closes():
    now = [0.0]
    breakers = Breakers(threshold=2, cooldown=10, cap=4, clock=lambda: now[0])

    def attempt(success: bool) -> Change | None:
        assert breakers.acquire("e") is None
        return breakers.release("e", success=success)

    assert attempt(False) is None
    assert attempt(False) is Change.OPENED
    now[0] += 10
    assert attempt(False) is None  # a failed probe: open again, never closed meanwhile
    now[0] += 10
    assert attempt(True) is Change.CLOSED
    assert attempt(True) is None


def test_a_dead_response_is_the_same_event_until_it_is_replayed():
    body = WebhookResponse(
        type="text",
        payload={"text": "hi"},
        conversationId="c",
        botpressUserId="u",
        botpressMessageId="m",
        botpressConversationId="bc",
        sequence=1,
    )
    envelope = OutboundEnvelope(
        integrationId="i", deliveryId="msg_m", body=body, createdAt=utcnow()
    )
    told = response_dead(envelope, "gave up", 500, 3, utcnow())
    again = response_dead(envelope, "gave up", 500, 3, utcnow() + timedelta(seconds=5))
    replayed = envelope.model_copy(update={"createdAt": utcnow() + timedelta(hours=1)})
    assert told.webhookId == again.webhookId
    assert response_dead(replayed, "gave up", 500, 3, utcnow()).webhookId != told.webhookId


async def test_an_operator_s_disable_is_told_once(
    ingress: Ingress,
    store: SqlStore,
    settings: Settings,
    healthy_receiver: Receiver,
    admin_token: str,
):
    integration_id, _ = await make_integration(store, settings)
    ops = healthy_receiver.url("operator-ops")
    assert await store.set_delivery(integration_id, DeliveryOptions(operations_url=ops))
    path = f"/integrations/{integration_id}"
    async with dispatching(settings):
        for _ in range(2):  # the second finds it disabled already: nothing to tell
            status, view = await admin_call(ingress, "PATCH", path, admin_token, {"enabled": False})
            assert status == 200
            assert view["enabled"] is False
        [hit] = await eventually(lambda: hits(healthy_receiver, "operator-ops", 1))
        event = await verified(store, integration_id, hit)
    assert event["type"] == "relay.integration.disabled"
    assert event["data"]["reason"] == "operator"
    assert event["data"]["integrationId"] == integration_id
    assert healthy_receiver.at("operator-ops") == [hit]
