"""When the broker cannot take a message: 503, nothing accepted, and the retry succeeds once."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from collections.abc import AsyncIterator
from datetime import timedelta
from urllib.parse import urlsplit

import aiohttp
import pytest

from relay import admin
from relay.settings import Settings
from relay.store import SqlStore
from relay.wire import InboundRequest, utcnow
from tests.helpers import (
    Ingress,
    Queues,
    eventually,
    make_integration,
    message,
    start_ingress,
    take_until,
    with_address,
)
from tests.proxy import Proxy
from tests.test_ingress import rows_of


@pytest.fixture(scope="module")
async def proxy(amqp_url: str) -> AsyncIterator[Proxy]:
    target = urlsplit(amqp_url)
    running = Proxy(target.hostname or "127.0.0.1", target.port or 5672)
    await running.start()
    yield running
    await running.stop()


@pytest.fixture(scope="module")
async def proxied(settings: Settings, proxy: Proxy, amqp_url: str) -> AsyncIterator[Ingress]:
    """An ingress whose broker connection runs through the proxy."""
    url = with_address(amqp_url, proxy.url_host)
    async with start_ingress(settings.model_copy(update={"amqp_url": url})) as running:
        yield running


async def post_until_accepted(
    ingress: Ingress, integration_id: str, token: str, body: dict[str, object]
) -> tuple[int, dict[str, object]]:
    """Send until 200, as a client does after a 503 (which wrote nothing)."""

    async def attempt() -> tuple[int, dict[str, object]] | None:
        status, answer = await ingress.post(integration_id, token, body)
        assert status in (200, 503), answer
        return (status, answer) if status == 200 else None

    return await eventually(attempt, timeout=30, interval=0.1)


async def ready(ingress: Ingress) -> bool:
    async with ingress.http.get(f"{ingress.url}/readyz") as response:
        return response.status == 200


async def not_ready(ingress: Ingress) -> bool:
    return not await ready(ingress)


async def test_broker_down_is_503_then_the_same_request_succeeds_once(
    proxied: Ingress, proxy: Proxy, store: SqlStore, settings: Settings, queues: Queues
):
    integration_id, token = await make_integration(store, settings)
    assert (await proxied.post(integration_id, token, message(1)))[0] == 200

    await proxy.stop()
    await eventually(lambda: not_ready(proxied))
    status, body = await proxied.post(integration_id, token, message(2))
    assert status == 503
    assert body["error"]["code"] == "unavailable"
    assert await store.find_incoming(integration_id, "msg-2") is None
    assert (await rows_of(store, integration_id))["messages"] == 1

    await proxy.start()
    await eventually(lambda: ready(proxied), timeout=30)
    status, body = await post_until_accepted(proxied, integration_id, token, message(2))
    again = await proxied.post(integration_id, token, message(2))
    assert again == (200, body)
    queued = await queues.take("inbound")
    assert sorted(q["text"] for q in queued) == ["hello 1", "hello 2"]


async def test_a_broker_that_stops_answering_is_503_within_the_publish_timeout(
    proxied: Ingress, proxy: Proxy, store: SqlStore, settings: Settings, queues: Queues
):
    integration_id, token = await make_integration(store, settings)
    await eventually(lambda: ready(proxied), timeout=30)
    proxy.blackhole = True
    try:
        loop = asyncio.get_running_loop()
        started = loop.time()
        status, body = await proxied.post(integration_id, token, message(1))
        elapsed = loop.time() - started
    finally:
        proxy.blackhole = False
        await proxy.cut()  # the stream lost bytes: force a clean reconnect
    assert status == 503, body
    assert elapsed < settings.publish_timeout + 1.5
    assert await store.find_incoming(integration_id, "msg-1") is None
    await post_until_accepted(proxied, integration_id, token, message(1))
    assert len(await queues.take("inbound")) == 1


def rabbitmqctl(*args: str) -> str:
    done = subprocess.run(
        ["rabbitmqctl", "-q", *args], check=True, capture_output=True, text=True, timeout=60
    )
    return done.stdout


async def policy_applied(prefix: str, policy: str | None) -> bool:
    listing = await asyncio.to_thread(rabbitmqctl, "list_queues", "name", "policy")
    rows = [line.split("\t") for line in listing.splitlines()]
    inbound = [
        row
        for row in rows
        if row[0].startswith(f"{prefix}.inbound.") and row[0].rsplit(".", 1)[-1].isdigit()
    ]
    return bool(inbound) and all((row[1:] or [""])[0] == (policy or "") for row in inbound)


@pytest.mark.skipif(
    shutil.which("rabbitmqctl") is None,
    reason="needs rabbitmqctl on this machine to set a queue policy",
)
async def test_a_broker_that_nacks_is_503_and_nothing_is_accepted(
    ingress: Ingress, store: SqlStore, settings: Settings, queues: Queues
):
    integration_id, token = await make_integration(store, settings)
    name = f"{settings.queue_prefix}-full"
    prefix = settings.queue_prefix
    # max-length 0 with the queues' reject-publish overflow: every publish is nacked.
    await asyncio.to_thread(
        rabbitmqctl,
        "set_policy",
        "--apply-to",
        "queues",
        name,
        f"^{prefix}\\.inbound\\.(of[0-9]+\\.)?[0-9]+$",
        json.dumps({"max-length": 0}),
    )
    try:
        await eventually(lambda: policy_applied(prefix, name), timeout=30, interval=0.2)
        # A quorum queue rejects once it is over the limit: the first message may still fit.
        answers = [await ingress.post(integration_id, token, message(n)) for n in range(3)]
        statuses = [status for status, _ in answers]
        assert 503 in statuses, statuses
        refused = statuses.index(503)
        assert answers[refused][1]["error"]["code"] == "unavailable"
        assert await store.find_incoming(integration_id, f"msg-{refused}") is None
        assert (await rows_of(store, integration_id))["messages"] == refused
    finally:
        await asyncio.to_thread(rabbitmqctl, "clear_policy", name)
    await eventually(lambda: policy_applied(prefix, None), timeout=30, interval=0.2)
    # A blocked quorum queue unblocks once consumed below its old limit.
    before = await queues.take("inbound")
    assert sorted(q["text"] for q in before) == [f"hello {n}" for n in range(refused)]

    async def retried() -> bool:
        return (await ingress.post(integration_id, token, message(refused)))[0] == 200

    await eventually(retried, timeout=30, interval=0.2)
    [queued] = await queues.take("inbound")
    assert queued["text"] == f"hello {refused}"


async def test_outbox_publishes_what_a_crashed_ingress_left_pending(
    ingress: Ingress, store: SqlStore, settings: Settings, queues: Queues
):
    integration_id, _ = await make_integration(store, settings)
    # What an ingress that died between its commit and the broker's confirm leaves behind.
    request = InboundRequest.model_validate(message(1))
    crashed = await store.accept_incoming(
        integration_id, request, utcnow(), "req-crashed", settings.partitions
    )
    found = await eventually(lambda: _queued(store, integration_id, "msg-1"))
    assert found.bundle == crashed.bundle
    [queued] = await queues.take("inbound")
    assert queued["bundle"]["message"]["id"] == crashed.bundle.message.id
    assert queued["requestId"] == "req-crashed"


async def test_a_retry_takes_over_a_pending_message_whose_publisher_died(
    store: SqlStore, settings: Settings, queues: Queues
):
    # No sweeper here (an hour between sweeps): only the retry can publish the message.
    quiet = settings.model_copy(update={"outbox_interval": 3600.0})
    integration_id, token = await make_integration(store, settings)
    request = InboundRequest.model_validate(message(1))
    expired = utcnow() - timedelta(seconds=1)
    crashed = await store.accept_incoming(
        integration_id, request, expired, None, settings.partitions
    )
    async with start_ingress(quiet) as ingress:
        status, body = await ingress.post(integration_id, token, message(1))
    assert status == 200
    assert body["message"]["id"] == crashed.bundle.message.id
    [queued] = await queues.take("inbound")
    assert queued["_message_id"] == crashed.bundle.message.id
    found = await store.find_incoming(integration_id, "msg-1")
    assert found is not None
    assert found.state == "queued"


async def test_concurrent_duplicates_while_the_broker_is_down_are_all_503(
    proxied: Ingress, proxy: Proxy, store: SqlStore, settings: Settings, queues: Queues
):
    integration_id, token = await make_integration(store, settings)
    await eventually(lambda: ready(proxied), timeout=30)
    await proxy.stop()
    try:
        await eventually(lambda: not_ready(proxied))
        answers = await asyncio.gather(
            *[proxied.post(integration_id, token, message("dup")) for _ in range(50)]
        )
        assert {status for status, _ in answers} == {503}
        assert {a["error"]["code"] for _, a in answers} == {"unavailable"}
        assert (await rows_of(store, integration_id))["messages"] == 0
    finally:
        await proxy.start()
    await eventually(lambda: ready(proxied), timeout=30)
    _, body = await post_until_accepted(proxied, integration_id, token, message("dup"))
    [queued] = await queues.take("inbound")
    assert queued["_message_id"] == body["message"]["id"]


async def test_an_unconfirmed_publish_is_not_accepted_even_if_it_reached_the_queue(
    proxied: Ingress, proxy: Proxy, store: SqlStore, settings: Settings, queues: Queues
):
    """The broker got the message but its confirm was lost: the store says not accepted."""
    integration_id, token = await make_integration(store, settings)
    await eventually(lambda: ready(proxied), timeout=30)
    proxy.mute_replies = True
    try:
        status, body = await proxied.post(integration_id, token, message(1))
    finally:
        proxy.mute_replies = False
        await proxy.cut()  # the client's view of the stream is broken: reconnect
    assert status == 503, body
    assert await store.find_incoming(integration_id, "msg-1") is None
    await eventually(lambda: ready(proxied), timeout=30)
    _, accepted = await post_until_accepted(proxied, integration_id, token, message(1))
    queued = await queues.take("inbound")
    # The stray copy carries a relay id the store does not have: consumers drop it.
    ids = {q["_message_id"] for q in queued}
    assert accepted["message"]["id"] in ids
    for stray in ids - {accepted["message"]["id"]}:
        assert stray not in [r["id"] for r in await message_rows(store, integration_id)]
    assert len(await message_rows(store, integration_id)) == 1


async def message_rows(store: SqlStore, integration_id: str) -> list[dict[str, object]]:
    async with store.driver.connection() as conn:
        return await conn.fetchall(
            "SELECT id FROM messages WHERE integration_id = ?", integration_id
        )


async def _queued(store: SqlStore, integration_id: str, message_id: str):  # type: ignore[no-untyped-def]
    found = await store.find_incoming(integration_id, message_id)
    return found if found is not None and found.state == "queued" else None


async def test_readyz_reports_the_failing_dependency(proxied: Ingress, proxy: Proxy):
    await proxy.stop()
    try:
        await eventually(lambda: not_ready(proxied))
        async with proxied.http.get(f"{proxied.url}/readyz") as response:
            body = await response.json()
        assert response.status == 503
        assert body["failures"] == {"broker": "not connected"}
    finally:
        await proxy.start()
    await eventually(lambda: ready(proxied), timeout=30)
    async with aiohttp.ClientSession() as http, http.get(f"{proxied.url}/healthz") as response:
        assert response.status == 200
    # Ready, it says which broker it is on, and that none of its queues can drop a letter.
    async with proxied.http.get(f"{proxied.url}/readyz") as response:
        body = await response.json()
    assert body["broker"]["version"].startswith("RabbitMQ ")
    assert body["broker"]["queuesAtRisk"] == []


async def test_a_stored_response_that_never_reached_the_broker_is_published_by_the_outbox(
    ingress: Ingress, store: SqlStore, settings: Settings, queues: Queues
):
    integration_id, token = await make_integration(store, settings)
    _, sent = await ingress.post(integration_id, token, message(1))
    conversation = await store.get_conversation(sent["conversation"]["id"])
    assert conversation is not None
    # What a process that died between storing a response and publishing it leaves behind.
    record, _ = await store.record_pushed(
        conversation, "text", {"text": "orphan"}, None, settings.partitions
    )
    [queued] = await take_until(queues, "outbound", 1, timeout=settings.outbox_lease + 10)
    assert queued["deliveryId"] == f"msg_{record.id}"
    assert queued["body"]["payload"] == {"text": "orphan"}


async def test_the_push_api_answers_503_when_the_broker_is_down(
    proxied: Ingress, proxy: Proxy, store: SqlStore, settings: Settings, queues: Queues
):
    integration_id, token = await make_integration(store, settings)
    await eventually(lambda: ready(proxied), timeout=30)
    _, sent = await post_until_accepted(proxied, integration_id, token, message(1))
    bot_token, _ = await admin.create_token(store, integration_id, "bot")
    await proxy.stop()
    try:
        await eventually(lambda: not_ready(proxied))
        async with proxied.http.post(
            f"{proxied.url}/bot/conversations/{sent['conversation']['id']}/messages",
            json={"type": "text", "payload": {"text": "x"}},
            headers={"Authorization": f"Bearer {bot_token}", "Idempotency-Key": "k"},
        ) as response:
            assert response.status == 503
            assert (await response.json())["error"]["code"] == "unavailable"
    finally:
        await proxy.start()
    await queues.take("inbound")
