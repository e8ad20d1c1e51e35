"""`RELAY_BOT=botframework`: a real botbuilder bot behind the relay, and the connector routes.

The bot is an unmodified botbuilder `ActivityHandler` served by `CloudAdapter` in no-auth
mode (empty app id and password) on 127.0.0.1, in the test's event loop. The ingress is
started on a port bound up front, so one `RELAY_PUBLIC_URL` serves the ingress and the
bot worker, whose Activities carry it as `serviceUrl`.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer, get_unused_port_socket
from botbuilder.core import ActivityHandler, TurnContext
from botbuilder.integration.aiohttp import (
    CloudAdapter,
    ConfigurationBotFrameworkAuthentication,
)
from botbuilder.schema import Activity, ActivityTypes, ConversationReference

from relay.auth import reply_token
from relay.ingress.app import BROKER_KEY, create_app
from relay.settings import Settings
from relay.store import SqlStore
from relay.wire import InboundEnvelope, utcnow
from tests.helpers import (
    Ingress,
    Queues,
    by_conversation,
    eventually,
    make_integration,
    message,
    settled,
    start_bot_worker,
)
from workers.bot.adapters.base import BotContext, BotFailure
from workers.bot.adapters.botframework import TOKEN_SCOPE, BotFrameworkBot

# ---------------------------------------------------------------------------------------
# The bot: written against botbuilder only, as anyone would write one.


class NoAuth:
    """botbuilder configuration of a bot without credentials (local development)."""

    APP_ID = ""
    APP_PASSWORD = ""


class RelayTestBot(ActivityHandler):
    """Typing, two texts, and a proactive text about a second later.

    "flaky" fails (HTTP 500) the first two times each message is seen.
    """

    def __init__(self, adapter: CloudAdapter) -> None:
        self.adapter = adapter
        self.seen: list[Activity] = []
        self.failures: Counter[str] = Counter()
        self.later: set[asyncio.Task[None]] = set()

    async def on_message_activity(self, turn_context: TurnContext) -> None:
        activity = turn_context.activity
        self.seen.append(activity)
        key = activity.channel_data["messageId"]
        if activity.text == "flaky" and self.failures[key] < 2:
            self.failures[key] += 1
            raise RuntimeError("the bot is down for a moment")
        await turn_context.send_activity(Activity(type=ActivityTypes.typing))
        await turn_context.send_activity(f"one: {activity.text}")
        await turn_context.send_activity(f"two: {activity.text}")
        reference = TurnContext.get_conversation_reference(activity)
        task = asyncio.create_task(self.proactive(reference, f"later: {activity.text}"))
        self.later.add(task)
        task.add_done_callback(self.later.discard)

    async def proactive(self, reference: ConversationReference, text: str) -> None:
        await asyncio.sleep(1)

        async def send(turn_context: TurnContext) -> None:
            await turn_context.send_activity(text)

        await self.adapter.continue_conversation(reference, send, "")


@dataclass
class RunningBot:
    bot: RelayTestBot
    url: str


@contextlib.asynccontextmanager
async def run_bot() -> AsyncIterator[RunningBot]:
    """The botbuilder bot on a free port, `POST /api/messages` as usual."""
    adapter = CloudAdapter(ConfigurationBotFrameworkAuthentication(NoAuth()))
    bot = RelayTestBot(adapter)

    async def messages(request: web.Request) -> web.Response:
        response = await adapter.process(request, bot)
        assert response is not None
        return response

    app = web.Application()
    app.router.add_post("/api/messages", messages)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        yield RunningBot(bot, f"http://127.0.0.1:{server.port}/api/messages")
    finally:
        for task in list(bot.later):
            task.cancel()
        await asyncio.gather(*bot.later, return_exceptions=True)
        await server.close()


@pytest.fixture(scope="module")
async def bot() -> AsyncIterator[RunningBot]:
    async with run_bot() as running:
        yield running


@dataclass
class Relay:
    """The ingress on a port chosen before it started, with the settings that name it."""

    settings: Settings
    ingress: Ingress
    conversations: dict[str, str] = field(default_factory=dict)


@pytest.fixture(scope="module")
async def relay(settings: Settings, bot: RunningBot) -> AsyncIterator[Relay]:
    sock = get_unused_port_socket("127.0.0.1")
    port = sock.getsockname()[1]
    configured = settings.model_copy(
        update={
            "public_url": f"http://127.0.0.1:{port}",
            "bot": "botframework",
            "bot_url": bot.url,
        }
    )
    app = create_app(configured)
    server = TestServer(app, host="127.0.0.1", socket_factory=lambda *_: sock)
    await server.start_server()
    try:
        await asyncio.wait_for(app[BROKER_KEY].wait_connected(), 15)
        async with aiohttp.ClientSession() as http:
            yield Relay(configured, Ingress(configured.public_base_url, http, server))
    finally:
        await server.close()


async def responses_of(
    queues: Queues, conversation: str, count: int, timeout: float = 20.0
) -> list[dict[str, Any]]:
    """The outbound responses of one caller conversation, in arrival order, once `count` came."""
    got: list[dict[str, Any]] = []

    async def enough() -> bool:
        got.extend(await queues.take("outbound"))
        return len(by_conversation(got).get(conversation, [])) >= count

    await eventually(enough, timeout=timeout, interval=0.05)
    return [item for item in got if item["body"]["conversationId"] == conversation]


def shown(responses: list[dict[str, Any]]) -> list[tuple[int, str, dict[str, Any]]]:
    return [(r["body"]["sequence"], r["body"]["type"], r["body"]["payload"]) for r in responses]


# ---------------------------------------------------------------------------------------
# End to end: back end -> ingress -> bot worker -> botbuilder bot -> connector -> outbound.


async def test_a_botbuilder_bot_answers_through_the_relay_in_order(
    relay: Relay, bot: RunningBot, store: SqlStore, queues: Queues
):
    integration_id, token = await make_integration(store, relay.settings)
    status, answer = await relay.ingress.post(
        integration_id, token, message("e2e", conversationId="bf-e2e", text="hi")
    )
    assert status == 200
    async with start_bot_worker(relay.settings) as worker:
        responses = await responses_of(queues, "bf-e2e", 4)
        assert settled(worker, "done") == 1
    assert shown(responses) == [
        (1, "typing", {"value": True}),
        (2, "text", {"text": "one: hi"}),
        (3, "text", {"text": "two: hi"}),
        (4, "text", {"text": "later: hi"}),
    ]
    for response in responses:
        assert response["integrationId"] == integration_id
        assert response["body"]["botpressConversationId"] == answer["conversation"]["id"]
        assert response["body"]["botpressUserId"] == answer["user"]["id"]
    # What the bot was handed: a Bot Framework message Activity from the relay channel.
    [activity] = [a for a in bot.bot.seen if a.conversation.id == answer["conversation"]["id"]]
    assert activity.type == "message"
    assert activity.channel_id == "relay"
    assert activity.text == "hi"
    assert activity.from_property.id == answer["user"]["id"]
    assert activity.from_property.name == "user-1"
    assert activity.recipient.id == "bot"
    assert activity.service_url.startswith(f"{relay.settings.public_base_url}/botframework/rlyr_")
    assert activity.channel_data["messageId"] == answer["message"]["id"]
    assert activity.channel_data["conversationId"] == "bf-e2e"
    assert activity.channel_data["payload"] == {"text": "hi"}


async def test_a_bot_answering_500_is_retried_until_it_answers(
    relay: Relay, bot: RunningBot, store: SqlStore, queues: Queues
):
    integration_id, token = await make_integration(store, relay.settings)
    await relay.ingress.post(
        integration_id, token, message("flaky", conversationId="bf-flaky", text="flaky")
    )
    async with start_bot_worker(relay.settings) as worker:
        responses = await responses_of(queues, "bf-flaky", 4)
        assert settled(worker, "retry") == 2
        assert settled(worker, "done") == 1
    assert [payload for _, _, payload in shown(responses)] == [
        {"value": True},
        {"text": "one: flaky"},
        {"text": "two: flaky"},
        {"text": "later: flaky"},
    ]


# ---------------------------------------------------------------------------------------
# The connector routes, called directly.


@dataclass
class Conversation:
    integration_id: str
    id: str
    token: str


async def open_conversation(
    relay: Relay, store: SqlStore, caller_conversation: str
) -> Conversation:
    """A conversation the back end started, and a reply token for it."""
    integration_id, token = await make_integration(store, relay.settings)
    _, answer = await relay.ingress.post(
        integration_id, token, message(caller_conversation, conversationId=caller_conversation)
    )
    conversation_id = answer["conversation"]["id"]
    secret = await store.bot_secret(integration_id)
    return Conversation(
        integration_id, conversation_id, reply_token(secret, conversation_id, int(time.time()) + 60)
    )


async def send(
    relay: Relay,
    token: str,
    conversation_id: str,
    activity: Any,
    reply_to: str | None = None,
    method: str = "POST",
) -> tuple[int, dict[str, Any]]:
    url = f"{relay.settings.public_base_url}/botframework/{token}/v3/conversations/"
    url += f"{conversation_id}/activities" + (f"/{reply_to}" if reply_to else "")
    data = activity if isinstance(activity, bytes) else None
    body = None if isinstance(activity, bytes) else activity
    async with relay.ingress.http.request(method, url, json=body, data=data) as response:
        return response.status, await response.json(content_type=None)


HERO = {
    "contentType": "application/vnd.microsoft.card.hero",
    "content": {
        "title": "Pizza",
        "subtitle": "Margherita",
        "images": [{"url": "https://example.com/pizza.png"}],
        "buttons": [
            {"type": "imBack", "title": "Order", "value": "order"},
            {"type": "openUrl", "title": "Menu", "value": "https://example.com/menu"},
            {"type": "postBack", "title": "Later", "value": {"later": True}},
        ],
    },
}


async def test_each_kind_of_activity_becomes_relay_messages(
    relay: Relay, store: SqlStore, queues: Queues
):
    conv = await open_conversation(relay, store, "bf-kinds")
    activities = [
        {"type": "typing"},
        {"type": "message", "text": "plain"},
        {"type": "message", "text": "**bold**", "textFormat": "markdown"},
        {
            "type": "message",
            "text": "look",
            "attachments": [
                {"contentType": "image/png", "contentUrl": "https://example.com/a.png"},
                HERO,
                {
                    "contentType": "application/pdf",
                    "contentUrl": "https://example.com/a.pdf",
                    "name": "a.pdf",
                },
                {"contentType": "application/vnd.microsoft.card.adaptive", "content": {}},
            ],
        },
        {
            "type": "message",
            "text": "Size?",
            "suggestedActions": {"actions": [{"type": "imBack", "title": "Big", "value": "big"}]},
        },
        {"type": "event", "name": "something"},
    ]
    ids = []
    for activity in activities:
        status, answer = await send(relay, conv.token, conv.id, activity, reply_to="act-1")
        assert status == 200, answer
        ids.append(answer["id"])
    responses = await responses_of(queues, "bf-kinds", 8)
    assert shown(responses) == [
        (1, "typing", {"value": True}),
        (2, "text", {"text": "plain"}),
        (3, "markdown", {"markdown": "**bold**"}),
        (4, "text", {"text": "look"}),
        (5, "image", {"imageUrl": "https://example.com/a.png"}),
        (
            6,
            "card",
            {
                "title": "Pizza",
                "subtitle": "Margherita",
                "imageUrl": "https://example.com/pizza.png",
                "actions": [
                    {"action": "say", "label": "Order", "value": "order"},
                    {"action": "url", "label": "Menu", "value": "https://example.com/menu"},
                    {"action": "postback", "label": "Later", "value": '{"later": true}'},
                ],
            },
        ),
        (7, "file", {"fileUrl": "https://example.com/a.pdf", "title": "a.pdf"}),
        (8, "choice", {"text": "Size?", "options": [{"label": "Big", "value": "big"}]}),
    ]
    # the answer names the first message each activity stored (any id for the event)
    by_id = {r["body"]["botpressMessageId"]: r["body"]["sequence"] for r in responses}
    assert [by_id.get(i) for i in ids] == [1, 2, 3, 4, 8, None]
    assert ids[-1]


async def test_an_activity_id_makes_a_retried_post_store_nothing_new_but_a_put_is_new(
    relay: Relay, store: SqlStore, queues: Queues
):
    conv = await open_conversation(relay, store, "bf-retry")
    activity = {"type": "message", "id": "bot-activity-1", "text": "once"}
    first = await send(relay, conv.token, conv.id, activity)
    again = await send(relay, conv.token, conv.id, activity)
    assert first[0] == again[0] == 200
    assert first[1]["id"] == again[1]["id"]
    edited = {**activity, "text": "edited"}
    status, answer = await send(relay, conv.token, conv.id, edited, "bot-activity-1", "PUT")
    assert status == 200
    assert answer["id"] != first[1]["id"]
    responses = await responses_of(queues, "bf-retry", 2)
    assert shown(responses) == [(1, "text", {"text": "once"}), (2, "text", {"text": "edited"})]


async def test_a_wrong_or_expired_token_is_refused(relay: Relay, store: SqlStore, queues: Queues):
    conv = await open_conversation(relay, store, "bf-auth")
    other = await open_conversation(relay, store, "bf-auth-other")
    secret = await store.bot_secret(conv.integration_id)
    tokens = {
        "garbage": "rlyr_nonsense",
        "another conversation's": other.token,
        "expired": reply_token(secret, conv.id, int(time.time()) - 1),
        "wrongly signed": reply_token("not-the-secret", conv.id, int(time.time()) + 60),
        "non-ASCII": "rlyr_%C3%A9t%C3%A9",
    }
    text = {"type": "message", "text": "sneaky"}
    for name, token in tokens.items():
        status, answer = await send(relay, token, conv.id, text)
        assert (name, status, answer["error"]["code"]) == (name, 401, "unauthorized")
    status, _ = await send(relay, conv.token, conv.id, text, reply_to="a1")
    assert status == 200  # the right token works on the very same route


async def test_an_unknown_conversation_is_not_found(relay: Relay, store: SqlStore, queues: Queues):
    conv = await open_conversation(relay, store, "bf-404")
    for conversation_id in ("no-such-conversation", "%00"):
        status, answer = await send(relay, conv.token, conversation_id, {"type": "typing"})
        assert status == 404
        assert answer["error"]["code"] == "not_found"


async def test_an_invalid_activity_is_refused_and_nothing_is_stored(
    relay: Relay, store: SqlStore, queues: Queues
):
    conv = await open_conversation(relay, store, "bf-400")
    bad_image = {
        "type": "message",
        "text": "this text is not stored either",
        "attachments": [{"contentType": "image/png", "contentUrl": "not a url"}],
    }
    status, answer = await send(relay, conv.token, conv.id, bad_image)
    assert status == 400
    assert answer["error"]["code"] == "invalid_body"
    [detail] = answer["error"]["details"]
    assert detail["field"] == "payload.imageUrl"
    assert detail["activityField"] == "attachments.0"
    cases = {
        b"not json": "body",
        b"[1]": "body",
        b'{"text": "no type"}': "type",
        b'{"type": "message", "attachments": [{"contentType": "application/vnd.microsoft.card'
        b'.hero", "content": {"buttons": "nope"}}]}': "attachments.0.content.buttons",
        b'{"type": "message", "attachments": [{"contentType": "application/vnd.microsoft.card'
        b'.hero", "content": {"buttons": []}}]}': "payload.title",
    }
    for raw, field_name in cases.items():
        status, answer = await send(relay, conv.token, conv.id, raw)
        assert status == 400, raw
        details = answer["error"]["details"]
        fields = [d["field"] for d in details] if isinstance(details, list) else ["body"]
        assert field_name in fields, (raw, details)
    await send(relay, conv.token, conv.id, {"type": "message", "text": "fine"})
    [response] = await responses_of(queues, "bf-400", 1)
    assert shown([response]) == [(1, "text", {"text": "fine"})]


# ---------------------------------------------------------------------------------------
# The adapter alone, against a scripted HTTP endpoint (no broker, no store).


@dataclass
class Scripted:
    """An HTTP endpoint that records what it gets and answers what it is told."""

    url: str
    bot_calls: list[tuple[dict[str, str], dict[str, Any]]] = field(default_factory=list)
    token_calls: list[dict[str, str]] = field(default_factory=list)
    status: int = 201
    delay: float = 0.0
    token_status: int = 200


@pytest.fixture(scope="module")
async def scripted() -> AsyncIterator[Scripted]:
    state = Scripted(url="")

    async def bot_endpoint(request: web.Request) -> web.Response:
        state.bot_calls.append((dict(request.headers), await request.json()))
        await asyncio.sleep(state.delay)
        return web.Response(status=state.status)

    async def token_endpoint(request: web.Request) -> web.Response:
        state.token_calls.append(dict(await request.post()))  # type: ignore[arg-type]
        if state.token_status != 200:
            return web.json_response({"error": "invalid_client"}, status=state.token_status)
        return web.json_response(
            {"token_type": "Bearer", "expires_in": 3600, "access_token": "token-1"}
        )

    app = web.Application()
    app.router.add_post("/api/messages", bot_endpoint)
    app.router.add_post("/token", token_endpoint)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    state.url = f"http://127.0.0.1:{server.port}"
    yield state
    await server.close()


@pytest.fixture
def endpoint(scripted: Scripted) -> Scripted:
    """The scripted endpoint, reset for this test."""
    scripted.bot_calls.clear()
    scripted.token_calls.clear()
    scripted.status, scripted.delay, scripted.token_status = 201, 0.0, 200
    return scripted


def adapter_settings(bot_url: str, **overrides: Any) -> Settings:
    return Settings(
        _env_file=None,  # type: ignore[call-arg]
        bot="botframework",
        bot_url=bot_url,
        bot_timeout=0.5,
        public_url="https://relay.example.com/",
        **overrides,
    )


def an_envelope() -> InboundEnvelope:
    now = utcnow()

    def entity(id_: str, caller_id: str) -> dict[str, Any]:
        return {"id": id_, "createdAt": now, "updatedAt": now, "tags": {"id": caller_id}}

    return InboundEnvelope.model_validate(
        {
            "integrationId": "int-1",
            "text": "a picture",
            "acceptedAt": now,
            "bundle": {
                "user": entity("relay-user", "user-1"),
                "conversation": entity("relay-conv", "conv-1"),
                "message": {
                    **entity("relay-msg", "msg-1"),
                    "type": "image",
                    "payload": {"imageUrl": "https://example.com/p.png", "text": "a picture"},
                    "direction": "incoming",
                    "conversationId": "relay-conv",
                    "userId": "relay-user",
                },
            },
        }
    )


async def hand_over(adapter: BotFrameworkBot) -> None:
    envelope = an_envelope()

    async def late(type_: str, payload: dict[str, Any]) -> None:
        raise AssertionError("the botframework adapter replies through the connector only")

    await adapter.handle(envelope, BotContext(envelope, "unused", "rlyr_token.mac", late))


async def test_the_activity_the_bot_receives(endpoint: Scripted):
    adapter = BotFrameworkBot(adapter_settings(f"{endpoint.url}/api/messages"))
    try:
        await hand_over(adapter)
    finally:
        await adapter.close()
    [(headers, activity)] = endpoint.bot_calls
    assert "Authorization" not in headers  # no app id: a bot in no-auth mode
    assert headers["Content-Type"].startswith("application/json")
    assert len(activity.pop("id")) == 32
    assert activity.pop("timestamp").endswith("Z")
    assert activity == {
        "type": "message",
        "channelId": "relay",
        "serviceUrl": "https://relay.example.com/botframework/rlyr_token.mac/",
        "from": {"id": "relay-user", "name": "user-1"},
        "recipient": {"id": "bot"},
        "conversation": {"id": "relay-conv"},
        "text": "a picture",
        "channelData": {
            "integrationId": "int-1",
            "messageId": "relay-msg",
            "conversationId": "conv-1",
            "userId": "user-1",
            "type": "image",
            "payload": {"imageUrl": "https://example.com/p.png", "text": "a picture"},
        },
    }


@pytest.mark.parametrize(
    ("status", "delay", "outcome"),
    [
        (200, 0, "ok"),
        (201, 0, "ok"),
        (202, 0, "ok"),
        (500, 0, "retried"),
        (503, 0, "retried"),
        (429, 0, "retried"),
        (408, 0, "retried"),
        (201, 2.0, "retried"),  # slower than bot_timeout
        (400, 0, "permanent"),
        (401, 0, "permanent"),
        (404, 0, "permanent"),
    ],
)
async def test_the_bot_answer_decides_retry_or_dead_letter(
    endpoint: Scripted, status: int, delay: float, outcome: str
):
    endpoint.status, endpoint.delay = status, delay
    adapter = BotFrameworkBot(adapter_settings(f"{endpoint.url}/api/messages"))
    try:
        if outcome == "ok":
            await hand_over(adapter)
            return
        with pytest.raises(BotFailure) as failure:
            await hand_over(adapter)
        assert failure.value.permanent is (outcome == "permanent")
    finally:
        await adapter.close()


async def test_an_unreachable_bot_is_retried():
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    adapter = BotFrameworkBot(adapter_settings(f"http://127.0.0.1:{port}/api/messages"))
    try:
        with pytest.raises(BotFailure) as failure:
            await hand_over(adapter)
        assert not failure.value.permanent
    finally:
        await adapter.close()


async def test_with_an_app_id_a_cached_oauth_token_is_sent(endpoint: Scripted):
    settings = adapter_settings(
        f"{endpoint.url}/api/messages",
        botframework_app_id="app-id",
        botframework_app_password="app-password",
    )
    adapter = BotFrameworkBot(settings, token_url=f"{endpoint.url}/token")
    try:
        await hand_over(adapter)
        await hand_over(adapter)
    finally:
        await adapter.close()
    assert endpoint.token_calls == [
        {
            "grant_type": "client_credentials",
            "client_id": "app-id",
            "client_secret": "app-password",
            "scope": TOKEN_SCOPE,
        }
    ]
    assert TOKEN_SCOPE == "https://api.botframework.com/.default"
    assert [h["Authorization"] for h, _ in endpoint.bot_calls] == ["Bearer token-1"] * 2


async def test_refused_credentials_are_a_permanent_failure(endpoint: Scripted):
    endpoint.token_status = 401
    settings = adapter_settings(
        f"{endpoint.url}/api/messages",
        botframework_app_id="app-id",
        botframework_app_password="wrong",
    )
    adapter = BotFrameworkBot(settings, token_url=f"{endpoint.url}/token")
    try:
        with pytest.raises(BotFailure) as failure:
            await hand_over(adapter)
        assert failure.value.permanent
    finally:
        await adapter.close()
    assert endpoint.bot_calls == []


def test_a_bot_url_is_required():
    with pytest.raises(ValueError, match="RELAY_BOT_URL"):
        BotFrameworkBot(adapter_settings(""))
