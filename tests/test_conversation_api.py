"""The conversation API against a real broker, both stores, an ingress, a bot worker and a
delivery worker: the reply in the POST's answer (`?wait`), the history with its watermark,
the event streams (fanned out through RabbitMQ to a second ingress), read tokens, and
every 400/401/404 on the way. Several processes: tests/test_conversation_fleet.py."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from relay import admin
from relay.ingress.app import BROKER_KEY, FEED_KEY
from relay.settings import Settings
from relay.store import SqlStore
from relay.wire import InboundEnvelope
from tests.helpers import (
    Ingress,
    eventually,
    make_integration,
    message,
    start_bot_worker,
    start_delivery_worker,
    start_ingress,
)
from tests.receivers import Receiver
from tests.sse import open_stream
from workers.bot.adapters.base import BotContext, BotFailure

Integration = tuple[str, str]


class ScriptedBot:
    """Echoes like the echo bot (typing, then the text); `slow…` takes 1.5 s first, `fail…`
    fails for good (dead-lettered)."""

    async def handle(self, envelope: InboundEnvelope, context: BotContext) -> None:
        if envelope.text.startswith("fail"):
            raise BotFailure("scripted failure", permanent=True)
        if envelope.text.startswith("slow"):
            await asyncio.sleep(1.5)
        await context.reply("typing", {"value": True})
        await context.reply("text", {"text": f"echo: {envelope.text}"})

    async def close(self) -> None:
        pass


@pytest.fixture(scope="module")
async def workers(settings: Settings) -> AsyncIterator[None]:
    async with (
        start_bot_worker(settings, adapter=ScriptedBot()),
        start_delivery_worker(settings),
    ):
        yield


@pytest.fixture(scope="module")
async def integration(store: SqlStore, settings: Settings, receiver: Receiver) -> Integration:
    return await make_integration(store, settings, response_url=receiver.url("conversations"))


@pytest.fixture(scope="module")
async def second_ingress(settings: Settings) -> AsyncIterator[Ingress]:
    """Another ingress on the same broker and store: it learns of news only through RabbitMQ."""
    async with start_ingress(settings) as running:
        yield running


def conversation() -> str:
    return f"conv-{uuid.uuid4().hex[:8]}"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def post(
    ingress: Ingress, integration: Integration, body: dict[str, Any], query: str = ""
) -> tuple[int, dict[str, Any]]:
    integration_id, token = integration
    async with ingress.http.post(
        f"{ingress.url}/webhooks/{integration_id}{query}", json=body, headers=bearer(token)
    ) as answer:
        return answer.status, await answer.json()


async def get(
    ingress: Ingress, path: str, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, Any]]:
    async with ingress.http.get(f"{ingress.url}{path}", headers=headers) as answer:
        return answer.status, await answer.json()


def messages_path(integration: Integration, conversation_id: str, query: str = "") -> str:
    return f"/webhooks/{integration[0]}/conversations/{conversation_id}/messages{query}"


async def history(
    ingress: Ingress, integration: Integration, conversation_id: str, query: str = ""
) -> dict[str, Any]:
    status, body = await get(
        ingress, messages_path(integration, conversation_id, query), bearer(integration[1])
    )
    assert status == 200, body
    return body


async def talk(ingress: Ingress, integration: Integration, conversation_id: str, n: int) -> None:
    """Send `n` messages, each waiting for its turn (2 responses)."""
    for i in range(n):
        body = message(uuid.uuid4().hex, conversationId=conversation_id, text=f"hi {i}")
        status, answer = await post(ingress, integration, body, "?wait=10")
        assert status == 200, answer
        assert answer["complete"] is True


# -- wait for the reply -----------------------------------------------------------------


async def test_wait_answers_the_turns_responses_and_the_webhooks_still_come(
    ingress: Ingress, workers: None, integration: Integration, receiver: Receiver
):
    conv = conversation()
    body = message("w1", conversationId=conv, text="hello")
    loop = asyncio.get_running_loop()
    started = loop.time()
    status, answer = await post(ingress, integration, body, "?wait=10")
    assert status == 200, answer
    assert answer["complete"] is True
    # Woken by the bot worker's news, not by the deadline.
    assert loop.time() - started < 5
    assert answer["message"]["tags"]["id"] == "msg-w1"
    responses = answer["responses"]
    assert [r["type"] for r in responses] == ["typing", "text"]
    assert responses[1]["payload"] == {"text": "echo: hello"}
    assert [r["sequence"] for r in responses] == [1, 2]

    # The same bodies are delivered, under the webhook-id the answer gave as `id`.
    async def delivered() -> list[Any]:
        return [h for h in receiver.at("conversations") if h.body["conversationId"] == conv]

    hits = await eventually(lambda: _at_least(delivered, 2))
    by_id = {hit.headers["webhook-id"]: hit.body for hit in hits}
    for response in responses:
        webhook_id = response.pop("id")
        assert by_id[webhook_id] == response

    # A repeated POST of the same messageId answers the same responses (nothing re-queued).
    status, again = await post(ingress, integration, body, "?wait=5")
    assert status == 200
    assert again["message"]["id"] == answer["message"]["id"]
    assert [r["id"] for r in again["responses"]] == list(by_id)
    assert again["complete"] is True


async def _at_least(probe: Any, count: int) -> list[Any]:
    found: list[Any] = await probe()
    return found if len(found) >= count else []


async def test_wait_gives_up_at_its_deadline_and_a_repeat_gets_what_came_since(
    ingress: Ingress, workers: None, integration: Integration
):
    conv = conversation()
    body = message("slow-1", conversationId=conv, text="slow one")
    status, answer = await post(ingress, integration, body, "?wait=0.2")
    assert status == 200
    assert answer == {**answer, "responses": [], "complete": False}
    status, again = await post(ingress, integration, body, "?wait=5")
    assert status == 200
    assert again["complete"] is True
    assert [r["payload"] for r in again["responses"]][1] == {"text": "echo: slow one"}


async def test_wait_on_a_dead_lettered_turn_ends_at_once_incomplete(
    ingress: Ingress, workers: None, integration: Integration
):
    body = message("fail-1", conversationId=conversation(), text="fail now")
    loop = asyncio.get_running_loop()
    started = loop.time()
    status, answer = await post(ingress, integration, body, "?wait=20")
    assert status == 200
    assert (answer["responses"], answer["complete"]) == ([], False)
    assert loop.time() - started < 10


@pytest.mark.parametrize("wait", ["0", "-1", "30.5", "31", "abc", "nan", "inf", ""])
async def test_wait_out_of_range_is_a_400_and_nothing_is_accepted(
    ingress: Ingress, integration: Integration, store: SqlStore, wait: str
):
    message_id = f"bad-wait-{uuid.uuid4().hex[:6]}"
    status, answer = await post(ingress, integration, message(message_id), f"?wait={wait}")
    assert status == 400
    assert answer["error"]["code"] == "invalid_query"
    assert await store.find_incoming(integration[0], message_id) is None


# -- history ----------------------------------------------------------------------------


async def test_history_lists_messages_and_responses_oldest_first_with_delivery_state(
    ingress: Ingress, workers: None, integration: Integration
):
    conv = conversation()
    await talk(ingress, integration, conv, 2)

    async def all_delivered() -> dict[str, Any] | None:
        body = await history(ingress, integration, conv)
        states = [m["delivery"]["state"] for m in body["messages"] if "delivery" in m]
        return body if states == ["delivered"] * 4 else None

    body = await eventually(all_delivered)
    items = body["messages"]
    assert [m["direction"] for m in items] == ["incoming", "outgoing", "outgoing"] * 2
    first, typing, text = items[:3]
    assert first["type"] == "text"
    assert first["payload"] == {"text": "hi 0"}
    assert first["conversationId"] == conv
    assert "sequence" not in first
    assert "delivery" not in first
    assert text["payload"] == {"text": "echo: hi 0"}
    assert text["webhookId"] == f"msg_{text['botpressMessageId']}"
    assert text["delivery"] == {"state": "delivered", "attempts": 1}
    assert [m["sequence"] for m in items if m["direction"] == "outgoing"] == [1, 2, 3, 4]
    assert typing["botpressConversationId"] == first["botpressConversationId"]
    assert body["watermark"] == items[-1]["id"]
    assert len({m["id"] for m in items}) == 6

    # After a watermark: only what is newer; paging by one covers it all, once.
    newer = await history(ingress, integration, conv, f"?after={items[2]['id']}")
    assert [m["id"] for m in newer["messages"]] == [m["id"] for m in items[3:]]
    paged, after = [], ""
    for _ in range(10):
        page = await history(
            ingress, integration, conv, f"?limit=1&after={after}" if after else "?limit=1"
        )
        if not page["messages"]:
            assert page["watermark"] == after
            break
        paged += page["messages"]
        after = page["watermark"]
    assert [m["id"] for m in paged] == [m["id"] for m in items]


async def test_history_shows_failed_then_dead_deliveries(
    ingress: Ingress, workers: None, store: SqlStore, settings: Settings, receiver: Receiver
):
    url = receiver.on("failing", *[500] * 20)
    integration = await make_integration(store, settings, response_url=url)
    conv = conversation()
    await talk(ingress, integration, conv, 1)

    async def states() -> set[str]:
        body = await history(ingress, integration, conv)
        return {m["delivery"]["state"] for m in body["messages"] if "delivery" in m}

    # Failed attempts first, then (the schedule has four) dead-lettered.
    await eventually(lambda: _contains(states, "dead"), timeout=20)
    body = await history(ingress, integration, conv)
    dead = [m for m in body["messages"] if m.get("delivery", {}).get("state") == "dead"]
    assert dead[0]["delivery"]["attempts"] >= 1


async def _contains(probe: Any, value: str) -> bool:
    return value in await probe()


async def test_history_refuses_bad_queries_unknown_conversations_and_strangers(
    ingress: Ingress, workers: None, integration: Integration, store: SqlStore, settings: Settings
):
    conv = conversation()
    await talk(ingress, integration, conv, 1)
    token = bearer(integration[1])
    for query in (
        "?limit=0",
        "?limit=1001",
        "?limit=ten",
        "?after=abc",
        "?after=1.",
        "?after=-1.2",
    ):
        status, body = await get(ingress, messages_path(integration, conv, query), token)
        assert status == 400, query
        assert body["error"]["code"] == "invalid_query"
    status, _ = await get(ingress, messages_path(integration, conv, "?limit=1000"), token)
    assert status == 200
    status, body = await get(ingress, messages_path(integration, "no-such-conversation"), token)
    assert (status, body["error"]["code"]) == (404, "not_found")
    # Another integration's token, or this conversation under another integration: 401, 404.
    other = await make_integration(store, settings, name="other")
    status, _ = await get(ingress, messages_path(integration, conv), bearer(other[1]))
    assert status == 401
    status, _ = await get(ingress, messages_path(other, conv), bearer(other[1]))
    assert status == 404
    status, _ = await get(ingress, messages_path(integration, conv))
    assert status == 401
    # An integration token is no read token: never accepted in the query.
    status, _ = await get(ingress, messages_path(integration, conv, f"?token={integration[1]}"))
    assert status == 401


# -- read tokens ------------------------------------------------------------------------


async def read_token(ingress: Ingress, integration: Integration, conv: str) -> dict[str, Any]:
    async with ingress.http.post(
        f"{ingress.url}/webhooks/{integration[0]}/conversations/{conv}/tokens",
        json={"userId": "reader"},
        headers=bearer(integration[1]),
    ) as answer:
        assert answer.status == 201, await answer.text()
        body: dict[str, Any] = await answer.json()
        return body


async def test_a_read_token_reads_one_conversation_and_nothing_else(
    ingress: Ingress, workers: None, integration: Integration
):
    conv, other_conv = conversation(), conversation()
    await talk(ingress, integration, conv, 1)
    await talk(ingress, integration, other_conv, 1)
    answer = await read_token(ingress, integration, conv)
    token = answer["token"]
    assert answer["expiresAt"].endswith("Z")
    status, body = await get(ingress, messages_path(integration, conv, f"?token={token}"))
    assert status == 200
    assert len(body["messages"]) == 3
    status, _ = await get(ingress, messages_path(integration, conv), bearer(token))
    assert status == 200
    url = f"{ingress.url}/webhooks/{integration[0]}/conversations/{conv}/events?token={token}"
    async with open_stream(ingress.http, url) as stream:
        assert len(await stream.take(3)) == 3
    # Not another conversation, not the integration's stream, not a POST, not a new token.
    status, _ = await get(ingress, messages_path(integration, other_conv, f"?token={token}"))
    assert status == 401
    status, _ = await get(ingress, messages_path(integration, "nowhere", f"?token={token}"))
    assert status == 401
    status, _ = await get(ingress, f"/webhooks/{integration[0]}/events?token={token}")
    assert status == 401
    status, _ = await post(ingress, (integration[0], token), message(uuid.uuid4().hex))
    assert status == 401
    async with ingress.http.post(
        f"{ingress.url}/webhooks/{integration[0]}/conversations/{conv}/tokens",
        headers=bearer(token),
    ) as refused:
        assert refused.status == 401
    async with ingress.http.post(
        f"{ingress.url}/webhooks/{integration[0]}/conversations/nowhere/tokens",
        json={"userId": "reader"},
        headers=bearer(integration[1]),
    ) as unknown:
        assert unknown.status == 404


async def test_a_read_token_expires(settings: Settings, workers: None, integration: Integration):
    short = settings.model_copy(update={"read_token_seconds": 3.0})
    async with start_ingress(short) as ingress:
        conv = conversation()
        await talk(ingress, integration, conv, 1)
        token = (await read_token(ingress, integration, conv))["token"]
        path = messages_path(integration, conv, f"?token={token}")
        assert (await get(ingress, path))[0] == 200

        async def refused() -> bool:
            return (await get(ingress, path))[0] == 401

        await eventually(refused, timeout=10, interval=0.1)


# -- event streams ----------------------------------------------------------------------


def events_url(ingress: Ingress, integration: Integration, conv: str | None = None) -> str:
    scope = f"/conversations/{conv}" if conv else ""
    return f"{ingress.url}/webhooks/{integration[0]}{scope}/events"


async def test_a_conversation_stream_gives_its_history_then_live_items_and_resumes_without_gap(
    ingress: Ingress, second_ingress: Ingress, workers: None, integration: Integration
):
    conv = conversation()
    await talk(ingress, integration, conv, 1)
    headers = bearer(integration[1])
    # Served by the second ingress: the first one's news reaches it through RabbitMQ.
    async with open_stream(
        second_ingress.http, events_url(second_ingress, integration, conv), headers
    ) as stream:
        seen = await stream.take(3)
        assert stream.retry == "1000"
        assert all(event.event == "message" for event in seen)
        await talk(ingress, integration, conv, 1)
        seen += await stream.take(3)
    assert [e.item["direction"] for e in seen] == ["incoming", "outgoing", "outgoing"] * 2
    assert [e.id for e in seen] == [e.item["id"] for e in seen]

    # Dropped: two more turns meanwhile, then resume from the last event seen.
    await talk(ingress, integration, conv, 2)
    resume = {**headers, "Last-Event-ID": seen[-1].id}
    async with open_stream(ingress.http, events_url(ingress, integration, conv), resume) as again:
        rest = await again.take(6)
    full = (await history(ingress, integration, conv))["messages"]
    assert [e.id for e in seen + rest] == [m["id"] for m in full]
    # `?after=` does the same; Last-Event-ID wins over it (a browser reconnecting keeps its URL).
    url = f"{events_url(ingress, integration, conv)}?after={seen[2].id}"
    async with open_stream(ingress.http, url, headers) as after:
        assert [e.id for e in await after.take(9)] == [m["id"] for m in full[3:]]
    async with open_stream(ingress.http, url, resume) as both:
        assert (await both.next()).id == rest[0].id


async def test_the_integration_stream_starts_now_and_carries_every_conversation(
    ingress: Ingress, second_ingress: Ingress, workers: None, integration: Integration
):
    before = conversation()
    await talk(ingress, integration, before, 1)
    async with open_stream(
        second_ingress.http, events_url(second_ingress, integration), bearer(integration[1])
    ) as stream:
        first, second = conversation(), conversation()
        await talk(ingress, integration, first, 1)
        await talk(second_ingress, integration, second, 1)
        events = await stream.take(6)
    conversations = [e.item["conversationId"] for e in events]
    assert conversations == [first] * 3 + [second] * 3
    ids = [e.id for e in events]
    assert len(set(ids)) == 6


async def test_streams_refuse_bad_resume_points_and_unknown_conversations(
    ingress: Ingress, integration: Integration
):
    headers = bearer(integration[1])
    conv = conversation()
    await talk_without_wait(ingress, integration, conv)
    for url, extra in [
        (f"{events_url(ingress, integration, conv)}?after=nope", {}),
        (events_url(ingress, integration), {"Last-Event-ID": "1.2.3"}),
    ]:
        async with ingress.http.get(url, headers={**headers, **extra}) as answer:
            assert answer.status == 400
            assert (await answer.json())["error"]["code"] == "invalid_query"
    async with ingress.http.get(events_url(ingress, integration, "nowhere"), headers=headers) as a:
        assert a.status == 404
    async with ingress.http.get(events_url(ingress, integration)) as answer:
        assert answer.status == 401
    # A HEAD would hold a stream open for a reader that reads nothing.
    async with ingress.http.head(events_url(ingress, integration), headers=headers) as answer:
        assert answer.status == 405


async def test_a_quiet_stream_gets_keep_alive_comments(
    settings: Settings, integration: Integration
):
    quick = settings.model_copy(update={"stream_keepalive": 0.2})
    async with (
        start_ingress(quick) as ingress,
        open_stream(ingress.http, events_url(ingress, integration), bearer(integration[1])) as s,
    ):
        with pytest.raises(TimeoutError):
            await s.next(timeout=1.0)
        assert s.comments.count(": keep-alive") >= 2


async def test_streams_beyond_the_limit_are_refused_and_stop_ends_them(
    settings: Settings, integration: Integration
):
    one = settings.model_copy(update={"stream_limit": 1})
    url_headers = bearer(integration[1])
    async with (
        start_ingress(one) as ingress,
        open_stream(ingress.http, events_url(ingress, integration), url_headers) as stream,
    ):
        async with ingress.http.get(
            events_url(ingress, integration), headers=url_headers
        ) as refused:
            assert refused.status == 503
            assert refused.headers["Retry-After"] == "5"
        # The ingress stops: the open stream ends (it is not held until the timeout).
        loop = asyncio.get_running_loop()
        started = loop.time()
        closing = asyncio.create_task(ingress.server.close())
        assert await stream.ended(timeout=5)
        await closing
        assert loop.time() - started < 5


async def test_a_reader_that_does_not_read_is_disconnected(
    settings: Settings, store: SqlStore, integration: Integration
):
    """Big pushed messages fill the socket buffers of a reader that reads nothing: the
    stream is dropped after the write timeout, and counted."""
    slow = settings.model_copy(update={"stream_write_timeout": 0.5})
    bot_token, _ = await admin.create_token(store, integration[0], "bot")
    async with start_ingress(slow) as ingress:
        conv = conversation()
        await talk_without_wait(ingress, integration, conv)
        relay_conv = (await history(ingress, integration, conv))["messages"][0][
            "botpressConversationId"
        ]
        text = "x" * 200_000
        for _ in range(40):  # 8 MB: more than the kernel buffers on both ends
            async with ingress.http.post(
                f"{ingress.url}/bot/conversations/{relay_conv}/messages",
                json={"type": "text", "payload": {"text": text}},
                headers=bearer(bot_token),
            ) as answer:
                assert answer.status == 201
        port = int(ingress.url.rsplit(":", 1)[1])
        path = f"/webhooks/{integration[0]}/conversations/{conv}/events"
        async with raw_reader(port, path, integration[1]) as sock:

            async def dropped() -> bool:
                dropped = 'relay_event_streams_dropped_total{reason="slow"}'
                return _sample(await _metrics(ingress), dropped) >= 1

            await eventually(dropped, timeout=15, interval=0.2)
            assert sock.fileno() >= 0
        assert _sample(await _metrics(ingress), "relay_event_streams") == 0


async def talk_without_wait(ingress: Ingress, integration: Integration, conv: str) -> None:
    status, _ = await post(ingress, integration, message(uuid.uuid4().hex, conversationId=conv))
    assert status == 200


@contextlib.asynccontextmanager
async def raw_reader(port: int, path: str, token: str) -> AsyncIterator[socket.socket]:
    """A client that sends the request, then reads nothing, with a small receive window."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    try:
        await loop.sock_connect(sock, ("127.0.0.1", port))
        request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n\r\n"
        await loop.sock_sendall(sock, request.encode())
        yield sock
    finally:
        sock.close()


async def _metrics(ingress: Ingress) -> str:
    async with ingress.http.get(f"{ingress.url}/metrics") as answer:
        return await answer.text()


def _sample(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith((name + " ", name + "{")):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_news_is_a_hint_a_lost_notice_only_delays_a_stream(
    settings: Settings, workers: None, integration: Integration
):
    """With the ingress's news feed cut off (no notices arrive), a stream still shows a new
    item by its next keep-alive read."""
    quick = settings.model_copy(update={"stream_keepalive": 0.5})
    async with start_ingress(quick) as ingress:
        broker = ingress.server.app[BROKER_KEY]
        conv = conversation()
        await talk(ingress, integration, conv, 1)
        # The feed's queue is bound to the news exchange: unbinding it loses every notice.
        feed = ingress.server.app[FEED_KEY]
        await eventually(feed.listening)
        await _unbind(broker.connection, feed.queue_name, broker.topology.news_exchange)
        url = events_url(ingress, integration, conv)
        async with open_stream(ingress.http, url, bearer(integration[1])) as stream:
            await stream.take(3)
            await talk_without_wait(ingress, integration, conv)
            assert (await stream.next(timeout=5)).item["direction"] == "incoming"


async def _unbind(connection: Any, queue: str, exchange: str) -> None:
    channel = await connection.channel()
    try:
        await (await channel.get_queue(queue, ensure=False)).unbind(exchange)
    finally:
        await channel.close()
