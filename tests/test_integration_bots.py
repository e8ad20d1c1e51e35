"""An integration names its bot (`BotChoice`), on both stores: no bot named means the
deployment's default (RELAY_BOT); the bot's credentials are write-only and sealed at rest
with RELAY_SECRET_KEYS, resealed by `relay secrets reencrypt`, and a key that is gone leaves
the bot named without them, saying whose credentials could not be read."""

from __future__ import annotations

from typing import Any

from relay.auth import new_signing_secret
from relay.store import BotChoice, DeliveryOptions, SqlStore
from relay.store.secrets import MARK, new_key
from tests.helpers import integration_columns, keyed

KEY, OTHER_KEY = new_key(), new_key()
FRAMEWORK = BotChoice(
    adapter="botframework",
    url="http://127.0.0.1:9/api/messages",
    app_id="app-id-CANARY",
    app_password="app-password-CANARY",
)


async def stored_bot(store: SqlStore, integration_id: str) -> dict[str, Any]:
    return await integration_columns(
        store, integration_id, "bot_adapter", "bot_url", "bot_credentials"
    )


async def test_an_integration_names_its_bot_or_takes_the_default(store: SqlStore):
    plain = await store.create_integration("default", "http://127.0.0.1:9/", new_signing_secret())
    assert plain.bot is None
    read = await store.get_integration(plain.id)
    assert read is not None
    assert read.bot is None
    echo = BotChoice(adapter="echo")
    named = await store.create_integration(
        "named", "http://127.0.0.1:9/", new_signing_secret(), bot=echo
    )
    again = await store.get_integration(named.id)
    assert again is not None
    assert again.bot == echo
    assert again == named
    # Changed, given credentials, and back to the default.
    http = BotChoice(adapter="http", url="http://127.0.0.1:9/bot", secret="bot-secret-CANARY")
    assert await store.set_bot(named.id, http)
    changed = await store.get_integration(named.id)
    assert changed is not None
    assert changed.bot == http
    assert changed.bot.credentials() == {"secret": "bot-secret-CANARY"}
    assert "CANARY" not in repr(changed)
    [listed] = [r for r in await store.list_integrations() if r.id == named.id]
    assert listed.bot == http
    assert await store.set_bot(named.id, None)
    cleared = await store.get_integration(named.id)
    assert cleared is not None
    assert cleared.bot is None
    assert await stored_bot(store, named.id) == {
        "bot_adapter": None,
        "bot_url": None,
        "bot_credentials": None,
    }
    assert not await store.set_bot("no-such-integration", echo)


async def test_with_keys_the_bot_s_credentials_are_sealed_and_reencrypted(database_url: str):
    async with keyed(database_url, KEY) as store:
        record = await store.create_integration(
            "framework", "http://127.0.0.1:9/", new_signing_secret(), bot=FRAMEWORK
        )
        raw = await stored_bot(store, record.id)
        assert raw["bot_adapter"] == "botframework"
        assert raw["bot_url"] == FRAMEWORK.url
        sealed = raw["bot_credentials"]
        assert sealed is not None
        assert sealed.startswith(MARK)
        assert "CANARY" not in sealed
        read = await store.get_integration(record.id)
        assert read is not None
        assert read.bot == FRAMEWORK
    async with keyed(database_url, OTHER_KEY, KEY) as rotating:
        done = await rotating.reseal_secrets()
        assert [line for line in done.unreadable if record.id in line] == []
        assert (await stored_bot(rotating, record.id))["bot_credentials"] != sealed
    async with keyed(database_url, OTHER_KEY) as rotated:
        read = await rotated.get_integration(record.id)
        assert read is not None
        assert read.bot == FRAMEWORK
    # The old key alone no longer opens them: the bot is named, without its credentials.
    async with keyed(database_url, KEY) as lost:
        read = await lost.get_integration(record.id)
        assert read is not None
        assert read.bot == BotChoice(adapter="botframework", url=FRAMEWORK.url)
        assert read.bot_unreadable is not None
        assert record.id in read.bot_unreadable
        assert "CANARY" not in read.bot_unreadable
        # Its signing secret (sealed with the old key, resealed too) is unreadable as well.
        assert read.secret_unreadable is not None


async def test_an_integration_keeps_its_delivery_options(store: SqlStore):
    plain = await store.create_integration("plain", "http://127.0.0.1:9/", new_signing_secret())
    assert plain.delivery == DeliveryOptions()
    assert plain.delivery.expiring_types == {"typing": 30.0}
    assert plain.delivery.delivery_rate is None
    paced = DeliveryOptions(
        operations_url="http://127.0.0.1:9/ops",
        delivery_rate=2.5,
        delivery_burst=4,
        expiring_types={"typing": 5, "custom": 60},
    )
    made = await store.create_integration(
        "paced", "http://127.0.0.1:9/", new_signing_secret(), delivery=paced
    )
    read = await store.get_integration(made.id)
    assert read is not None
    assert read.delivery == paced == made.delivery
    assert read.delivery.burst() == 4
    # Replaced whole; no type expiring is kept as such, not as the default.
    assert await store.set_delivery(made.id, DeliveryOptions(expiring_types={}))
    cleared = await store.get_integration(made.id)
    assert cleared is not None
    assert cleared.delivery == DeliveryOptions(expiring_types={})
    # The default is stored as NULL, so a later change of the default reaches it.
    assert await store.set_delivery(made.id, DeliveryOptions(delivery_rate=3))
    columns = await integration_columns(store, made.id, "expiring_types", "delivery_rate")
    assert columns == {"expiring_types": None, "delivery_rate": 3}
    default_burst = await store.get_integration(made.id)
    assert default_burst is not None
    assert default_burst.delivery.burst() == 3
    assert not await store.set_delivery("no-such-integration", DeliveryOptions())
