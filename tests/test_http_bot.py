"""The `http` adapter with a real aiohttp bot, and the bot push API."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import pytest
from aiohttp import web

from relay import admin
from relay.settings import Settings
from relay.store import SqlStore
from tests.helpers import (
    Ingress,
    Queues,
    by_conversation,
    eventually,
    make_integration,
    message,
    settled,
    start_bot_worker,
    take_until,
)

SYNC = [
    {"type": "text", "payload": {"text": "sync reply"}},
    {"type": "image", "payload": {"imageUrl": "not a url"}},  # invalid: left out, logged
    {"type": "image", "payload": {"imageUrl": "https://example.com/cat.png"}},
]
RASA = [
    {"recipient_id": "u", "text": "hello from rasa"},
    {"recipient_id": "u", "image": "https://example.com/rasa.png"},
    {"recipient_id": "u", "text": "pick one", "buttons": [{"title": "A", "payload": "/a"}]},
    {
        "recipient_id": "u",
        "custom": {"type": "location", "payload": {"latitude": 48.85, "longitude": 2.35}},
    },
]


@dataclass
class Bot:
    """A bot on 127.0.0.1 that answers by the message's text."""

    url: str
    received: list[dict[str, Any]] = field(default_factory=list)


@pytest.fixture(scope="module")
async def bot() -> AsyncIterator[Bot]:
    received: list[dict[str, Any]] = []

    async def handle(request: web.Request) -> web.Response:
        body = await request.json()
        received.append(body)
        text = body["text"]
        if text == "sync":
            return web.json_response(SYNC)
        if text == "rasa":
            return web.json_response(RASA)
        if text == "down":
            return web.Response(status=503)
        if text == "refuse":
            return web.Response(status=400)
        return web.Response(status=204)  # "later": it answers through the push API

    app = web.Application()
    app.router.add_post("/bot", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield Bot(f"http://127.0.0.1:{port}/bot", received)
    await runner.cleanup()


def http_bot(settings: Settings, bot: Bot) -> Settings:
    return settings.model_copy(update={"bot": "http", "bot_url": bot.url})


async def test_synchronous_replies_in_the_answer(
    ingress: Ingress, store: SqlStore, settings: Settings, queues: Queues, bot: Bot
):
    integration_id, token = await make_integration(store, settings)
    _, sent = await ingress.post(integration_id, token, message(1, text="sync"))
    async with start_bot_worker(http_bot(settings, bot)):
        responses = await take_until(queues, "outbound", 2)
    bodies = [r["body"] for r in by_conversation(responses)["conv-1"]]
    assert [(b["type"], b["payload"]) for b in bodies] == [
        ("text", {"text": "sync reply"}),
        ("image", {"imageUrl": "https://example.com/cat.png"}),
    ]
    posted = next(b for b in bot.received if b["message"]["id"] == sent["message"]["id"])
    assert posted["integrationId"] == integration_id
    assert posted["user"]["tags"] == {"id": "user-1"}
    assert posted["conversation"]["id"] == sent["conversation"]["id"]
    assert posted["replyUrl"].endswith(f"/bot/conversations/{sent['conversation']['id']}/messages")
    assert posted["botToken"].startswith("rlyr_")


async def test_rasa_answers_become_botpress_messages(
    ingress: Ingress, store: SqlStore, settings: Settings, queues: Queues, bot: Bot
):
    integration_id, token = await make_integration(store, settings)
    await ingress.post(integration_id, token, message(1, text="rasa"))
    async with start_bot_worker(http_bot(settings, bot)):
        responses = await take_until(queues, "outbound", 4)
    bodies = [r["body"] for r in by_conversation(responses)["conv-1"]]
    assert [(b["type"], b["payload"]) for b in bodies] == [
        ("text", {"text": "hello from rasa"}),
        ("image", {"imageUrl": "https://example.com/rasa.png"}),
        ("choice", {"text": "pick one", "options": [{"label": "A", "value": "/a"}]}),
        ("location", {"latitude": 48.85, "longitude": 2.35}),
    ]


async def test_a_bot_that_answers_later_through_the_push_api(
    ingress: Ingress, store: SqlStore, settings: Settings, queues: Queues, bot: Bot
):
    integration_id, token = await make_integration(store, settings)
    _, sent = await ingress.post(integration_id, token, message(1, text="later"))
    async with start_bot_worker(http_bot(settings, bot)) as worker:
        await eventually(lambda: _done(worker))
    posted = next(b for b in bot.received if b["message"]["id"] == sent["message"]["id"])
    assert await queues.take("outbound") == []  # nothing yet: the bot answers later
    status, answer = await push(
        ingress,
        posted["replyUrl"],
        posted["botToken"],
        {"type": "text", "payload": {"text": "done thinking"}},
    )
    assert status == 201, answer
    assert answer["message"]["direction"] == "outgoing"
    assert answer["message"]["sequence"] == 1
    assert answer["message"]["conversationId"] == sent["conversation"]["id"]
    [response] = await take_until(queues, "outbound", 1)
    assert response["body"]["payload"] == {"text": "done thinking"}
    assert response["body"]["botpressMessageId"] == answer["message"]["id"]
    assert response["deliveryId"] == f"msg_{answer['message']['id']}"


async def _done(worker: Any) -> bool:
    return settled(worker, "done") >= 1


async def test_a_bot_that_is_down_is_retried_and_one_that_refuses_is_dead_lettered(
    ingress: Ingress, store: SqlStore, settings: Settings, queues: Queues, bot: Bot
):
    integration_id, token = await make_integration(store, settings)
    await ingress.post(integration_id, token, message(1, text="down"))
    await ingress.post(integration_id, token, message(2, text="refuse", conversationId="c2"))
    async with start_bot_worker(http_bot(settings, bot)) as worker:
        await eventually(lambda: _dead(worker, 2))
        assert settled(worker, "retry") == len(settings.bot_retry_delays)
    assert await queues.take("outbound") == []


async def _dead(worker: Any, count: int) -> bool:
    return settled(worker, "dead") >= count


async def push(
    ingress: Ingress,
    url: str,
    token: str | None,
    body: Any,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, Any]]:
    """POST to the push API of the ingress under test (whatever host the URL names)."""
    sent = dict(headers or {})
    if token is not None:
        sent["Authorization"] = f"Bearer {token}"
    async with ingress.http.post(
        f"{ingress.url}{urlsplit(url).path}", json=body, headers=sent
    ) as response:
        return response.status, await response.json()


async def conversation_of(ingress: Ingress, store: SqlStore, settings: Settings) -> tuple[str, str]:
    integration_id, token = await make_integration(store, settings)
    _, sent = await ingress.post(integration_id, token, message(1))
    return integration_id, sent["conversation"]["id"]


async def test_push_with_a_bot_token_and_an_idempotency_key(
    ingress: Ingress, store: SqlStore, settings: Settings, queues: Queues
):
    integration_id, conversation = await conversation_of(ingress, store, settings)
    await queues.take("inbound")
    bot_token, _ = await admin.create_token(store, integration_id, "bot")
    url = f"/bot/conversations/{conversation}/messages"
    body = {
        "type": "card",
        "payload": {
            "title": "Hi",
            "actions": [{"action": "postback", "label": "Go", "value": "go"}],
        },
    }
    first = await push(ingress, url, bot_token, body, {"Idempotency-Key": "k-1"})
    again = await push(ingress, url, bot_token, body, {"Idempotency-Key": "k-1"})
    other = await push(ingress, url, bot_token, body, {"Idempotency-Key": "k-2"})
    assert first[0] == again[0] == other[0] == 201
    assert again[1] == first[1]
    assert other[1]["message"]["id"] != first[1]["message"]["id"]
    assert [first[1]["message"]["sequence"], other[1]["message"]["sequence"]] == [1, 2]
    responses = await take_until(queues, "outbound", 2)
    assert sorted(r["body"]["sequence"] for r in responses) == [1, 2]


PUSH_ERRORS = [
    ("no type", {"payload": {"text": "x"}}, "type"),
    ("payload not an object", {"type": "text", "payload": "x"}, "payload"),
    ("text without text", {"type": "text", "payload": {}}, "payload.text"),
    (
        "image with a bad url",
        {"type": "image", "payload": {"imageUrl": "ftp://x"}},
        "payload.imageUrl",
    ),
]


@pytest.mark.parametrize(("case", "body", "field"), PUSH_ERRORS, ids=[c[0] for c in PUSH_ERRORS])
async def test_push_refuses_invalid_messages_with_400(
    ingress: Ingress,
    store: SqlStore,
    settings: Settings,
    queues: Queues,
    case: str,
    body: dict[str, Any],
    field: str,
):
    integration_id, conversation = await conversation_of(ingress, store, settings)
    bot_token, _ = await admin.create_token(store, integration_id, "bot")
    status, answer = await push(
        ingress, f"/bot/conversations/{conversation}/messages", bot_token, body
    )
    assert status == 400, answer
    assert field in [d["field"] for d in answer["error"]["details"]]
    assert await queues.take("outbound") == []


async def test_push_refuses_wrong_tokens_and_unknown_conversations(
    ingress: Ingress, store: SqlStore, settings: Settings, queues: Queues
):
    integration_id, conversation = await conversation_of(ingress, store, settings)
    other_integration, other_conversation = await conversation_of(ingress, store, settings)
    integration_token, _ = await admin.create_token(store, integration_id, "integration")
    foreign_bot, _ = await admin.create_token(store, other_integration, "bot")
    url = f"/bot/conversations/{conversation}/messages"
    body = {"type": "text", "payload": {"text": "x"}}
    from relay.auth import reply_token

    secret = await store.bot_secret(integration_id)
    for token in (
        None,
        "rly_nope",
        integration_token,
        foreign_bot,
        reply_token(secret, other_conversation, 2**31),  # another conversation's
        reply_token(secret, conversation, 1),  # expired
        reply_token("not-the-secret", conversation, 2**31),
        "rlyr_\u00e9t\u00e9.x",  # not even ASCII
    ):
        status, answer = await push(ingress, url, token, body)
        assert status == 401, (token, answer)
    status, _ = await push(ingress, url, reply_token(secret, conversation, 2**31), body)
    assert status == 201
    status, answer = await push(ingress, "/bot/conversations/nope/messages", foreign_bot, body)
    assert status == 404
    assert answer["error"]["code"] == "not_found"
    assert len(await take_until(queues, "outbound", 1)) == 1
