"""The bot adapters: one per bot, made from the bot an integration names (`BotChoice`), or
from `RELAY_BOT` for the integrations that name none."""

from __future__ import annotations

from relay.settings import Settings
from relay.store import BotChoice
from workers.bot.adapters.base import BotAdapter, BotContext, BotFailure
from workers.bot.adapters.echo import EchoBot
from workers.bot.adapters.http import HttpBot
from workers.bot.adapters.plugin import PluginBot, load_function

__all__ = ["BotAdapter", "BotContext", "BotFailure", "default_bot", "load_adapter", "make_adapter"]


def default_bot(settings: Settings) -> BotChoice:
    """The deployment's bot: `RELAY_BOT` with `RELAY_BOT_URL` and the Bot Framework app's
    credentials, for the integrations that name none."""
    return BotChoice(
        adapter=settings.bot,
        url=settings.bot_url or None,
        app_id=settings.botframework_app_id or None,
        app_password=settings.botframework_app_password or None,
    )


def load_adapter(settings: Settings) -> BotAdapter:
    """The adapter of the deployment's bot (`RELAY_BOT`)."""
    return make_adapter(default_bot(settings), settings)


def make_adapter(bot: BotChoice, settings: Settings) -> BotAdapter:
    """`echo`, `http`, `botframework`, a `relay.bots` entry point, or `module:function`;
    ValueError (or the import's error) if it cannot be made."""
    if bot.adapter == "echo":
        return EchoBot()
    if bot.adapter == "http":
        return HttpBot(bot.url or "", settings.bot_timeout, bot.secret)
    if bot.adapter == "botframework":
        from workers.bot.adapters.botframework import BotFrameworkBot

        return BotFrameworkBot(settings, bot=bot)
    function = load_function(bot.adapter)
    if function is None:
        raise ValueError(
            f"bot {bot.adapter!r}: not echo, http, botframework, a relay.bots entry point or"
            " module:function"
        )
    return PluginBot(function)
