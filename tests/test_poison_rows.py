"""No poison row: a stored message that can never be published is ended dead with its
reason, never retried for ever, and holds up no sweep, no conversation and no reader.

The rows are written as an older Relay could have written them (a payload nested past what
any serializer takes, or text no parser reads), through the store, below the input contract.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import pytest

from relay.broker import Broker, StageName
from relay.errors import InvalidBody
from relay.ingress.accept import Acceptor
from relay.metrics import Metrics
from relay.pipeline.dlq import DeadLetters
from relay.settings import Settings
from relay.store import (
    ConversationRecord,
    DeadLetter,
    DeadLetterFilter,
    OutgoingRecord,
    SqlStore,
)
from relay.wire import InboundRequest, utcnow
from tests.helpers import (
    Ingress,
    Queues,
    admin_call,
    connected_broker,
    eventually,
    keeping_dead_letters,
    make_integration,
    message,
    start_bot_worker,
)
from tests.sse import open_stream
from tests.test_input_contract import nested

POISON_DEPTH = 300  # what the outside review's request left in the outbox


@pytest.fixture(scope="module")
async def broker(settings: Settings) -> AsyncIterator[Broker]:
    # The dead letters' keepers run meanwhile, as the worker services run them.
    async with keeping_dead_letters(settings), connected_broker(settings) as connected:
        yield connected


def request_below_the_contract(n: str, payload: dict[str, Any]) -> InboundRequest:
    """A request the edge would refuse today, as an older Relay took it."""
    fields = {**message(n), "payload": payload}
    return InboundRequest.model_construct(**fields)


async def stale_pending_inbound(
    store: SqlStore, settings: Settings, integration_id: str, n: str, payload: dict[str, Any]
) -> str:
    """A pending inbound row whose publisher died: its lease ran out a minute ago."""
    request = request_below_the_contract(n, payload)
    accepted = await store.accept_incoming(
        integration_id, request, utcnow(), None, settings.partitions
    )
    await set_columns(
        store, accepted.bundle.message.id, lease_until=utcnow() - timedelta(minutes=1)
    )
    return accepted.bundle.message.id


async def conversation_of(
    ingress: Ingress, store: SqlStore, integration: tuple[str, str], n: str
) -> ConversationRecord:
    """The conversation a message accepted by the ingress started."""
    status, answer = await ingress.post(*integration, message(n))
    assert status == 200, answer
    conversation = await store.get_conversation(answer["conversation"]["id"])
    assert conversation is not None
    return conversation


async def stale_response(
    store: SqlStore, settings: Settings, conversation: ConversationRecord, payload: dict[str, Any]
) -> OutgoingRecord:
    """A response stored a minute ago and never confirmed by the broker (the outbox's)."""
    record, _ = await store.record_pushed(conversation, "text", payload, None, settings.partitions)
    await set_columns(store, record.id, created_at=utcnow() - timedelta(minutes=1))
    return record


def poison_payload() -> dict[str, Any]:
    return {"text": "x", "deep": nested(POISON_DEPTH)}


async def set_columns(store: SqlStore, message_id: str, **values: Any) -> None:
    columns = ", ".join(f"{name} = ?" for name in values)
    async with store.driver.connection() as conn:
        await conn.execute(
            f"UPDATE messages SET {columns} WHERE id = ?", *values.values(), message_id
        )


async def row(store: SqlStore, message_id: str) -> dict[str, Any]:
    async with store.driver.connection() as conn:
        found = await conn.fetchone(
            "SELECT state, dead_at, handled_at FROM messages WHERE id = ?", message_id
        )
    assert found is not None
    return dict(found)


async def ended_dead(store: SqlStore, message_id: str) -> None:
    """Wait for the row to be marked dead: a burial publishes the letter first, then marks
    the row, so the letter can be kept (and seen) before the mark is written."""

    async def marked() -> bool:
        return (await row(store, message_id))["dead_at"] is not None

    await eventually(marked, timeout=15)


def only(stage: StageName, letter_id: str) -> DeadLetterFilter:
    return DeadLetterFilter(stage, ids=frozenset({letter_id}))


async def letter(store: SqlStore, stage: StageName, letter_id: str) -> DeadLetter | None:
    letters = await DeadLetters(store).page(only(stage, letter_id), 10)
    return letters[0] if letters else None


async def dead_letter_of(store: SqlStore, stage: StageName, letter_id: str) -> DeadLetter:
    found: list[DeadLetter] = []

    async def buried() -> bool:
        got = await letter(store, stage, letter_id)
        found[:] = [got] if got else []
        return bool(found)

    await eventually(buried, timeout=15)
    return found[0]


async def test_a_poison_inbound_row_holds_up_neither_sweep(
    ingress: Ingress,
    store: SqlStore,
    settings: Settings,
    broker: Broker,
    queues: Queues,
) -> None:
    integration = await make_integration(store, settings, name="poison-in")
    integration_id = integration[0]
    poison = await stale_pending_inbound(
        store, settings, integration_id, "poison", {"deep": nested(POISON_DEPTH)}
    )
    fine = await stale_pending_inbound(store, settings, integration_id, "fine", {"text": "fine"})
    # A response stored and never confirmed, behind the poison row in time.
    conversation = await conversation_of(ingress, store, integration, "asks")
    response = await stale_response(store, settings, conversation, {"text": "late"})

    async def swept() -> bool:
        return (await row(store, fine))["state"] == "queued" and (await row(store, response.id))[
            "state"
        ] == "queued"

    await eventually(swept, timeout=15)
    dead = await dead_letter_of(store, "inbound", poison)
    assert dead.reason.startswith("could not be published")
    assert dead.integration_id == integration_id
    await ended_dead(store, poison)
    assert (await row(store, poison))["state"] == "queued"
    published = {item["_message_id"] for item in await queues.take("inbound")}
    assert fine in published
    assert poison not in published


async def test_an_unreadable_inbound_row_is_ended_too(
    ingress: Ingress, store: SqlStore, settings: Settings, broker: Broker
) -> None:
    integration_id, _ = await make_integration(store, settings, name="unreadable")
    corrupt = await stale_pending_inbound(store, settings, integration_id, "corrupt", {"text": "x"})
    await set_columns(store, corrupt, payload="{not json")
    dead = await dead_letter_of(store, "inbound", corrupt)
    assert "cannot be read" in dead.reason
    await ended_dead(store, corrupt)


async def test_a_poison_response_ends_dead_and_the_next_one_goes_readers_see_both(
    ingress: Ingress,
    store: SqlStore,
    settings: Settings,
    broker: Broker,
) -> None:
    integration = await make_integration(store, settings, name="poison-out")
    integration_id, token = integration
    conversation = await conversation_of(ingress, store, integration, "hello")
    poison = await stale_response(store, settings, conversation, poison_payload())
    fine = await stale_response(store, settings, conversation, {"text": "after"})

    dead = await dead_letter_of(store, "outbound", f"msg_{poison.id}")
    assert dead.reason.startswith("could not be published")
    assert dead.conversation_id == conversation.id

    async def fine_published() -> bool:
        return (await row(store, fine.id))["state"] == "queued"

    await eventually(fine_published, timeout=15)
    await ended_dead(store, poison.id)

    path = f"/webhooks/{integration_id}/conversations/{conversation.external_id}"
    headers = {"Authorization": f"Bearer {token}"}
    async with ingress.http.get(f"{ingress.url}{path}/messages", headers=headers) as history:
        assert history.status == 200, await history.text()
        items = (await history.json())["messages"]
    shown = {item["botpressMessageId"]: item for item in items}
    assert shown[poison.id]["payload"] == {}
    assert shown[poison.id]["delivery"]["state"] == "dead"
    assert shown[fine.id]["payload"] == {"text": "after"}
    async with open_stream(ingress.http, f"{ingress.url}{path}/events", headers) as stream:
        events = [event.item for event in await stream.take(len(items))]
    assert [e["botpressMessageId"] for e in events] == [i["botpressMessageId"] for i in items]

    # Listed, never replayed: the letter holds ids, not an envelope.
    letters = DeadLetters(store, broker)
    assert await letters.replay(only("outbound", f"msg_{poison.id}")) == 0
    assert await letter(store, "outbound", f"msg_{poison.id}") is not None


async def test_a_publish_that_fails_for_another_reason_than_the_broker_keeps_nothing(
    store: SqlStore, settings: Settings, broker: Broker
) -> None:
    integration_id, _ = await make_integration(store, settings, name="acceptor")
    acceptor = Acceptor(store, broker, Metrics(), lease=30, wait=2)
    request = request_below_the_contract("deep-accept", {"deep": nested(POISON_DEPTH)})
    with pytest.raises(InvalidBody):
        await acceptor.accept(integration_id, request, None)
    assert await store.find_incoming(integration_id, request.messageId) is None


async def test_an_unreadable_envelope_is_dead_in_the_store_and_holds_up_no_one(
    ingress: Ingress,
    store: SqlStore,
    settings: Settings,
    broker: Broker,
    queues: Queues,
) -> None:
    integration_id, token = await make_integration(store, settings, name="bad-envelope")
    status, first = await ingress.post(integration_id, token, message("first"))
    assert status == 200, first
    await queues.take("inbound")  # no bot worker yet: the envelope is replaced below
    conversation_id, first_id = first["conversation"]["id"], first["message"]["id"]
    await broker.publish("inbound", conversation_id, b"not an envelope", message_id=first_id)
    async with start_bot_worker(settings):
        dead = await dead_letter_of(store, "inbound", first_id)
        assert dead.reason == "not a valid envelope"
        assert (await row(store, first_id))["dead_at"] is not None
        # The same conversation: its next message is not held behind the dead one.
        status, second = await ingress.post(integration_id, token, message("second"))
        assert status == 200, second

        async def handled() -> bool:
            return (await row(store, second["message"]["id"]))["handled_at"] is not None

        await eventually(handled, timeout=10)


async def test_recovering_an_integration_skips_what_can_never_be_published(
    ingress: Ingress, store: SqlStore, settings: Settings, broker: Broker, admin_token: str
) -> None:
    integration = await make_integration(store, settings, name="poison-recover")
    integration_id = integration[0]
    conversation = await conversation_of(ingress, store, integration, "recover")
    poison = await stale_response(store, settings, conversation, poison_payload())
    await dead_letter_of(store, "outbound", f"msg_{poison.id}")
    since = (utcnow() - timedelta(hours=1)).isoformat()
    status, counted = await admin_call(
        ingress, "POST", f"/integrations/{integration_id}/recover", admin_token, {"since": since}
    )
    assert status == 200, counted
    assert counted == {"count": 0}
    assert await letter(store, "outbound", f"msg_{poison.id}") is not None
