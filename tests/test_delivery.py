"""The delivery worker against the real broker, both stores and real HTTP receivers."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import random
import socket
import time
from collections.abc import AsyncIterator, Sequence
from datetime import timedelta
from typing import Any

import pytest
from aio_pika.abc import AbstractRobustConnection
from aiohttp import web
from aiohttp.test_utils import TestServer
from standardwebhooks import Webhook

from relay import admin
from relay.broker import topology_of
from relay.broker.topology import delete
from relay.commands.sink import Sink, SinkOptions
from relay.metrics import Metrics
from relay.pipeline.dlq import DeadLetters
from relay.pipeline.replies import ReplyPublisher
from relay.settings import Settings
from relay.store import (
    AttemptRecord,
    DeadLetterFilter,
    SqlStore,
    StoreError,
    StoreUnavailable,
)
from relay.store.batching import GroupCommit
from relay.wire import utcnow
from tests.helpers import (
    Ingress,
    Queues,
    attempt_record,
    connected_broker,
    eventually,
    keeping_dead_letters,
    make_integration,
    message,
    push_text,
    start_delivery_worker,
    start_ingress,
)
from tests.receivers import Hit, Receiver
from tests.test_cli import relay


@pytest.fixture(autouse=True)
def fresh_receiver(receiver: Receiver) -> None:
    """Each test sees only its own requests and scripts."""
    receiver.hits.clear()
    receiver.scripts.clear()
    receiver.hang.clear()
    receiver.hang_once.clear()


async def respond(
    ingress: Ingress,
    store: SqlStore,
    settings: Settings,
    url: str,
    count: int = 1,
    conversation: str = "conv-1",
) -> tuple[str, list[dict[str, Any]]]:
    """An integration whose endpoint is `url`, and `count` bot responses pushed for it."""
    integration_id, token = await make_integration(store, settings, response_url=url)
    _, sent = await ingress.post(integration_id, token, message(1, conversationId=conversation))
    bot_token, _ = await admin.create_token(store, integration_id, "bot")
    conversation_id = sent["conversation"]["id"]
    pushed = [
        await push_text(ingress, conversation_id, bot_token, f"response {n}") for n in range(count)
    ]
    return integration_id, pushed


async def test_a_delivery_is_signed_and_verifies_with_standardwebhooks(
    ingress: Ingress, store: SqlStore, settings: Settings, queues: Queues, receiver: Receiver
):
    integration_id, [pushed] = await respond(ingress, store, settings, receiver.on("signed"))
    async with start_delivery_worker(settings):
        [hit] = await eventually(lambda: _hits(receiver, "signed", 1))
    integration = await store.get_integration(integration_id)
    assert integration is not None
    assert Webhook(integration.signing_secret).verify(hit.raw, hit.headers) == hit.body
    assert hit.headers["webhook-id"] == f"msg_{pushed['id']}"
    assert hit.headers["content-type"] == "application/json"
    assert hit.body == {
        "type": "text",
        "payload": {"text": "response 0"},
        "conversationId": "conv-1",
        "botpressUserId": pushed["userId"],
        "botpressMessageId": pushed["id"],
        "botpressConversationId": pushed["conversationId"],
        "sequence": 1,
    }
    [attempt] = await store.list_attempts(f"msg_{pushed['id']}")
    assert attempt.status == 200
    assert attempt.attempt == 0


async def _hits(receiver: Receiver, path: str, count: int) -> list[Hit] | None:
    hits = receiver.at(path)
    return hits if len(hits) >= count else None


async def test_failing_three_times_then_delivered_on_the_fourth_with_the_same_id(
    ingress: Ingress, store: SqlStore, settings: Settings, queues: Queues, receiver: Receiver
):
    _, [pushed] = await respond(ingress, store, settings, receiver.on("flaky", 500, 500, 500))
    async with start_delivery_worker(settings):
        hits = await eventually(lambda: _hits(receiver, "flaky", 4))
    assert {hit.headers["webhook-id"] for hit in hits} == {f"msg_{pushed['id']}"}
    attempts = await store.list_attempts(f"msg_{pushed['id']}")
    assert [(a.attempt, a.status) for a in attempts] == [(0, 500), (1, 500), (2, 500), (3, 200)]
    assert all(a.next_attempt_at is not None for a in attempts[:3])
    assert len(receiver.at("flaky")) == 4


async def test_retry_after_is_honoured(
    ingress: Ingress, store: SqlStore, settings: Settings, queues: Queues, receiver: Receiver
):
    url = receiver.on("later", (503, {"Retry-After": "2"}))
    await respond(ingress, store, settings, url)
    patient = settings.model_copy(update={"delivery_retry_schedule": [0, 1.5]})
    async with start_delivery_worker(patient):
        first, second = await eventually(lambda: _hits(receiver, "later", 2))
    # the schedule alone would wait 1.2-1.8 s; Retry-After asked for 2 (within 2x 1.5)
    assert second.at - first.at >= 1.95


async def test_a_4xx_is_dead_lettered_at_once_with_its_reason(
    ingress: Ingress,
    store: SqlStore,
    settings: Settings,
    queues: Queues,
    receiver: Receiver,
    dead: DeadLetters,
):
    integration_id, [pushed] = await respond(ingress, store, settings, receiver.on("bad", 400))
    async with start_delivery_worker(settings):
        [letter] = await eventually(lambda: _dead(dead, integration_id, 1))
    assert len(receiver.at("bad")) == 1
    assert letter.id == f"msg_{pushed['id']}"
    assert letter.last_status == 400
    assert "400" in letter.reason
    await dead.purge(DeadLetterFilter(integration_id=integration_id))


@pytest.fixture(scope="module")
async def dead(settings: Settings) -> AsyncIterator[DeadLetters]:
    async with keeping_dead_letters(settings) as letters:
        yield letters


async def _dead(dead: DeadLetters, integration_id: str, count: int) -> list[Any] | None:
    found = await dead.page(DeadLetterFilter(integration_id=integration_id), 1000)
    return found if len(found) >= count else None


async def test_410_dead_letters_and_disables_the_endpoint(
    ingress: Ingress,
    store: SqlStore,
    settings: Settings,
    queues: Queues,
    receiver: Receiver,
    dead: DeadLetters,
):
    integration_id, _ = await respond(ingress, store, settings, receiver.on("gone", 410), 2)
    async with start_delivery_worker(settings):
        letters = await eventually(lambda: _dead(dead, integration_id, 2))
    assert len(receiver.at("gone")) == 1  # the second was never sent
    assert sorted(letter.reason for letter in letters) == [
        "410 Gone: endpoint disabled",
        "the integration's endpoint is disabled",
    ]
    integration = await store.get_integration(integration_id)
    assert integration is not None
    assert integration.disabled_at is not None
    await dead.purge(DeadLetterFilter(integration_id=integration_id))


async def test_exhausted_deliveries_wait_in_the_dlq_and_replay_delivers_them(
    ingress: Ingress,
    store: SqlStore,
    settings: Settings,
    queues: Queues,
    receiver: Receiver,
    dead: DeadLetters,
):
    url = receiver.on("down", *[500] * 8)
    integration_id, pushed = await respond(ingress, store, settings, url, 2)
    async with start_delivery_worker(settings):
        letters = await eventually(lambda: _dead(dead, integration_id, 2))
        assert {d.attempts for d in letters} == {len(settings.delivery_retry_schedule)}
        assert all("gave up after 4 attempts" in d.reason for d in letters)
        listed = await dead.page(DeadLetterFilter(integration_id=integration_id), 1000)
        assert len(listed) == 2  # listing leaves them where they are
        assert len(receiver.at("down")) == 8
        receiver.scripts["down"] = []  # the endpoint is back
        assert await dead.replay(DeadLetterFilter(integration_id=integration_id)) == 2
        hits = await eventually(lambda: _hits(receiver, "down", 10))
    replayed = {hit.headers["webhook-id"] for hit in hits[8:]}
    assert replayed == {f"msg_{p['id']}" for p in pushed}
    assert await dead.page(DeadLetterFilter(integration_id=integration_id), 10) == []


async def test_endpoints_on_private_addresses_are_refused(
    ingress: Ingress,
    store: SqlStore,
    settings: Settings,
    queues: Queues,
    receiver: Receiver,
    dead: DeadLetters,
):
    port = receiver.base.rsplit(":", 1)[1]
    guarded = settings.model_copy(update={"allowed_endpoint_networks": []})
    literal, _ = await respond(ingress, store, settings, f"http://127.0.0.1:{port}/ssrf")
    named, _ = await respond(ingress, store, settings, f"http://localhost:{port}/ssrf")
    async with start_delivery_worker(guarded):
        [by_literal] = await eventually(lambda: _dead(dead, literal, 1))
        [by_name] = await eventually(lambda: _dead(dead, named, 1))
    assert "not a public address" in by_literal.reason
    assert "not public" in by_name.reason
    assert receiver.at("ssrf") == []
    for integration in (literal, named):
        await dead.purge(DeadLetterFilter(integration_id=integration))


async def test_order_per_conversation_holds_while_the_endpoint_flaps(
    ingress: Ingress, store: SqlStore, settings: Settings, queues: Queues, receiver: Receiver
):
    # Fails about one request in three, whichever conversation it belongs to: at random
    # (seeded), since a fixed pattern can resonate with the retries and fail one response
    # on every attempt.
    rng = random.Random(3)
    url = receiver.on("flapping", *[503 if rng.random() < 1 / 3 else 200 for _ in range(200)])
    integration_id, _ = await respond(ingress, store, settings, url, 0)
    bot_token, _ = await admin.create_token(store, integration_id, "bot")
    conversations = []
    for c in range(4):
        _, sent = await ingress.post(
            integration_id,
            (await admin.create_token(store, integration_id, "integration"))[0],
            message(f"o{c}", conversationId=f"o{c}"),
        )
        conversations.append(sent["conversation"]["id"])
    for n in range(10):
        for conversation in conversations:
            await push_text(ingress, conversation, bot_token, f"{n}")
    # Ten attempts: a response fails them all with odds of about 1 in 59,000.
    patient = settings.model_copy(update={"delivery_retry_schedule": [0] + [0.2] * 9})
    async with start_delivery_worker(patient):
        await eventually(lambda: _delivered(receiver, "flapping", 40), timeout=30)
    hits = receiver.at("flapping")
    assert any(hit.status == 503 for hit in hits)  # it did flap
    for conversation in conversations:
        delivered = [
            hit.body["sequence"]
            for hit in hits
            if hit.body["botpressConversationId"] == conversation and hit.status == 200
        ]
        assert delivered == list(range(1, 11))


@contextlib.asynccontextmanager
async def own_conversation(
    store: SqlStore,
    settings: Settings,
    amqp: AbstractRobustConnection,
    url: str,
    name: str,
    **updates: Any,
) -> AsyncIterator[tuple[Settings, Ingress, str, str]]:
    """Queues of their own (deleted afterwards, so nothing other tests left is seen), an
    ingress on them, and a conversation of an integration answering at `url`: (settings,
    ingress, conversation id, bot token)."""
    own = settings.model_copy(update={"queue_prefix": f"{settings.queue_prefix}-{name}", **updates})
    integration_id, token = await make_integration(store, own, response_url=url)
    bot_token, _ = await admin.create_token(store, integration_id, "bot")
    try:
        async with start_ingress(own) as ingress:
            _, sent = await ingress.post(integration_id, token, message(name))
            yield own, ingress, sent["conversation"]["id"], bot_token
    finally:
        async with amqp.channel() as channel:
            await delete(channel, topology_of(own))


async def test_a_conversation_parked_by_a_stopped_worker_keeps_its_order_on_the_next(
    store: SqlStore, settings: Settings, amqp: AbstractRobustConnection, receiver: Receiver
):
    # A long delay queue: the first response waits five seconds for its retry, so a worker
    # can stop and another start while it is away.
    url = receiver.on("moved", 503)
    async with own_conversation(
        store,
        settings,
        amqp,
        url,
        "moved",
        delivery_delay_queues=[0.5, 5.0],
        delivery_retry_schedule=[0, 5],
    ) as (moved, ingress, conversation, bot_token):
        async with start_delivery_worker(moved) as first_worker:
            first = await push_text(ingress, conversation, bot_token, "first")
            await eventually(lambda: _hits(receiver, "moved", 1))  # 503: retry in 5 s
            second = await push_text(ingress, conversation, bot_token, "second")

            async def second_parked() -> bool:
                return f"msg_{second['id']}" in first_worker.parking.parked(conversation)

            await eventually(second_parked)
        # The next worker knows nothing of that parking but what the store says.
        async with start_delivery_worker(moved) as next_worker:
            third = await push_text(ingress, conversation, bot_token, "third")
            await eventually(lambda: _delivered(receiver, "moved", 3), timeout=30)
    delivered = [hit.headers["webhook-id"] for hit in receiver.at("moved") if hit.status == 200]
    assert delivered == [f"msg_{m['id']}" for m in (first, second, third)]
    sample = next_worker.metrics.registry.get_sample_value
    assert sample("relay_messages_consumed_total", {"stage": "outbound", "outcome": "wait"})


async def test_a_response_published_after_a_later_one_is_still_delivered_first(
    store: SqlStore, settings: Settings, amqp: AbstractRobustConnection, receiver: Receiver
):
    # A turn's reply whose publish failed with the connection goes out again only when its
    # message comes back, so a later response can reach the queue first; so can messages a
    # quorum queue delivers out of order after a node is lost. The worker, which knows the
    # conversation already, sees the skipped sequence number and lets the missing one lead.
    url = receiver.url("late")
    async with (
        own_conversation(store, settings, amqp, url, "late") as (
            late,
            ingress,
            conversation_id,
            bot_token,
        ),
        start_delivery_worker(late) as worker,
    ):
        first = await push_text(ingress, conversation_id, bot_token, "first")
        await eventually(lambda: _delivered(receiver, "late", 1))
        conversation = await store.get_conversation(conversation_id)
        assert conversation is not None
        second, _ = await store.record_pushed(
            conversation, "text", {"text": "second"}, None, late.partitions
        )  # stored, not published yet
        third = await push_text(ingress, conversation_id, bot_token, "third")

        async def third_waits() -> bool:
            return worker.parking.parked(conversation_id) == [
                f"msg_{second.id}",
                f"msg_{third['id']}",
            ]

        await eventually(third_waits)
        assert len(receiver.at("late")) == 1
        async with connected_broker(late) as broker:
            await ReplyPublisher(store, broker, Metrics()).publish([second])
        await eventually(lambda: _delivered(receiver, "late", 3), timeout=20)
    delivered = [hit.body["sequence"] for hit in receiver.at("late")]
    assert delivered == [first["sequence"], second.sequence, third["sequence"]]
    assert delivered == sorted(delivered)


class ForgetfulStore:
    """The real store, whose parking look-ups fail for a while (the database is away)."""

    def __init__(self, store: SqlStore, failures: int) -> None:
        self._store = store
        self.failures = failures

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def undelivered(self, *args: Any) -> Any:
        if self.failures > 0:
            self.failures -= 1
            raise StoreUnavailable("the database is away")
        return await self._store.undelivered(*args)


async def test_failed_parking_look_ups_keep_the_order(
    store: SqlStore, settings: Settings, amqp: AbstractRobustConnection, receiver: Receiver
):
    # The responses are all queued before the worker starts, so they reach the same lane
    # together: each one's look-up fails.
    url = receiver.url("lookups")
    async with own_conversation(store, settings, amqp, url, "lookups") as (
        lookups,
        ingress,
        conversation,
        bot_token,
    ):
        pushed = [
            await push_text(ingress, conversation, bot_token, text) for text in ("a", "b", "c")
        ]
        async with start_delivery_worker(lookups, lambda s: ForgetfulStore(s, 3)) as worker:
            await eventually(lambda: _delivered(receiver, "lookups", 3), timeout=20)
    delivered = [hit.headers["webhook-id"] for hit in receiver.at("lookups")]
    assert delivered == [f"msg_{m['id']}" for m in pushed]
    sample = worker.metrics.registry.get_sample_value
    assert sample("relay_messages_consumed_total", {"stage": "outbound", "outcome": "again"})


async def _delivered(receiver: Receiver, path: str, count: int) -> bool:
    return len([hit for hit in receiver.at(path) if hit.status == 200]) >= count


async def push_to(
    ingress: Ingress, store: SqlStore, settings: Settings, url: str, conversations: int
) -> dict[str, float]:
    """One response in each of `conversations` conversations; push time by webhook-id."""
    integration_id, token = await make_integration(store, settings, response_url=url)
    bot_token, _ = await admin.create_token(store, integration_id, "bot")
    pushed: dict[str, float] = {}
    for c in range(conversations):
        _, sent = await ingress.post(integration_id, token, message(c, conversationId=f"i{c}"))
        stored = await push_text(ingress, sent["conversation"]["id"], bot_token, "x")
        pushed[f"msg_{stored['id']}"] = time.monotonic()
    return pushed


async def test_a_dead_and_a_hanging_endpoint_do_not_hold_up_a_healthy_one(
    ingress: Ingress,
    store: SqlStore,
    settings: Settings,
    queues: Queues,
    receiver: Receiver,
    healthy_receiver: Receiver,
):
    receiver.hang.add("hanging")
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        refused_url = f"http://127.0.0.1:{closed.getsockname()[1]}/refused"
    async with start_delivery_worker(settings):
        # The sick endpoints get their deliveries first, then the healthy one.
        await push_to(ingress, store, settings, refused_url, 15)
        await push_to(ingress, store, settings, receiver.url("hanging"), 15)
        healthy_receiver.hits.clear()
        healthy = await push_to(ingress, store, settings, healthy_receiver.url("healthy"), 15)
        hits = await eventually(lambda: _hits(healthy_receiver, "healthy", 15), timeout=20)
        hanging = [hit.at for hit in receiver.at("hanging")]
    delays = [hit.at - healthy[hit.headers["webhook-id"]] for hit in hits]
    print(
        f"healthy endpoint delay beside sick ones: max {max(delays) * 1000:.0f} ms, "
        f"mean {sum(delays) / len(delays) * 1000:.0f} ms"
    )
    # A hanging POST takes the whole delivery timeout; the healthy ones must not wait for it.
    assert max(delays) < settings.delivery_timeout / 2
    # At most the cap in flight; as the first ones time out, responses waiting in their lanes
    # take the freed slots until the failures open the circuit.
    # Counted until the circuit's first half-open probe may go (its cool-down after the
    # failure that opened it): a probe is the circuit working, not a slot too many.
    cap, threshold = settings.endpoint_concurrency, settings.breaker_threshold
    opened = sorted(hanging)[threshold - 1] + settings.delivery_timeout
    before_probe = [at for at in hanging if at < opened + settings.breaker_cooldown]
    assert len(before_probe) <= cap + threshold - 1


async def test_a_busy_endpoint_is_waited_for_in_the_lane_not_in_delay_queues(
    store: SqlStore, settings: Settings, amqp: AbstractRobustConnection, receiver: Receiver
):
    receiver.hits.clear()
    # Queues of its own: what earlier tests left in the module's would be counted too.
    capped = settings.model_copy(
        update={"endpoint_concurrency": 2, "queue_prefix": settings.queue_prefix + "-cap"}
    )
    try:
        async with start_ingress(capped) as ingress:
            pushed = await push_to(ingress, store, capped, receiver.url("capped"), 20)
            async with start_delivery_worker(capped) as worker:
                await eventually(lambda: _hits(receiver, "capped", 20), timeout=20)
    finally:
        async with amqp.channel() as channel:
            await delete(channel, topology_of(capped))
    assert {hit.headers["webhook-id"] for hit in receiver.at("capped")} == set(pushed)
    sample = worker.metrics.registry.get_sample_value
    assert sample("relay_messages_consumed_total", {"stage": "outbound", "outcome": "done"}) == 20
    assert not sample("relay_messages_consumed_total", {"stage": "outbound", "outcome": "wait"})


async def test_during_a_rotation_both_secrets_sign(
    ingress: Ingress, store: SqlStore, settings: Settings, queues: Queues, receiver: Receiver
):
    integration_id, _ = await respond(ingress, store, settings, receiver.on("rotated"), 0)
    before = await store.get_integration(integration_id)
    assert before is not None
    rotated = await store.rotate_secret(
        integration_id, "whsec_" + "A" * 32, utcnow() + timedelta(hours=1)
    )
    assert rotated is not None
    assert rotated.previous_secret == before.signing_secret
    await respond_in(ingress, store, integration_id)
    async with start_delivery_worker(settings):
        [hit] = await eventually(lambda: _hits(receiver, "rotated", 1))
    assert len(hit.headers["webhook-signature"].split(" ")) == 2
    for secret in (before.signing_secret, rotated.signing_secret):
        assert Webhook(secret).verify(hit.raw, hit.headers) == hit.body
    # after the grace period only the new secret signs
    assert rotated.signing_secrets(utcnow() + timedelta(hours=2)) == [rotated.signing_secret]


async def respond_in(ingress: Ingress, store: SqlStore, integration_id: str) -> None:
    """One more response in the integration's first conversation."""
    async with store.driver.connection() as conn:
        row = await conn.fetchone(
            "SELECT id FROM conversations WHERE integration_id = ?", integration_id
        )
    assert row is not None
    bot_token, _ = await admin.create_token(store, integration_id, "bot")
    await push_text(ingress, row["id"], bot_token, "after rotation")


async def test_the_sink_verifies_prints_and_fails_on_demand(
    ingress: Ingress, store: SqlStore, settings: Settings, queues: Queues
):
    printed = io.StringIO()
    sink = Sink(store, SinkOptions(fail=2), out=printed)
    app = web.Application()
    app.router.add_post("/{tail:.*}", sink.handle)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        _, [pushed] = await respond(
            ingress, store, settings, f"http://127.0.0.1:{server.port}/responses"
        )
        async with start_delivery_worker(settings):
            await eventually(lambda: _printed(printed, 3))
    finally:
        await server.close()
    lines = printed.getvalue().splitlines()
    assert len(lines) == 3  # two refused on purpose, then accepted
    assert all(f"msg_{pushed['id']}" in line and "verified" in line for line in lines)
    assert "NOT VERIFIED" not in printed.getvalue()
    assert '[conv-1 #1] text: {"text": "response 0"}' in lines[0]


async def _printed(out: io.StringIO, count: int) -> bool:
    return len(out.getvalue().splitlines()) >= count


async def test_redirects_are_not_followed(
    ingress: Ingress,
    store: SqlStore,
    settings: Settings,
    queues: Queues,
    receiver: Receiver,
    healthy_receiver: Receiver,
    dead: DeadLetters,
):
    healthy_receiver.hits.clear()
    elsewhere = healthy_receiver.url("elsewhere")
    url = receiver.on("moved", *[(302, {"Location": elsewhere})] * 4)
    integration_id, [pushed] = await respond(ingress, store, settings, url)
    async with start_delivery_worker(settings):
        [letter] = await eventually(lambda: _dead(dead, integration_id, 1))
    assert healthy_receiver.at("elsewhere") == []
    assert letter.last_status == 302
    attempts = await store.list_attempts(f"msg_{pushed['id']}")
    assert [a.status for a in attempts] == [302] * 4
    await dead.purge(DeadLetterFilter(integration_id=integration_id))


async def test_the_operator_commands(
    ingress: Ingress,
    store: SqlStore,
    settings: Settings,
    queues: Queues,
    receiver: Receiver,
    dead: DeadLetters,
):
    url = receiver.on("ops", *[500] * 4, 410)
    integration_id, [first, second] = await respond(ingress, store, settings, url, 2)
    async with start_delivery_worker(settings):
        await eventually(lambda: _dead(dead, integration_id, 2))
        listed = json.loads(
            (await relay(settings, "dlq", "list", "--integration", integration_id, "--json")).out
        )
        assert {item["id"] for item in listed} == {f"msg_{first['id']}", f"msg_{second['id']}"}
        table = (await relay(settings, "dlq", "list", "--integration", integration_id)).out
        assert f"msg_{first['id']}" in table
        shown = json.loads(
            (await relay(settings, "deliveries", "show", f"msg_{first['id']}", "--json")).out
        )
        assert [a["status"] for a in shown] == [500, 500, 500, 500]
        assert shown[0]["next_attempt_at"] is not None
        assert (await relay(settings, "integrations", "enable", integration_id)).code == 0
        replay = await relay(settings, "dlq", "replay", "--id", f"msg_{first['id']}")
        assert replay.out.strip() == "replayed 1"
        hits = await eventually(lambda: _hits(receiver, "ops", 6))
        assert hits[-1].headers["webhook-id"] == f"msg_{first['id']}"
        purge = await relay(settings, "dlq", "purge", "--integration", integration_id)
        assert purge.out.strip() == "purged 1"
    assert await dead.page(DeadLetterFilter(integration_id=integration_id), 10) == []
    rotated = json.loads(
        (
            await relay(settings, "integrations", "rotate-secret", integration_id, "--grace", "1h")
        ).out
    )
    assert rotated["signingSecret"].startswith("whsec_")
    record = await store.get_integration(integration_id)
    assert record is not None
    assert len(record.signing_secrets(utcnow())) == 2
    refused = await relay(settings, "dlq", "replay")
    assert refused.code == 1
    assert "--all" in refused.err


async def test_attempts_added_together_are_written_in_one_batch_even_if_the_caller_leaves(
    store: SqlStore,
):
    counting = CountingStore(store)
    log = GroupCommit(counting.record_attempts, "attempt-log")
    records = [attempt_record(f"together-{n}") for n in range(5)]
    await log.add_all(records)
    assert counting.batches == [5]
    await log.add_all([])  # nothing to write: no batch
    assert counting.batches == [5]
    # A caller cancelled while its items wait: they are written all the same (what the
    # ingress's queued marks and a turn's replies' marks rely on, unshielded).
    late = [attempt_record(f"left-{n}") for n in range(3)]
    waiting = asyncio.ensure_future(log.add_all(late))
    await asyncio.sleep(0)  # the items joined the batch
    waiting.cancel()

    async def written() -> bool:
        return all([await store.list_attempts(r.delivery_id) == [r] for r in late])

    await eventually(written)
    assert counting.batches == [5, 3]


class CountingStore:
    """The real store, with its attempt-log writes counted (or refused)."""

    def __init__(self, store: SqlStore) -> None:
        self.store = store
        self.batches: list[int] = []
        self.refuse = False

    async def record_attempts(self, attempts: Sequence[AttemptRecord]) -> None:
        self.batches.append(len(attempts))
        if self.refuse or any(a.error == "poison" for a in attempts):
            raise StoreError("the database refused it")
        await self.store.record_attempts(attempts)


async def test_the_attempt_log_commits_concurrent_attempts_together(store: SqlStore):
    counting = CountingStore(store)
    log = GroupCommit(counting.record_attempts, "attempt-log")
    records = [attempt_record(f"batch-{n}") for n in range(50)]
    await asyncio.gather(*[log.add(record) for record in records])
    assert sum(counting.batches) == 50
    assert len(counting.batches) < 50  # the ones that came while a batch was written waited
    for record in records:
        assert await store.list_attempts(record.delivery_id) == [record]
    poison = records[0].model_copy(update={"delivery_id": "msg_poison", "error": "poison"})
    fine = records[1].model_copy(update={"delivery_id": "msg_fine"})
    outcomes = await asyncio.gather(log.add(poison), log.add(fine), return_exceptions=True)
    assert isinstance(outcomes[0], StoreError)
    assert outcomes[1] is None  # the other one in its batch was written alone
    assert await store.list_attempts("msg_fine") == [fine]
    counting.refuse = True
    outcomes = await asyncio.gather(
        *[log.add(record) for record in records[:5]], return_exceptions=True
    )
    assert all(isinstance(outcome, StoreError) for outcome in outcomes)
