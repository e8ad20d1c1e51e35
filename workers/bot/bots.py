"""Every integration's bot, as the bot worker meets them: the adapter of the bot each one
names (RELAY_BOT's for those naming none), and a gate per integration in front of it.

The adapters are made on first use and shared by the integrations naming the same bot; the
integration is looked up through the same short-lived cache as the delivery worker's
(`relay.store.directory`), so a bot changed by the admin API is used within
RELAY_AUTH_CACHE_SECONDS. An adapter a change left unused stays open until the worker stops
(an HTTP connection pool each: few, as bots are few).

The gate: at most RELAY_BOT_INTEGRATION_CONCURRENCY turns of one integration in flight,
and a circuit breaker (RELAY_BREAKER_THRESHOLD failures in a row open it for
RELAY_BREAKER_COOLDOWN seconds), so that a slow or failing bot holds neither the worker's
turns nor another integration's: its messages wait in the broker instead (no attempt
counted), in their conversation's order.
"""

from __future__ import annotations

from collections.abc import Callable

from relay.pipeline.breaker import Breakers, Slots
from relay.settings import Settings
from relay.store import BotChoice, IntegrationLookup
from relay.store.directory import Directory
from workers.bot.adapters import BotAdapter, BotFailure, make_adapter

BUSY_WAIT = 2.0  # seconds a turn waits in its lane for its integration's slot

MakeAdapter = Callable[[BotChoice, Settings], BotAdapter]


class Bots:
    """The adapter of each integration's bot."""

    def __init__(
        self,
        settings: Settings,
        store: IntegrationLookup,
        default: BotAdapter,
        make: MakeAdapter = make_adapter,
    ) -> None:
        self._settings = settings
        self._directory = Directory(
            store, settings.auth_cache_seconds, settings.directory_cache_size
        )
        self._default = default
        self._make = make
        self._made: dict[BotChoice, BotAdapter] = {}
        # One gate per integration for every stage worker of the process (one per
        # partition count during a change of counts).
        self.gates = gates_of(settings)

    async def of(self, integration_id: str) -> BotAdapter:
        """The adapter of the integration's bot; BotFailure (retried) if it cannot be made
        here, StoreError if the integration cannot be looked up now."""
        integration = (await self._directory.lookup(integration_id, "integration")).integration
        if integration is None or integration.bot is None:
            return self._default
        if integration.bot_unreadable is not None:
            # Its credentials' key is missing from RELAY_SECRET_KEYS: an operator's fix.
            raise BotFailure(integration.bot_unreadable)
        bot = integration.bot
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

    async def close(self) -> None:
        """Close every adapter made, and the default."""
        for adapter in [*self._made.values(), self._default]:
            await adapter.close()
        self._made.clear()


def gates_of(settings: Settings) -> Slots:
    """A gate per integration, as RELAY_BOT_INTEGRATION_CONCURRENCY and RELAY_BREAKER_* say:
    a slot per turn in flight, a circuit breaker, a busy gate waited for `BUSY_WAIT`."""
    breakers = Breakers(
        settings.breaker_threshold,
        settings.breaker_cooldown,
        settings.bot_integration_concurrency,
    )
    return Slots(breakers, BUSY_WAIT)
