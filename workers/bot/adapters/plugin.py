"""Bots written in Python: any callable registered under the `relay.bots` entry point, or
named `module:function`.

    async def my_bot(message: InboundEnvelope, context: BotContext) -> None:
        await context.reply("text", {"text": "hi"})

`context.reply(type, payload)` may be called any number of times, also after the function
returned (from a task it started): such late replies are stored and sent as they come.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Awaitable, Callable
from importlib.metadata import entry_points

from relay.wire import InboundEnvelope
from workers.bot.adapters.base import BotContext

BotFunction = Callable[[InboundEnvelope, BotContext], Awaitable[None]]
ENTRY_POINT_GROUP = "relay.bots"


def load_function(name: str) -> BotFunction | None:
    """The bot function registered as `name`, or at `module:function`; None if neither."""
    found = entry_points(group=ENTRY_POINT_GROUP, name=name)
    if found:
        function: BotFunction = next(iter(found)).load()
        return function
    module_name, _, attribute = name.partition(":")
    if not attribute:
        return None
    function = getattr(importlib.import_module(module_name), attribute)
    if not inspect.iscoroutinefunction(function):
        raise TypeError(f"{name} must be an async function (message, context)")
    return function


class PluginBot:
    """Calls a Python bot function in the worker process."""

    def __init__(self, function: BotFunction) -> None:
        self._function = function

    async def handle(self, envelope: InboundEnvelope, context: BotContext) -> None:
        """Run the function; its exceptions count as bot failures (retried)."""
        await self._function(envelope, context)

    async def close(self) -> None:
        """Nothing to release."""
