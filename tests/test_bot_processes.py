"""Bot workers as separate `relay bot-worker` processes: order across them, and crashes."""

from __future__ import annotations

import asyncio
import contextlib

from relay.settings import Settings
from relay.store import SqlStore
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


def bot_workers(
    settings: Settings, count: int, bot: str
) -> contextlib.AbstractAsyncContextManager[list[asyncio.subprocess.Process]]:
    """`count` bot-worker processes running `bot`."""
    env = {"RELAY_BOT": bot, "RELAY_LOG_LEVEL": "warning"}
    return relay_processes(settings, "bot-worker", count, env)


async def test_three_workers_keep_each_conversations_order_over_200_messages(
    ingress: Ingress,
    store: SqlStore,
    settings: Settings,
    queues: Queues,
):
    integration_id, token = await make_integration(store, settings)
    async with bot_workers(settings, 3, "echo"):
        await eventually(lambda: queues.all_consumed("inbound"), timeout=30)

        async def conversation(c: int) -> None:
            for n in range(10):
                status, _ = await ingress.post(
                    integration_id,
                    token,
                    message(f"{c}-{n}", conversationId=f"conv-{c}", text=f"{c}:{n}"),
                )
                assert status == 200

        await asyncio.gather(*[conversation(c) for c in range(20)])
        responses = await take_until(queues, "outbound", 400, timeout=60)
    grouped = by_conversation(responses)
    assert len(grouped) == 20
    for c in range(20):
        items = grouped[f"conv-{c}"]
        assert [i["body"]["sequence"] for i in items] == list(range(1, 21))
        texts = [i["body"]["payload"]["text"] for i in items if i["body"]["type"] == "text"]
        assert texts == [f"echo: {c}:{n}" for n in range(10)]
    assert len({r["deliveryId"] for r in responses}) == 400


async def test_a_worker_killed_mid_turn_is_replaced_and_replies_exactly_once(
    ingress: Ingress,
    store: SqlStore,
    settings: Settings,
    queues: Queues,
):
    integration_id, token = await make_integration(store, settings)
    async with bot_workers(settings, 1, "tests.bots:slow") as [doomed]:
        await eventually(lambda: queues.all_consumed("inbound"), timeout=30)
        await ingress.post(integration_id, token, message(1, text="survive"))
        await eventually(lambda: queues.none_ready("inbound"))  # in the worker's hands now
        doomed.kill()
        await doomed.wait()
    assert await queues.take("outbound") == []
    async with bot_workers(settings, 1, "tests.bots:slow"):
        [response] = await take_until(queues, "outbound", 1, timeout=30)
        assert response["body"]["payload"] == {"text": "slow reply to survive"}
        await asyncio.sleep(0)  # let nothing else arrive: checked below with a fresh look
    assert await queues.take("outbound") == []
