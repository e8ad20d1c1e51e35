"""The bot an integration names: which adapters take which settings, and what a change
keeps. The CLI and the admin API check a bot here before the store keeps it; the bot worker
makes the adapter (`workers.bot.adapters`)."""

from __future__ import annotations

from collections.abc import Sequence

from relay.admin.errors import AdminError
from relay.settings import allows_bot_module
from relay.store import BotChoice

BUILT_IN = ("echo", "http", "botframework")
_TAKES_URL = ("http", "botframework")


def check_bot(bot: BotChoice, modules: Sequence[str]) -> None:
    """AdminError unless the bot's settings fit its adapter: `http` and `botframework` need
    a URL; a `secret` is `http`'s, `appId` and `appPassword` Bot Framework's (both or
    neither: none is a bot in no-auth mode); `echo` and a plugin take neither; a plugin's
    module must be one RELAY_BOT_MODULES (`modules`) allows."""
    name = bot.adapter
    if not allows_bot_module(modules, name):
        raise AdminError(f"the bot's module is not one RELAY_BOT_MODULES allows: {name}")
    if name in _TAKES_URL and not bot.url:
        raise AdminError(f"a bot with the {name} adapter needs its url")
    if name not in _TAKES_URL and bot.url:
        raise AdminError(f"the {name} adapter takes no url")
    if bot.secret is not None and name != "http":
        raise AdminError("only the http adapter takes a secret")
    framework = (bot.app_id, bot.app_password)
    if any(value is not None for value in framework):
        if name != "botframework":
            raise AdminError("only the botframework adapter takes appId and appPassword")
        if None in framework:
            raise AdminError("appId and appPassword go together (neither: no-auth mode)")


def changed_bot(current: BotChoice | None, given: BotChoice) -> BotChoice:
    """The bot after a change to `given`: credentials written once stay when the change
    keeps the adapter and gives none (they are never shown, so a client cannot send them
    back); a change of adapter drops them."""
    if current is None or current.adapter != given.adapter or given.credentials():
        return given
    return given.model_copy(update=current.credentials())
