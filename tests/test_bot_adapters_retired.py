"""An adapter no integration names any more is closed (its HTTP pool with it), once the turns
that may still hold it are over; one another integration still names stays open. On both
stores, the integrations' bots changed in the store as the admin API changes them."""

from __future__ import annotations

from relay.auth import new_signing_secret
from relay.settings import Settings
from relay.store import BotChoice, SqlStore
from relay.wire import InboundEnvelope
from tests.helpers import eventually
from workers.bot.adapters import BotContext
from workers.bot.bots import Bots

FIRST = BotChoice(adapter="http", url="http://127.0.0.1:9/first")
SECOND = BotChoice(adapter="http", url="http://127.0.0.1:9/second")


class Recorded:
    """An adapter that only records whether it was closed."""

    def __init__(self, bot: BotChoice) -> None:
        self.bot = bot
        self.closed = False

    async def handle(self, envelope: InboundEnvelope, context: BotContext) -> None:
        """Never called here."""

    async def close(self) -> None:
        self.closed = True


class Maker:
    """Makes `Recorded` adapters, keeping each one made."""

    def __init__(self) -> None:
        self.made: list[Recorded] = []

    def __call__(self, bot: BotChoice, settings: Settings) -> Recorded:
        adapter = Recorded(bot)
        self.made.append(adapter)
        return adapter


def closed(adapter: object) -> bool:
    assert isinstance(adapter, Recorded)
    return adapter.closed


async def integration(store: SqlStore, name: str, bot: BotChoice | None) -> str:
    made = await store.create_integration(
        name, "http://127.0.0.1:9/", new_signing_secret(), bot=bot
    )
    return made.id


async def test_an_adapter_no_integration_names_is_closed_after_its_turns(
    store: SqlStore, settings: Settings
) -> None:
    maker, default = Maker(), Recorded(BotChoice(adapter="echo"))
    bots = Bots(settings, store, default, make=maker, retire_after=0.05)
    try:
        moving = await integration(store, "moving", FIRST)
        staying = await integration(store, "staying", FIRST)
        first = await bots.of(moving)
        assert await bots.of(staying) is first  # one adapter per bot, shared

        await store.set_bot(moving, SECOND)
        second = await bots.of(moving)
        assert second is not first
        await store.set_bot(staying, None)
        assert await bots.of(staying) is default

        async def first_closed() -> bool:
            return closed(first)

        await eventually(first_closed, timeout=5)
        assert not closed(second)
        assert not default.closed
    finally:
        await bots.close()
    assert closed(second)
    assert default.closed


async def test_an_adapter_another_integration_names_stays_open(
    store: SqlStore, settings: Settings
) -> None:
    maker, default = Maker(), Recorded(BotChoice(adapter="echo"))
    bots = Bots(settings, store, default, make=maker, retire_after=0.0)
    try:
        moving = await integration(store, "moving", FIRST)
        staying = await integration(store, "staying", FIRST)
        first = await bots.of(moving)
        await bots.of(staying)
        await store.set_bot(moving, None)
        assert await bots.of(moving) is default
        # Retired at once if it were unused: it is not, as `staying` still names it.
        assert await bots.of(staying) is first
        assert maker.made == [first]
        assert not closed(first)
    finally:
        await bots.close()
    assert closed(first)


async def test_a_stop_closes_an_adapter_being_retired_at_once(
    store: SqlStore, settings: Settings
) -> None:
    maker, default = Maker(), Recorded(BotChoice(adapter="echo"))
    bots = Bots(settings, store, default, make=maker, retire_after=3600)
    moving = await integration(store, "moving", FIRST)
    first = await bots.of(moving)
    await store.set_bot(moving, SECOND)
    await bots.of(moving)
    await bots.close()  # long before the hour is over
    assert all(adapter.closed for adapter in maker.made)
    assert closed(first)
