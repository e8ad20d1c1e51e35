"""The bot worker against the real broker and both stores: replies, order, retries."""

from __future__ import annotations

import json

import aio_pika
from aio_pika.abc import AbstractRobustConnection

from relay.broker import Topology, topology_of
from relay.broker.topology import delete
from relay.pipeline.stage import StageWorker
from relay.settings import Settings
from relay.store import DeadLetterFilter, SqlStore
from relay.wire import InboundEnvelope, OutboundEnvelope
from tests.helpers import (
    Ingress,
    Queues,
    by_conversation,
    eventually,
    make_integration,
    message,
    settled,
    start_bot_worker,
    start_ingress,
    take_until,
)


def with_bot(settings: Settings, bot: str) -> Settings:
    return settings.model_copy(update={"bot": bot})


async def test_echo_replies_arrive_in_order_with_increasing_sequences(
    ingress: Ingress, store: SqlStore, settings: Settings, queues: Queues
):
    integration_id, token = await make_integration(store, settings)
    sent = []
    for n in range(3):
        _, answer = await ingress.post(integration_id, token, message(n, text=f"hi {n}"))
        sent.append(answer)
    async with start_bot_worker(with_bot(settings, "echo")):
        responses = await take_until(queues, "outbound", 6)
    assert len(responses) == 6
    envelopes = [OutboundEnvelope.model_validate(r) for r in responses]
    bodies = [e.body for e in sorted(envelopes, key=lambda e: e.body.sequence)]
    assert [b.sequence for b in bodies] == [1, 2, 3, 4, 5, 6]
    assert [(b.type, b.payload) for b in bodies] == [
        ("typing", {"value": True}),
        ("text", {"text": "echo: hi 0"}),
        ("typing", {"value": True}),
        ("text", {"text": "echo: hi 1"}),
        ("typing", {"value": True}),
        ("text", {"text": "echo: hi 2"}),
    ]
    first = sent[0]
    for body in bodies:
        assert body.conversationId == "conv-1"
        assert body.botpressConversationId == first["conversation"]["id"]
        assert body.botpressUserId == first["user"]["id"]
    for envelope in envelopes:
        assert envelope.deliveryId == f"msg_{envelope.body.botpressMessageId}"
        assert envelope.integrationId == integration_id
        assert envelope.attempt == 0
    # every response of the conversation is on the conversation's outbound partition
    assert len({r["_partition"] for r in responses}) == 1


async def test_a_redelivered_message_gets_no_second_set_of_replies(
    ingress: Ingress,
    store: SqlStore,
    settings: Settings,
    queues: Queues,
    amqp: AbstractRobustConnection,
):
    integration_id, token = await make_integration(store, settings)
    await ingress.post(integration_id, token, message(1))
    [inbound] = await queues.take("inbound")  # keep a copy of what the worker will see
    await republish(amqp, settings, inbound)
    async with start_bot_worker(with_bot(settings, "tests.bots:numbered")) as worker:
        first = await take_until(queues, "outbound", 2)
        await republish(amqp, settings, inbound)  # the broker hands it over again
        await eventually(lambda: done_with(worker, "done", 2))
    assert await queues.take("outbound") == []
    assert [r["body"]["sequence"] for r in first] == [1, 2]


async def republish(amqp: AbstractRobustConnection, settings: Settings, item: dict) -> None:
    body = {k: v for k, v in item.items() if not k.startswith("_")}
    async with amqp.channel() as channel:
        exchange = await channel.get_exchange(f"{settings.queue_prefix}.inbound")
        await exchange.publish(
            aio_pika.Message(json.dumps(body).encode(), message_id=item["_message_id"]),
            routing_key=Topology(settings.queue_prefix, settings.partitions).routing_key(
                item["_partition"]
            ),
        )


async def done_with(worker: StageWorker[InboundEnvelope], outcome: str, count: int) -> bool:
    return settled(worker, outcome) >= count


async def test_late_replies_follow_the_turn_in_sequence(
    ingress: Ingress, store: SqlStore, settings: Settings, queues: Queues
):
    integration_id, token = await make_integration(store, settings)
    await ingress.post(integration_id, token, message(1))
    async with start_bot_worker(with_bot(settings, "tests.bots:later")):
        responses = await take_until(queues, "outbound", 2)
    ordered = by_conversation(responses)["conv-1"]
    assert [(r["body"]["sequence"], r["body"]["payload"]["text"]) for r in ordered] == [
        (1, "now"),
        (2, "later"),
    ]


async def test_an_invalid_reply_is_refused_with_a_clear_error_and_the_worker_goes_on(
    ingress: Ingress, store: SqlStore, settings: Settings, queues: Queues
):
    integration_id, token = await make_integration(store, settings)
    await ingress.post(integration_id, token, message(1))
    await ingress.post(integration_id, token, message(2))
    async with start_bot_worker(with_bot(settings, "tests.bots:picky")):
        responses = await take_until(queues, "outbound", 2)
    assert [r["body"]["payload"] for r in by_conversation(responses)["conv-1"]] == [
        {"text": "refused: payload.imageUrl"},
        {"text": "refused: payload.imageUrl"},
    ]


async def test_a_failing_bot_is_retried_then_answers(
    ingress: Ingress, store: SqlStore, settings: Settings, queues: Queues
):
    integration_id, token = await make_integration(store, settings)
    await ingress.post(integration_id, token, message(1, text="flaky"))
    async with start_bot_worker(with_bot(settings, "tests.bots:flaky")) as worker:
        [response] = await take_until(queues, "outbound", 1)
        assert settled(worker, "retry") == 2
        assert settled(worker, "done") == 1
    assert response["body"]["payload"] == {"text": "ok flaky"}


async def test_a_bot_that_keeps_failing_dead_letters_the_message_and_the_rest_follow_in_order(
    ingress: Ingress,
    store: SqlStore,
    settings: Settings,
    queues: Queues,
    amqp: AbstractRobustConnection,
):
    integration_id, token = await make_integration(store, settings)
    for n, text in enumerate(["fail", "after 1", "after 2"]):
        await ingress.post(integration_id, token, message(n, text=text))
    async with start_bot_worker(with_bot(settings, "tests.bots:flaky")):
        responses = await take_until(queues, "outbound", 2)
        selection = DeadLetterFilter("inbound", integration_id)
        [letter] = await eventually(lambda: store.dead_letters(selection, None, 10), timeout=20)
    assert [r["body"]["payload"]["text"] for r in by_conversation(responses)["conv-1"]] == [
        "ok after 1",
        "ok after 2",
    ]
    # Kept in the store by the stage's keeper, with the reason and attempts of its headers.
    assert InboundEnvelope.model_validate(letter.body).text == "fail"
    assert "broken for this message" in letter.reason
    assert letter.attempts == len(settings.bot_retry_delays)


async def test_a_conversation_parked_by_a_stopped_worker_keeps_its_order_on_the_next(
    store: SqlStore, settings: Settings, amqp: AbstractRobustConnection
):
    # Queues of its own with a long retry delay: the first message's turn is tried again in
    # five seconds, so a worker can stop and another start while it is away.
    moved = with_bot(settings, "tests.bots:flaky").model_copy(
        update={"queue_prefix": settings.queue_prefix + "-moved", "bot_retry_delays": [5.0]}
    )
    topology = topology_of(moved)
    queues = Queues(amqp, topology)
    integration_id, token = await make_integration(store, moved)
    try:
        async with start_ingress(moved) as ingress:
            await ingress.post(integration_id, token, message("m1", text="once"))
            async with start_bot_worker(moved) as first_worker:
                await eventually(lambda: _settled(first_worker, "retry", 1))
                await ingress.post(integration_id, token, message("m2", text="second"))
                await eventually(lambda: _settled(first_worker, "wait", 1))  # parked
            # The next worker knows nothing of that parking but what the store says.
            async with start_bot_worker(moved) as next_worker:
                await ingress.post(integration_id, token, message("m3", text="third"))
                responses = await take_until(queues, "outbound", 3, timeout=30)
    finally:
        async with amqp.channel() as channel:
            await delete(channel, topology)
    assert [r["body"]["payload"]["text"] for r in by_conversation(responses)["conv-1"]] == [
        "ok once",
        "ok second",
        "ok third",
    ]
    assert settled(next_worker, "wait") >= 1  # the third waited behind the first


async def _settled(worker: StageWorker[InboundEnvelope], outcome: str, count: int) -> bool:
    return settled(worker, outcome) >= count


async def test_an_envelope_that_was_never_accepted_is_dropped(
    ingress: Ingress,
    store: SqlStore,
    settings: Settings,
    queues: Queues,
    amqp: AbstractRobustConnection,
):
    integration_id, token = await make_integration(store, settings)
    await ingress.post(integration_id, token, message(1))
    [inbound] = await queues.take("inbound")
    stray = json.loads(json.dumps(inbound))
    stray["bundle"]["message"]["id"] = "not-in-the-store"
    await republish(amqp, settings, {**stray, "_message_id": "not-in-the-store"})
    await republish(amqp, settings, inbound)
    async with start_bot_worker(with_bot(settings, "echo")) as worker:
        responses = await take_until(queues, "outbound", 2)
        await eventually(lambda: done_with(worker, "drop", 1))
        assert settled(worker, "done") == 1
    assert len(responses) == 2
    assert {r["body"]["payload"].get("text") for r in responses} == {None, "echo: hello 1"}
