"""Bots for the benchmark, loaded by the bot worker as `RELAY_BOT=bench.bots:one_reply`."""

from __future__ import annotations

from relay.wire import InboundEnvelope
from workers.bot.adapters.base import BotContext


async def one_reply(message: InboundEnvelope, context: BotContext) -> None:
    """The echo bot's text without its typing indicator: one response per user message,
    the shape of the raw two-hop chain."""
    await context.reply("text", {"text": f"echo: {message.text}"})
