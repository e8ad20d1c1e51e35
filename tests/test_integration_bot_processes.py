"""Many bots in one running Relay: a `relay bot-worker` process serves three integrations,
each on its own bot (an HTTP bot that hangs, a Python bot, the deployment's RELAY_BOT). The
hung bot holds at most its integration's share of the worker's turns, so the others answer
at once; when it answers again, its messages are answered, in order, none lost."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web

from relay.settings import Settings
from relay.store import BotChoice, SqlStore
from tests.helpers import (
    Ingress,
    Queues,
    by_conversation,
    eventually,
    make_integration,
    message,
    take_until,
)
from tests.test_cli import relay_processes

BOT_SECRET = "bot-secret-CANARY"


class HangingBot:
    """An HTTP bot that holds every request until `release`, then answers each."""

    def __init__(self) -> None:
        self.released = asyncio.Event()
        self.seen: list[dict[str, Any]] = []
        self.authorizations: set[str] = set()

    async def handle(self, request: web.Request) -> web.Response:
        self.authorizations.add(request.headers.get("Authorization", ""))
        body = await request.json()
        self.seen.append(body)
        await self.released.wait()
        return web.json_response([{"type": "text", "payload": {"text": f"back: {body['text']}"}}])


@pytest.fixture
async def hanging_bot() -> AsyncIterator[tuple[HangingBot, str]]:
    bot = HangingBot()
    app = web.Application()
    app.router.add_post("/bot", bot.handle)
    runner = web.AppRunner(app, shutdown_timeout=1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield bot, f"http://127.0.0.1:{port}/bot"
    finally:
        bot.released.set()
        await runner.cleanup()


async def test_a_hung_bot_holds_only_its_own_integration(
    ingress: Ingress,
    store: SqlStore,
    settings: Settings,
    queues: Queues,
    hanging_bot: tuple[HangingBot, str],
):
    hung, url = hanging_bot
    hung_id, hung_token = await make_integration(store, settings)
    assert await store.set_bot(hung_id, BotChoice(adapter="http", url=url, secret=BOT_SECRET))
    python_id, python_token = await make_integration(store, settings)
    assert await store.set_bot(python_id, BotChoice(adapter="tests.bots:numbered"))
    default_id, default_token = await make_integration(store, settings)  # RELAY_BOT: echo
    env = {
        "RELAY_BOT": "echo",
        "RELAY_BOT_CONCURRENCY": "4",
        "RELAY_BOT_INTEGRATION_CONCURRENCY": "2",
        "RELAY_BOT_TIMEOUT": "60",
        "RELAY_LOG_LEVEL": "warning",
    }
    async with relay_processes(settings, "bot-worker", 1, env):
        await eventually(lambda: queues.all_consumed("inbound"), timeout=30)
        # Four conversations for the hung bot: as many as the worker has turns.
        for n in range(4):
            posted = message(f"h{n}", conversationId=f"hung-{n}", text=f"hung {n}")
            assert (await ingress.post(hung_id, hung_token, posted))[0] == 200

        async def in_flight() -> int:
            return len(hung.seen)

        assert await eventually(in_flight) == 2  # its share: two turns in flight
        assert (await ingress.post(python_id, python_token, message("p", text="py")))[0] == 200
        assert (await ingress.post(default_id, default_token, message("d", text="dd")))[0] == 200
        # Answered while the hung bot still holds its two turns (for up to a minute).
        answered = await take_until(queues, "outbound", 4, timeout=20)  # echo types first
        texts = sorted(r["body"]["payload"].get("text", "typing") for r in answered)
        assert texts == ["echo: dd", "first reply to py", "second reply to py", "typing"]
        assert len(hung.seen) == 2
        assert not hung.released.is_set()
        # The bot answers again: every message of its integration is answered, once.
        hung.released.set()
        back = await take_until(queues, "outbound", 4, timeout=30)
    grouped = by_conversation(back)
    assert {c: [r["body"]["payload"]["text"] for r in rs] for c, rs in grouped.items()} == {
        f"hung-{n}": [f"back: hung {n}"] for n in range(4)
    }
    assert await queues.take("outbound") == []
    assert hung.authorizations == {f"Bearer {BOT_SECRET}"}
    assert {body["integrationId"] for body in hung.seen} == {hung_id}
