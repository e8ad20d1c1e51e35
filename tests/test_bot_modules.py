"""RELAY_BOT_MODULES narrows the Python bots an integration may name (`module:function`):
the admin API and the CLI refuse another module before anything is written, and the bot
worker never imports one named before the list was narrowed. The default (`*`) allows any,
and built-in adapters and entry points are always allowed. On both stores."""

from __future__ import annotations

import pytest

from relay.auth import new_signing_secret
from relay.settings import Settings, allows_bot_module
from relay.store import BotChoice, SqlStore
from tests.helpers import admin_call, start_ingress
from tests.receivers import Receiver
from tests.test_cli import relay
from workers.bot.adapters import BotAdapter, BotFailure
from workers.bot.adapters.echo import EchoBot
from workers.bot.bots import Bots


@pytest.mark.parametrize(
    ("allowed", "adapter", "allows"),
    [
        (["*"], "anything.at:all", True),
        ([], "echo", True),
        ([], "an-entry-point", True),
        ([], "tests.bots:mirror", False),
        (["tests"], "tests.bots:mirror", True),
        (["tests.bots"], "tests.bots:mirror", True),
        (["tests.bot"], "tests.bots:mirror", False),  # a prefix of the name is not a parent
        (["tests.bots.deeper"], "tests.bots:mirror", False),
        (["mybots"], "os:system", False),
    ],
)
def test_which_modules_a_list_allows(allowed: list[str], adapter: str, allows: bool) -> None:
    assert allows_bot_module(allowed, adapter) is allows


def test_the_setting_is_a_comma_separated_list_any_by_default() -> None:
    assert Settings().bot_modules == ["*"]
    assert Settings(bot_modules="mybots, shop.bots").bot_modules == ["mybots", "shop.bots"]


async def test_the_admin_api_refuses_a_module_the_list_does_not_allow(
    settings: Settings, admin_token: str, receiver: Receiver, store: SqlStore
) -> None:
    narrowed = settings.model_copy(update={"bot_modules": ["tests"]})
    async with start_ingress(narrowed) as ingress:
        body = {"name": "plugin", "responseUrl": receiver.url("plugin"), "verify": False}
        status, refused = await admin_call(
            ingress, "POST", "/integrations", admin_token, {**body, "bot": {"adapter": "os:system"}}
        )
        assert status == 422, refused
        assert "RELAY_BOT_MODULES" in refused["error"]["message"]
        assert [i.name for i in await store.list_integrations()].count("plugin") == 0
        bot = {"adapter": "tests.bots:mirror"}
        status, made = await admin_call(
            ingress, "POST", "/integrations", admin_token, {**body, "bot": bot}
        )
        assert status == 201, made
        path = f"/integrations/{made['id']}"
        status, patched = await admin_call(
            ingress, "PATCH", path, admin_token, {"bot": {"adapter": "json:dumps"}}
        )
        assert status == 422, patched
        record = await store.get_integration(made["id"])
        assert record is not None
        assert record.bot == BotChoice(adapter="tests.bots:mirror")


async def test_the_cli_refuses_a_module_the_list_does_not_allow(
    settings: Settings, receiver: Receiver
) -> None:
    env = {"RELAY_BOT_MODULES": "tests"}
    args = ["integrations", "create", "--name", "cli-plugin", "--response-url"]
    refused = await relay(settings, *args, receiver.url("cli"), "--bot", "os:system", env=env)
    assert refused.code != 0
    assert "RELAY_BOT_MODULES" in refused.err


async def test_the_bot_worker_imports_no_module_the_list_does_not_allow(
    settings: Settings, store: SqlStore
) -> None:
    made: list[BotChoice] = []

    def make(bot: BotChoice, _: Settings) -> BotAdapter:
        made.append(bot)
        return EchoBot()

    named = await store.create_integration(
        "named-before",
        "http://127.0.0.1:9/",
        new_signing_secret(),
        bot=BotChoice(adapter="os:system"),
    )
    narrowed = settings.model_copy(update={"bot_modules": ["tests"]})
    bots = Bots(narrowed, store, EchoBot(), make=make)
    try:
        with pytest.raises(BotFailure, match="RELAY_BOT_MODULES"):
            await bots.of(named.id)
        assert made == []
        await store.set_bot(named.id, BotChoice(adapter="tests.bots:mirror"))
        await bots.of(named.id)
        assert made == [BotChoice(adapter="tests.bots:mirror")]
    finally:
        await bots.close()
