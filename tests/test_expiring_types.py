"""Typing that expires (`expiringTypes`): an undelivered response of an expiring type is
dropped past its time to live (state `expired`, counted, in the history and the timeline),
and the responses behind it are delivered without waiting for it; in a worker and in a
`relay delivery-worker` process."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from relay import admin
from relay.metrics import Metrics
from relay.pipeline.settle import Outcome, Verdict
from relay.settings import Settings
from relay.store import DeliveryOptions, IntegrationRecord, SqlStore
from relay.wire import DUE_HEADER, OutboundEnvelope, WebhookResponse, utcnow
from tests.helpers import (
    Ingress,
    Queues,
    admin_call,
    eventually,
    make_integration,
    message,
    push_text,
    start_delivery_worker,
)
from tests.receivers import Receiver
from tests.test_delivery_processes import delivery_workers
from workers.delivery.expiry import Expiry, expires_at

TTL = 1.0  # seconds a typing response lives in these tests


@pytest.fixture(autouse=True)
def fresh_receiver(receiver: Receiver) -> None:
    receiver.hits.clear()
    receiver.scripts.clear()


async def push(
    ingress: Ingress, conversation_id: str, bot_token: str, type_: str, payload: dict[str, Any]
) -> dict[str, Any]:
    """A response through the bot push API (asserting 201); the stored message."""
    async with ingress.http.post(
        f"{ingress.url}/bot/conversations/{conversation_id}/messages",
        json={"type": type_, "payload": payload},
        headers={"Authorization": f"Bearer {bot_token}"},
    ) as answer:
        assert answer.status == 201, await answer.text()
        stored: dict[str, Any] = (await answer.json())["message"]
        return stored


async def typing_then_text(
    ingress: Ingress, store: SqlStore, settings: Settings, url: str, conversation: str
) -> tuple[str, str, str]:
    """An integration whose typing responses live `TTL` seconds: (integration id, typing
    webhook-id, text webhook-id), the typing pushed first."""
    integration_id, token = await make_integration(store, settings, response_url=url)
    await store.set_delivery(integration_id, DeliveryOptions(expiring_types={"typing": TTL}))
    _, sent = await ingress.post(integration_id, token, message(1, conversationId=conversation))
    bot_token, _ = await admin.create_token(store, integration_id, "bot")
    relay_conversation = sent["conversation"]["id"]
    typing = await push(ingress, relay_conversation, bot_token, "typing", {"value": True})
    text = await push_text(ingress, relay_conversation, bot_token, "after the outage")
    return integration_id, f"msg_{typing['id']}", f"msg_{text['id']}"


def outcomes(receiver: Receiver, path: str, webhook_id: str) -> list[int]:
    """The statuses the endpoint answered the response's attempts, in order."""
    return [h.status for h in receiver.at(path) if h.headers["webhook-id"] == webhook_id]


async def delivery_states(
    ingress: Ingress, store: SqlStore, integration_id: str, conversation: str
) -> dict[str, str]:
    """Each response's delivery state in the conversation's history (conversation API)."""
    token, _ = await admin.create_token(store, integration_id, "integration")
    async with ingress.http.get(
        f"{ingress.url}/webhooks/{integration_id}/conversations/{conversation}/messages",
        headers={"Authorization": f"Bearer {token}"},
    ) as answer:
        assert answer.status == 200
        items = (await answer.json())["messages"]
    return {i["webhookId"]: i["delivery"]["state"] for i in items if i["direction"] == "outgoing"}


async def test_a_typing_response_expires_while_the_circuit_is_open_and_the_text_goes_on(
    ingress: Ingress, store: SqlStore, settings: Settings, receiver: Receiver, admin_token: str
):
    # One failure opens the circuit for longer than the typing lives: its retry finds the
    # circuit open, and waiting for the circuit would take it past its time to live.
    opened = settings.model_copy(update={"breaker_threshold": 1, "breaker_cooldown": 2.0})
    url = receiver.on("open", 503)
    async with start_delivery_worker(opened) as worker:
        integration_id, typing, text = await typing_then_text(
            ingress, store, settings, url, "expiring-1"
        )
        await eventually(lambda: _answered(receiver, "open", text, 200), timeout=15)
        sample = worker.metrics.registry.get_sample_value
        assert sample("relay_responses_expired_total", {"type": "typing"}) == 1
    assert outcomes(receiver, "open", typing) == [503]  # tried once, then never again
    assert outcomes(receiver, "open", text) == [200]
    states = await delivery_states(ingress, store, integration_id, "expiring-1")
    assert states == {typing: "expired", text: "delivered"}
    status, timeline = await admin_call(
        ingress, "GET", f"/integrations/{integration_id}/conversations/expiring-1", admin_token
    )
    assert status == 200
    shown = {m["webhookId"]: m["delivery"]["state"] for m in timeline["messages"][1:]}
    assert shown == states
    # Nothing waits behind it any more, and a recovery does not send it again.
    conversation = await store.find_conversation(integration_id, "expiring-1")
    assert conversation is not None
    assert await store.undelivered(conversation, utcnow() - timedelta(hours=1)) == []
    assert await store.given_up_since(integration_id, utcnow() - timedelta(hours=1)) == []


async def _answered(receiver: Receiver, path: str, webhook_id: str, status: int) -> bool:
    return status in outcomes(receiver, path, webhook_id)


async def test_after_an_outage_a_worker_process_drops_the_typing_and_delivers_the_text(
    ingress: Ingress, store: SqlStore, settings: Settings, queues: Queues, receiver: Receiver
):
    url = receiver.on("outage", *[503] * 1000)
    patient = settings.model_copy(update={"delivery_retry_schedule": [0] + [0.4] * 20})
    async with delivery_workers(patient, 1):
        await eventually(lambda: queues.all_consumed("outbound"), timeout=30)
        integration_id, typing, text = await typing_then_text(
            ingress, store, settings, url, "expiring-2"
        )

        async def typing_expired() -> bool:
            states = await delivery_states(ingress, store, integration_id, "expiring-2")
            return states[typing] == "expired"

        await eventually(typing_expired, timeout=15, interval=0.1)
        assert 503 in outcomes(receiver, "outage", typing)
        receiver.scripts["outage"].clear()  # the endpoint is back
        await eventually(lambda: _answered(receiver, "outage", text, 200), timeout=15)
    assert 200 not in outcomes(receiver, "outage", typing)
    states = await delivery_states(ingress, store, integration_id, "expiring-2")
    assert states == {typing: "expired", text: "delivered"}


async def test_an_expired_response_stays_expired_and_waits_no_more(
    ingress: Ingress, store: SqlStore, settings: Settings
):
    integration_id, token = await make_integration(store, settings)
    _, sent = await ingress.post(integration_id, token, message(1, conversationId="expiring-3"))
    conversation = await store.get_conversation(sent["conversation"]["id"])
    assert conversation is not None
    # Stored, not published: no worker of this module meets them.
    typing, _ = await store.record_pushed(conversation, "typing", {"value": True}, None)
    text, _ = await store.record_pushed(conversation, "text", {"text": "hi"}, None)
    since = utcnow() - timedelta(hours=1)
    waiting = await store.waiting_responses([integration_id, "none"], since)
    assert waiting == {integration_id: 2, "none": 0}
    await store.mark_expired(typing.id, utcnow())
    # Its publisher's queued mark, written after a worker dropped it, leaves it expired.
    await store.mark_queued([typing.id, text.id])
    assert await store.waiting_responses([integration_id], since) == {integration_id: 1}
    assert [u.message_id for u in await store.undelivered(conversation.id, since)] == [text.id]
    states = await delivery_states(ingress, store, integration_id, "expiring-3")
    assert states == {f"msg_{typing.id}": "expired", f"msg_{text.id}": "pending"}


class Marks:
    def __init__(self) -> None:
        self.expired: list[str] = []

    async def mark_expired(self, message_id: str, expired_at: object) -> None:
        self.expired.append(message_id)


def envelope(type_: str, age: float) -> OutboundEnvelope:
    body = WebhookResponse(
        type=type_,
        payload={},
        conversationId="c",
        botpressUserId="u",
        botpressMessageId=f"{type_}-id",
        botpressConversationId="bc",
        sequence=1,
    )
    created = utcnow() - timedelta(seconds=age)
    return OutboundEnvelope(integrationId="i", deliveryId="d", body=body, createdAt=created)


def integration(expiring: dict[str, float]) -> IntegrationRecord:
    return IntegrationRecord(
        id="i",
        name="n",
        response_url="http://127.0.0.1:9/r",
        signing_secret="s",
        created_at=utcnow(),
        delivery=DeliveryOptions(expiring_types=expiring),
    )


def wait(seconds: float, outcome: Outcome = Outcome.WAIT) -> Verdict:
    due = int((utcnow() + timedelta(seconds=seconds)).timestamp() * 1000)
    return Verdict(outcome, delay=1, reason="endpoint open", headers={DUE_HEADER: due})


async def test_expiry_drops_a_response_past_its_time_or_waiting_past_it():
    marks, metrics = Marks(), Metrics()
    expiry = Expiry(marks, metrics)
    typing, fresh = envelope("typing", age=40), envelope("typing", age=1)
    defaults = integration({"typing": 30})
    assert expires_at(envelope("text", 40), defaults) is None
    assert (await expiry.now(fresh, defaults)) is None
    dropped = await expiry.now(typing, defaults)
    assert dropped is not None
    assert dropped.outcome is Outcome.DROP
    # A wait or a retry ending before its time keeps it; one ending after drops it now.
    assert (await expiry.instead(fresh, defaults, wait(10))).outcome is Outcome.WAIT
    assert (await expiry.instead(fresh, defaults, wait(60, Outcome.RETRY))).outcome is Outcome.DROP
    # Other verdicts, and types that do not expire, are left alone.
    done = Verdict(Outcome.DONE)
    assert await expiry.instead(fresh, defaults, done) is done
    assert (await expiry.instead(fresh, integration({}), wait(60))).outcome is Outcome.WAIT
    assert marks.expired == ["typing-id", "typing-id"]
    assert (
        metrics.registry.get_sample_value("relay_responses_expired_total", {"type": "typing"}) == 2
    )
