"""Python bots for the tests, loaded by the plugin adapter as `tests.bots:<name>`."""

from __future__ import annotations

import asyncio
from collections import Counter

from relay.payloads import InvalidPayload
from relay.wire import InboundEnvelope
from workers.bot.adapters.base import BotContext
from workers.bot.adapters.echo import EchoBot

_failures: Counter[str] = Counter()
_late: set[asyncio.Task[None]] = set()


async def numbered(message: InboundEnvelope, context: BotContext) -> None:
    """Two replies that name the message they answer."""
    await context.reply("text", {"text": f"first reply to {message.text}"})
    await context.reply("text", {"text": f"second reply to {message.text}"})


async def later(message: InboundEnvelope, context: BotContext) -> None:
    """One reply now and one a moment after the turn ended."""
    await context.reply("text", {"text": "now"})

    async def afterwards() -> None:
        await asyncio.sleep(0.3)
        await context.reply("text", {"text": "later"})

    task = asyncio.create_task(afterwards())
    _late.add(task)
    task.add_done_callback(_late.discard)


async def picky(message: InboundEnvelope, context: BotContext) -> None:
    """Tries an invalid message first; the error is clear, the worker carries on."""
    try:
        await context.reply("image", {"imageUrl": "not a url"})
    except InvalidPayload as error:
        await context.reply("text", {"text": f"refused: {error.details[0]['field']}"})


async def flaky(message: InboundEnvelope, context: BotContext) -> None:
    """Fails on "fail" always, on "flaky" twice, on "once" once, answers everything else."""
    if message.text == "fail":
        raise RuntimeError("the bot is broken for this message")
    if message.text == "once" and not _failures[message.bundle.message.id]:
        _failures[message.bundle.message.id] += 1
        raise ConnectionError("the bot is down for a moment")
    if message.text == "flaky" and _failures[message.bundle.message.id] < 2:
        _failures[message.bundle.message.id] += 1
        raise ConnectionError("the bot is down for a moment")
    await context.reply("text", {"text": f"ok {message.text}"})


async def slow(message: InboundEnvelope, context: BotContext) -> None:
    """Takes a while before answering (to be killed mid-turn)."""
    await asyncio.sleep(3)
    await context.reply("text", {"text": f"slow reply to {message.text}"})


async def unhurried(message: InboundEnvelope, context: BotContext) -> None:
    """The echo bot, after a fifth of a second in conversations whose id ends in an even
    digit: sent to faster than that, those have messages waiting, unfinished, at any moment,
    while the others are done with each message before the next."""
    if message.bundle.conversation.tags.id[-1:] in "02468":
        await asyncio.sleep(0.2)
    await EchoBot().handle(message, context)


async def mirror(message: InboundEnvelope, context: BotContext) -> None:
    """One reply carrying the user's payload back as it was stored (the input contract's
    round trip: what the edge accepted, the bot stage and the delivery stage carry)."""
    await context.reply("mirror", message.bundle.message.payload)
