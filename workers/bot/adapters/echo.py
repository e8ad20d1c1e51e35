"""The built-in echo bot: a typing indicator, then the user's text back."""

from __future__ import annotations

from relay.wire import InboundEnvelope
from workers.bot.adapters.base import BotContext


class EchoBot:
    """Replies twice to every message, to show a bot's several responses in order."""

    async def handle(self, envelope: InboundEnvelope, context: BotContext) -> None:
        """Typing, then the text (or the summary of a non-text message)."""
        await context.reply("typing", {"value": True})
        await context.reply("text", {"text": f"echo: {envelope.text}"})

    async def close(self) -> None:
        """Nothing to release."""
