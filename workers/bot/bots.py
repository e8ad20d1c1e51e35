"""Every integration's bot, as the bot worker meets them: the adapter of the bot each one
names (RELAY_BOT's for those naming none), and a gate per integration in front of it.

The adapters are made on first use and shared by the integrations naming the same bot; the
integration is looked up through the same short-lived cache as the delivery worker's
(`relay.store.directory`), so a bot changed by the admin API is used within
RELAY_AUTH_CACHE_SECONDS. An adapter a change left unused by every integration the worker
has met is closed (its HTTP connection pool with it) once the turns that may still hold it
are over: `retire_after` seconds, a turn's longest wait for its gate and its bot.

The gate: at most RELAY_BOT_INTEGRATION_CONCURRENCY turns of one integration in flight,
and a circuit breaker (RELAY_BREAKER_THRESHOLD failures in a row open it for
RELAY_BREAKER_COOLDOWN seconds), so that a slow or failing bot holds neither the worker's
turns nor another integration's: its messages wait in the broker instead (no attempt
counted), in their conversation's order.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import structlog

from relay.aio import cancel_and_wait
from relay.pipeline.breaker import Breakers, Slots
from relay.settings import Settings, allows_bot_module
from relay.store import BotChoice, IntegrationLookup
from relay.store.directory import Directory
from workers.bot.adapters import BotAdapter, BotFailure, make_adapter

log = structlog.get_logger(__name__)

BUSY_WAIT = 2.0  # seconds a turn waits in its lane for its integration's slot
RETIRE_MARGIN = 5.0  # seconds past a turn's longest use before an unused adapter is closed

MakeAdapter = Callable[[BotChoice, Settings], BotAdapter]


class Bots:
    """The adapter of each integration's bot."""

    def __init__(
        self,
        settings: Settings,
        store: IntegrationLookup,
        default: BotAdapter,
        make: MakeAdapter = make_adapter,
        retire_after: float | None = None,
    ) -> None:
        self._settings = settings
        self._directory = Directory(
            store, settings.auth_cache_seconds, settings.directory_cache_size
        )
        self._default = default
        self._make = make
        self._made: dict[BotChoice, BotAdapter] = {}
        # The bot each integration met named when last looked up: an adapter none of them
        # names any more is retired.
        self._chosen: dict[str, BotChoice] = {}
        self._retire_after = (
            retire_after
            if retire_after is not None
            else BUSY_WAIT + settings.bot_timeout + RETIRE_MARGIN
        )
        self._retiring: dict[asyncio.Task[None], BotAdapter] = {}
        # One gate per integration for every stage worker of the process (one per
        # partition count during a change of counts).
        self.gates = gates_of(settings)

    async def of(self, integration_id: str) -> BotAdapter:
        """The adapter of the integration's bot; BotFailure (retried) if it cannot be made
        here, StoreError if the integration cannot be looked up now."""
        integration = (await self._directory.lookup(integration_id, "integration")).integration
        self._note(integration_id, None if integration is None else integration.bot)
        if integration is None or integration.bot is None:
            return self._default
        if integration.bot_unreadable is not None:
            # Its credentials' key is missing from RELAY_SECRET_KEYS: an operator's fix.
            raise BotFailure(integration.bot_unreadable)
        bot = integration.bot
        if not allows_bot_module(self._settings.bot_modules, bot.adapter):
            # Named before RELAY_BOT_MODULES was narrowed (or through another ingress's
            # settings): never imported here.
            raise BotFailure(
                f"the bot of integration {integration_id} ({bot.adapter}) is from a module"
                " RELAY_BOT_MODULES does not allow"
            )
        adapter = self._made.get(bot)
        if adapter is None:
            try:
                adapter = self._make(bot, self._settings)
            except Exception as error:  # an import's error is any error
                raise BotFailure(
                    f"the bot of integration {integration_id} ({bot.adapter}) cannot be"
                    f" made: {error}"
                ) from error
            self._made[bot] = adapter
        return adapter

    def _note(self, integration_id: str, bot: BotChoice | None) -> None:
        """Remember the integration's bot; retire the one it named before if no integration
        met names it now."""
        before = self._chosen.pop(integration_id, None)
        if bot is not None:
            self._chosen[integration_id] = bot
        if before is None or before == bot or before in self._chosen.values():
            return
        adapter = self._made.pop(before, None)
        if adapter is not None:
            task = asyncio.create_task(self._close_later(adapter, before))
            self._retiring[task] = adapter
            task.add_done_callback(self._retiring.pop)

    async def _close_later(self, adapter: BotAdapter, bot: BotChoice) -> None:
        # Not at once: a turn that took it before the change may still be using it.
        await asyncio.sleep(self._retire_after)
        await _close_quietly(adapter)
        log.info("bot_adapter_retired", adapter=bot.adapter)

    async def close(self) -> None:
        """Close every adapter made (those being retired at once), and the default."""
        retiring = list(self._retiring.items())
        for task, _ in retiring:
            await cancel_and_wait(task)
        for adapter in [*self._made.values(), *(a for _, a in retiring), self._default]:
            await _close_quietly(adapter)
        self._made.clear()
        self._chosen.clear()


async def _close_quietly(adapter: BotAdapter) -> None:
    """Close an adapter; a failure to close leaves nothing to undo (it is logged)."""
    try:
        await adapter.close()
    except Exception:
        log.exception("bot_adapter_close_failed")


def gates_of(settings: Settings) -> Slots:
    """A gate per integration, as RELAY_BOT_INTEGRATION_CONCURRENCY and RELAY_BREAKER_* say:
    a slot per turn in flight, a circuit breaker, a busy gate waited for `BUSY_WAIT`."""
    breakers = Breakers(
        settings.breaker_threshold,
        settings.breaker_cooldown,
        settings.bot_integration_concurrency,
    )
    return Slots(breakers, BUSY_WAIT)
