"""The admin API's recovery routes against a real broker, real workers and both stores:
dead letters (listed by filter and page, replayed, purged), resending a delivered response,
recovering an integration's given-up responses, a conversation's timeline, queue ages."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from datetime import timedelta
from functools import partial
from typing import Any

import pytest

from relay import admin
from relay.broker import Broker, topology_of
from relay.broker.presence import Presence, QueueAges
from relay.ingress.admin.common import encode_cursor
from relay.metrics import Metrics
from relay.pipeline.dlq_bounds import Bounds, enforce
from relay.settings import Settings
from relay.store import SqlStore
from relay.wire import utcnow
from tests.helpers import (
    Ingress,
    connected_broker,
    eventually,
    make_integration,
    message,
    push_text,
    start_delivery_worker,
)
from tests.helpers import admin_call as call
from tests.receivers import Hit, Receiver
from tests.test_cli import relay


@pytest.fixture(autouse=True)
def fresh_receiver(receiver: Receiver) -> None:
    receiver.hits.clear()
    receiver.scripts.clear()


async def respond(
    ingress: Ingress, store: SqlStore, settings: Settings, url: str, count: int
) -> tuple[str, list[dict[str, Any]]]:
    """An integration whose endpoint is `url`, and `count` bot responses pushed for it in
    its conversation `conv-1`."""
    integration_id, token = await make_integration(store, settings, response_url=url)
    _, sent = await ingress.post(integration_id, token, message(1, conversationId="conv-1"))
    bot_token, _ = await admin.create_token(store, integration_id, "bot")
    conversation_id = sent["conversation"]["id"]
    pushed = [
        await push_text(ingress, conversation_id, bot_token, f"response {n}") for n in range(count)
    ]
    return integration_id, pushed


async def dead_letters(ingress: Ingress, token: str, query: str) -> list[dict[str, Any]]:
    """Every page of `GET /dead-letters?{query}`, two at a time."""
    found: list[dict[str, Any]] = []
    cursor = None
    for _ in range(50):
        suffix = f"&cursor={cursor}" if cursor else ""
        status, page = await call(ingress, "GET", f"/dead-letters?limit=2&{query}{suffix}", token)
        assert status == 200, page
        assert len(page["items"]) <= 2
        found += page["items"]
        cursor = page["nextCursor"]
        if cursor is None:
            return found
    raise AssertionError("the pages never ended")


async def hits(receiver: Receiver, path: str, count: int) -> list[Hit] | None:
    found = receiver.at(path)
    return found if len(found) >= count else None


async def test_dead_letters_are_listed_replayed_and_purged(
    ingress: Ingress, store: SqlStore, settings: Settings, receiver: Receiver, admin_token: str
):
    url = receiver.on("dlq", *[400] * 3)
    integration_id, pushed = await respond(ingress, store, settings, url, 3)
    query = f"integrationId={integration_id}"
    async with start_delivery_worker(settings):

        async def all_dead() -> list[dict[str, Any]] | None:
            found = await dead_letters(ingress, admin_token, query)
            return found if len(found) == 3 else None

        letters = await eventually(all_dead)
        assert [letter["id"] for letter in letters] == sorted(
            (letter["id"] for letter in letters),
            key=lambda i: next(x["deadAt"] for x in letters if x["id"] == i),
        )
        assert {letter["id"] for letter in letters} == {f"msg_{p['id']}" for p in pushed}
        assert all(letter["stage"] == "outbound" for letter in letters)
        assert all(letter["lastStatus"] == 400 for letter in letters)
        assert await dead_letters(ingress, admin_token, f"{query}&stage=inbound") == []
        # Listing leaves them where they are; a stage is a filter of its own.
        for other_stage in ({"stage": "inbound"}, {"all": True, "stage": "inbound"}):
            status, purged = await call(
                ingress, "POST", "/dead-letters/purge", admin_token, other_stage
            )
            assert (status, purged) == (200, {"count": 0})
        # A hundred looks and a janitor's pass take nothing: the letters are rows, not
        # messages taken off a queue and given back (RabbitMQ 4 would count those).
        for _ in range(100):
            assert len(await dead_letters(ingress, admin_token, query)) == 3
        bounds = Bounds(max_age=24 * 3600, max_length=1000)
        assert await enforce(store, bounds, Metrics(), time.time()) == {
            "inbound": 0,
            "outbound": 0,
        }
        assert len(await dead_letters(ingress, admin_token, query)) == 3

        first = letters[0]["id"]
        status, replayed = await call(
            ingress, "POST", "/dead-letters/replay", admin_token, {"ids": [first]}
        )
        assert (status, replayed) == (200, {"count": 1})
        found = await eventually(lambda: hits(receiver, "dlq", 4))
        delivered = found[3]
        assert delivered.status == 200
        assert delivered.headers["webhook-id"] == first

    status, purged = await call(
        ingress, "POST", "/dead-letters/purge", admin_token, {"integrationId": integration_id}
    )
    assert (status, purged) == (200, {"count": 2})
    assert await dead_letters(ingress, admin_token, query) == []


async def test_bad_dead_letter_requests_are_json_400s(
    ingress: Ingress, store: SqlStore, settings: Settings, admin_token: str
):
    bad = (
        {},
        {"all": True, "ids": ["x"]},
        {"all": True, "integrationId": "x"},
        {"ids": []},
        {"all": False},
        {"stage": "x"},
        {"stage": None},
    )
    for body in bad:
        for action in ("replay", "purge"):
            status, answer = await call(
                ingress, "POST", f"/dead-letters/{action}", admin_token, body
            )
            assert status == 400, (action, body, answer)
            assert answer["error"]["code"] == "invalid_body"
    # Cursors this API never gave out: a time past 64 bits (or past Python's digits for an
    # int), a time in other digits than ASCII, a stage that is not one.
    forged = [
        encode_cursor(dead_at, stage, "msg_x")
        for dead_at, stage in (
            ("9" * 20, "inbound"),
            ("9" * 5000, "inbound"),
            ("\u0661\u0662", "inbound"),
            ("1", "sideways"),
        )
    ]
    queries = ["stage=nope", "limit=0", "cursor=nope", "cursor=", "integrationId="]
    # Text no store keeps: a NUL (PostgreSQL refuses it; it was a 500).
    queries += ["integrationId=a%00b", "conversationId=%00"]
    for query in [*queries, *(f"cursor={cursor}" for cursor in forged)]:
        status, answer = await call(ingress, "GET", f"/dead-letters?{query}", admin_token)
        assert (status, answer["error"]["code"]) == (400, "invalid_query"), query


async def test_a_delivered_response_is_resent_under_its_webhook_id(
    ingress: Ingress, store: SqlStore, settings: Settings, receiver: Receiver, admin_token: str
):
    _integration_id, [pushed] = await respond(ingress, store, settings, receiver.url("again"), 1)
    webhook_id = f"msg_{pushed['id']}"
    # Not delivered yet (no delivery worker): a conflict, nothing sent.
    status, answer = await call(ingress, "POST", f"/responses/{webhook_id}/resend", admin_token)
    assert (status, answer["error"]["code"]) == (409, "conflict")
    async with start_delivery_worker(settings):
        # Delivered once its 2xx attempt is logged (a moment after the endpoint has it).
        await eventually(lambda: logged_2xx(ingress, admin_token, webhook_id, 1))
        status, answer = await call(ingress, "POST", f"/responses/{webhook_id}/resend", admin_token)
        assert (status, answer) == (202, {"webhookId": webhook_id, "responseId": pushed["id"]})
        await eventually(lambda: logged_2xx(ingress, admin_token, webhook_id, 2))
    first, second = receiver.at("again")
    assert first.headers["webhook-id"] == second.headers["webhook-id"] == webhook_id
    assert first.body == second.body
    for unknown in ("msg_nope", "nope", "msg_"):
        status, answer = await call(ingress, "POST", f"/responses/{unknown}/resend", admin_token)
        assert status == 404, unknown


async def logged_2xx(ingress: Ingress, token: str, webhook_id: str, count: int = 1) -> bool:
    """Whether `count` delivered attempts of the response are logged."""
    status, attempts = await call(ingress, "GET", f"/attempts?webhookId={webhook_id}", token)
    assert status == 200, attempts
    return sum(attempt["status"] == 200 for attempt in attempts["items"]) >= count


async def test_recovery_sends_what_died_since_then_from_the_store(
    ingress: Ingress, store: SqlStore, settings: Settings, receiver: Receiver, admin_token: str
):
    before = utcnow() - timedelta(seconds=1)
    url = receiver.on("recover", *[400] * 2)
    integration_id, pushed = await respond(ingress, store, settings, url, 2)
    query = f"integrationId={integration_id}"
    ids = [f"msg_{p['id']}" for p in pushed]
    async with start_delivery_worker(settings):

        async def both_dead() -> bool:
            return len(await dead_letters(ingress, admin_token, query)) == 2

        await eventually(both_dead)
        # One dead letter is purged: recovery finds it in the store all the same.
        status, _ = await call(
            ingress, "POST", "/dead-letters/purge", admin_token, {"ids": ids[:1]}
        )
        assert status == 200
        path = f"/integrations/{integration_id}/recover"
        later = (utcnow() + timedelta(minutes=1)).isoformat()
        assert await call(ingress, "POST", path, admin_token, {"since": later}) == (
            200,
            {"count": 0},
        )
        status, recovered = await call(
            ingress, "POST", path, admin_token, {"since": before.isoformat()}
        )
        assert (status, recovered) == (200, {"count": 2})
        found = await eventually(lambda: hits(receiver, "recover", 4))
        for webhook_id in ids:  # their attempts logged
            await eventually(partial(logged_2xx, ingress, admin_token, webhook_id))
    delivered = [hit for hit in found if hit.status == 200]
    assert [hit.headers["webhook-id"] for hit in delivered] == ids  # in their order
    assert await dead_letters(ingress, admin_token, query) == []
    # Delivered now: nothing more to recover.
    assert (await call(ingress, "POST", path, admin_token, {"since": before.isoformat()}))[1] == {
        "count": 0
    }
    for body, expected in (({"since": "yesterday"}, 400), ({"since": "2026-01-01T00:00"}, 400)):
        assert (await call(ingress, "POST", path, admin_token, body))[0] == expected
    status, _ = await call(
        ingress, "POST", "/integrations/nope/recover", admin_token, {"since": later}
    )
    assert status == 404


async def test_the_cli_recovers_what_died_since_then(
    ingress: Ingress, store: SqlStore, settings: Settings, receiver: Receiver, admin_token: str
):
    url = receiver.on("cli-recover", *[400] * 2)
    integration_id, pushed = await respond(ingress, store, settings, url, 2)
    ids = [f"msg_{p['id']}" for p in pushed]
    async with start_delivery_worker(settings):

        async def both_dead() -> bool:
            query = f"integrationId={integration_id}"
            return len(await dead_letters(ingress, admin_token, query)) == 2

        await eventually(both_dead)
        command = ("integrations", "recover", integration_id, "--since")
        naive = await relay(settings, *command, "2026-01-01T00:00")
        assert naive.code == 1
        assert "offset" in naive.err
        for hostile in ("soon", "nan", "1e400d", "99999999999d"):
            refused = await relay(settings, *command, hostile)
            assert refused.code == 1, hostile
            assert "Traceback" not in refused.err, refused.err
        done = await relay(settings, *command, "10m")
        assert (done.code, done.out.strip()) == (0, "recovered 2"), done.err
        found = await eventually(lambda: hits(receiver, "cli-recover", 4))
    delivered = [hit for hit in found if hit.status == 200]
    assert [hit.headers["webhook-id"] for hit in delivered] == ids  # in their order
    later = (utcnow() + timedelta(minutes=1)).isoformat()
    assert (await relay(settings, *command[:3], "--since", later)).out.strip() == "recovered 0"


async def test_a_conversations_timeline_shows_items_and_attempts(
    ingress: Ingress, store: SqlStore, settings: Settings, receiver: Receiver, admin_token: str
):
    url = receiver.on("timeline", 500)
    integration_id, [pushed] = await respond(ingress, store, settings, url, 1)
    path = f"/integrations/{integration_id}/conversations/conv-1"
    async with start_delivery_worker(settings):
        await eventually(lambda: hits(receiver, "timeline", 2))

        async def settled() -> dict[str, Any] | None:
            status, timeline = await call(ingress, "GET", path, admin_token)
            assert status == 200, timeline
            responses = [m for m in timeline["messages"] if m["direction"] == "outgoing"]
            done = responses and responses[0]["delivery"]["state"] == "delivered"
            return timeline if done else None

        timeline = await eventually(settled)
    incoming, outgoing = timeline["messages"]
    assert incoming["direction"] == "incoming"
    assert outgoing["botpressMessageId"] == pushed["id"]
    assert outgoing["delivery"] == {"state": "delivered", "attempts": 2}
    assert [a["status"] for a in timeline["attempts"]] == [500, 200]  # oldest first
    assert {a["responseId"] for a in timeline["attempts"]} == {pushed["id"]}
    assert timeline["watermark"] == outgoing["id"]
    status, _ = await call(
        ingress, "GET", f"/integrations/{integration_id}/conversations/x", admin_token
    )
    assert status == 404
    status, answer = await call(ingress, "GET", f"{path}?after=nope", admin_token)
    assert status == 400, answer


async def test_queues_show_the_age_of_their_oldest_message(
    ingress: Ingress, store: SqlStore, settings: Settings, receiver: Receiver, admin_token: str
):
    integration_id, _ = await respond(ingress, store, settings, receiver.on("aged", 400), 1)
    dead_queue = topology_of(settings).dead_queue("outbound")
    async with start_delivery_worker(settings):
        query = f"integrationId={integration_id}"
        await eventually(lambda: dead_letters(ingress, admin_token, query))
    status, page = await call(ingress, "GET", "/queues", admin_token)
    assert status == 200
    # The dead-letter queue only carries letters to the store: its age is the oldest kept.
    [queue] = [q for q in page["items"] if q["name"] == dead_queue]
    assert queue["ready"] == 0
    assert 0 <= queue["oldestAgeSeconds"] < 60
    _status, page = await call(ingress, "GET", "/queues", admin_token)
    empty = [q for q in page["items"] if q["ready"] == 0 and q["kind"] == "delay"]
    assert empty
    assert all(q["oldestAgeSeconds"] == 0 for q in empty)
    await call(
        ingress, "POST", "/dead-letters/purge", admin_token, {"integrationId": integration_id}
    )


@pytest.fixture
async def broker(settings: Settings) -> AsyncIterator[Broker]:
    async with connected_broker(settings) as connected:
        yield connected


async def test_workers_tell_the_ages_of_their_partitions(settings: Settings, broker: Broker):
    ages = QueueAges(broker, settings.presence_interval)
    ages.start()
    presence = Presence(broker, "outbound", settings.presence_interval)
    presence.report({"relay-test.outbound.3": 4.5})
    await presence.start()
    try:
        assert await eventually(lambda: _age(ages, "relay-test.outbound.3")) == 4.5
        assert ages.age("relay-test.outbound.4") is None
        await presence.stop()  # it says goodbye: its word no longer counts
        await eventually(lambda: _gone(ages, "relay-test.outbound.3"))
    finally:
        await presence.stop()
        await ages.stop()


async def _age(ages: QueueAges, queue: str) -> float | None:
    return ages.age(queue)


async def _gone(ages: QueueAges, queue: str) -> bool:
    return ages.age(queue) is None
