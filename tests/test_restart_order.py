"""Order across a graceful restart in the middle of an outage, for both stages.

The endpoint answers 500 (or the bot fails); every conversation has a message waiting for
its retry and more parked behind it, most of them never tried (the circuit opens, and a
parked message is not attempted). The worker stops and another starts, more messages come,
the endpoint (or the bot) heals: each conversation's responses must still come in order,
since the new worker learns from the store every message of the conversation not finished
with, tried or not, and waits behind them.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest
from aio_pika.abc import AbstractRobustConnection

from relay.broker import topology_of
from relay.broker.topology import delete
from relay.settings import Settings
from relay.store import SqlStore
from relay.wire import InboundEnvelope
from tests.helpers import (
    eventually,
    make_integration,
    message,
    start_bot_worker,
    start_delivery_worker,
    start_ingress,
)
from tests.receivers import Hit, Receiver
from workers.bot.adapters import BotContext, BotFailure

CONVERSATIONS = 12
BEFORE, AFTER = 10, 10  # messages per conversation before and after the restart


@contextlib.asynccontextmanager
async def own_queues(
    settings: Settings, amqp: AbstractRobustConnection, name: str
) -> AsyncIterator[Settings]:
    own = settings.model_copy(
        update={
            "queue_prefix": f"{settings.queue_prefix}-{name}",
            "delivery_delay_queues": [0.25, 1.0],
            "delivery_retry_schedule": [0] + [1.0] * 60,
            # Every conversation's head is tried before the circuit opens (one probe a
            # second would then leave some untried for long); after that, responses are
            # held back by the open circuit, untried.
            "breaker_threshold": 3 * CONVERSATIONS,
            "breaker_cooldown": 1.0,
            "bot_retry_delays": [0.25, 1.0] + [1.0] * 60,
        }
    )
    try:
        yield own
    finally:
        async with amqp.channel() as channel:
            await delete(channel, topology_of(own))


@pytest.mark.timeout(180)
async def test_order_survives_a_restart_while_responses_wait_behind_a_failing_endpoint(
    store: SqlStore, settings: Settings, amqp: AbstractRobustConnection, receiver: Receiver
):
    path = "outage"
    url = receiver.on(path, *[500] * 100_000)
    async with own_queues(settings, amqp, path) as own, start_ingress(own) as ingress:
        integration_id, token = await make_integration(store, own, response_url=url)

        async def post(c: int, n: int) -> None:
            body = message(f"{c}-{n}", conversationId=f"o{c}", text=f"{c}:{n}")
            status, _ = await ingress.post(integration_id, token, body)
            assert status == 200

        async def every_conversation_failed() -> bool:
            failed = {h.body["conversationId"] for h in receiver.at(path) if h.status == 500}
            return len(failed) == CONVERSATIONS

        async with start_bot_worker(own):
            async with start_delivery_worker(own):
                for n in range(BEFORE):
                    await asyncio.gather(*[post(c, n) for c in range(CONVERSATIONS)])
                await eventually(every_conversation_failed, timeout=60, interval=0.1)
            async with start_delivery_worker(own):
                for n in range(BEFORE, BEFORE + AFTER):
                    await asyncio.gather(*[post(c, n) for c in range(CONVERSATIONS)])
                receiver.scripts[path] = []  # the endpoint heals

                async def all_delivered() -> bool:
                    delivered = {
                        h.body["botpressMessageId"] for h in receiver.at(path) if h.status == 200
                    }
                    return len(delivered) >= CONVERSATIONS * (BEFORE + AFTER) * 2

                await eventually(all_delivered, timeout=120, interval=0.2)
    for c in range(CONVERSATIONS):
        texts = [f"echo: {c}:{n}" for n in range(BEFORE + AFTER)]
        check_in_order(receiver.at(path), f"o{c}", texts)


class Outage:
    """An echo bot that fails (to be retried) until healed."""

    def __init__(self) -> None:
        self.down = True
        self.failures: set[str] = set()

    async def handle(self, envelope: InboundEnvelope, context: BotContext) -> None:
        if self.down:
            self.failures.add(envelope.bundle.conversation.tags.id)
            raise BotFailure("the bot is down")
        await context.reply("text", {"text": f"echo: {envelope.bundle.message.payload['text']}"})

    async def close(self) -> None:
        return None


@pytest.mark.timeout(180)
async def test_order_survives_a_bot_worker_restart_while_turns_wait_behind_a_failing_bot(
    store: SqlStore, settings: Settings, amqp: AbstractRobustConnection, receiver: Receiver
):
    path = "bot-outage"
    bot = Outage()
    async with own_queues(settings, amqp, path) as own, start_ingress(own) as ingress:
        integration_id, token = await make_integration(store, own, response_url=receiver.url(path))

        async def post(c: int, n: int) -> None:
            body = message(f"{c}-{n}", conversationId=f"b{c}", text=f"{c}:{n}")
            status, _ = await ingress.post(integration_id, token, body)
            assert status == 200

        async def every_conversation_failed() -> bool:
            return len(bot.failures) == CONVERSATIONS

        async with start_delivery_worker(own):
            async with start_bot_worker(own, bot):
                for n in range(BEFORE):
                    await asyncio.gather(*[post(c, n) for c in range(CONVERSATIONS)])
                await eventually(every_conversation_failed, timeout=60, interval=0.1)
            async with start_bot_worker(own, bot):
                for n in range(BEFORE, BEFORE + AFTER):
                    await asyncio.gather(*[post(c, n) for c in range(CONVERSATIONS)])
                bot.down = False

                async def all_delivered() -> bool:
                    delivered = {h.body["botpressMessageId"] for h in receiver.at(path)}
                    return len(delivered) >= CONVERSATIONS * (BEFORE + AFTER)

                await eventually(all_delivered, timeout=120, interval=0.2)
    for c in range(CONVERSATIONS):
        texts = [f"echo: {c}:{n}" for n in range(BEFORE + AFTER)]
        check_in_order(receiver.at(path), f"b{c}", texts, per_message=1)


def check_in_order(
    hits: list[Hit], conversation: str, texts: list[str], per_message: int = 2
) -> None:
    """The conversation's responses by first successful arrival: every sequence, in order."""
    first: list[int] = []
    seen: list[str] = []
    for hit in hits:
        body = hit.body
        if hit.status != 200 or body["conversationId"] != conversation:
            continue
        if body["sequence"] not in first:
            first.append(body["sequence"])
            if body["type"] == "text":
                seen.append(body["payload"]["text"])
    assert first == list(range(1, per_message * len(texts) + 1)), conversation
    assert seen == texts, conversation
