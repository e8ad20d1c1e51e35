"""The bot adapters, chosen by `RELAY_BOT`."""

from __future__ import annotations

from relay.settings import Settings
from workers.bot.adapters.base import BotAdapter, BotContext, BotFailure
from workers.bot.adapters.echo import EchoBot
from workers.bot.adapters.http import HttpBot
from workers.bot.adapters.plugin import PluginBot, load_function

__all__ = ["BotAdapter", "BotContext", "BotFailure", "load_adapter"]


def load_adapter(settings: Settings) -> BotAdapter:
    """`echo`, `http`, `botframework`, a `relay.bots` entry point, or `module:function`."""
    if settings.bot == "echo":
        return EchoBot()
    if settings.bot == "http":
        return HttpBot(settings.bot_url, settings.bot_timeout)
    if settings.bot == "botframework":
        from workers.bot.adapters.botframework import BotFrameworkBot

        return BotFrameworkBot(settings)
    function = load_function(settings.bot)
    if function is None:
        raise ValueError(
            f"RELAY_BOT={settings.bot!r}: not echo, http, botframework, a relay.bots entry "
            "point or module:function"
        )
    return PluginBot(function)
