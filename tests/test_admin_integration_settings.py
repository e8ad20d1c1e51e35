"""An integration's bot and delivery options through the admin API, on both stores: set at
creation and by PATCH (absent: unchanged; null: the default), checked against the adapter
before anything is written, and the bot's credentials never answered."""

from __future__ import annotations

from typing import Any

from relay.store import BotChoice, DeliveryOptions, SqlStore
from tests.helpers import Ingress
from tests.helpers import admin_call as call
from tests.receivers import Receiver

CANARY = "CANARY-bot-credential"
DEFAULTS = {
    "bot": None,
    "operationsUrl": None,
    "deliveryRate": None,
    "deliveryBurst": None,
    "expiringTypes": {"typing": 30.0},
}


async def create(ingress: Ingress, token: str, url: str, **fields: Any) -> tuple[int, Any]:
    body = {"name": url.rsplit("/", 1)[-1], "responseUrl": url, "verify": False, **fields}
    return await call(ingress, "POST", "/integrations", token, body)


async def test_an_integration_is_made_with_its_bot_and_delivery_options(
    ingress: Ingress, admin_token: str, receiver: Receiver, store: SqlStore
):
    status, plain = await create(ingress, admin_token, receiver.url("plain"))
    assert status == 201, plain
    assert {k: plain[k] for k in DEFAULTS} == DEFAULTS
    bot = {"adapter": "http", "url": "http://127.0.0.1:9/bot", "secret": CANARY}
    status, made = await create(
        ingress,
        admin_token,
        receiver.url("made"),
        bot=bot,
        operationsUrl=receiver.url("ops"),
        deliveryRate=20,
        deliveryBurst=5,
        expiringTypes={"typing": 10, "custom": 2.5},
    )
    assert status == 201, made
    assert made["bot"] == {"adapter": "http", "url": bot["url"], "credentials": ["secret"]}
    assert made["operationsUrl"] == receiver.url("ops")
    assert (made["deliveryRate"], made["deliveryBurst"]) == (20, 5)
    assert made["expiringTypes"] == {"typing": 10, "custom": 2.5}
    record = await store.get_integration(made["id"])
    assert record is not None
    assert record.bot == BotChoice(adapter="http", url=bot["url"], secret=CANARY)
    assert record.delivery == DeliveryOptions(
        operations_url=receiver.url("ops"),
        delivery_rate=20,
        delivery_burst=5,
        expiring_types={"typing": 10, "custom": 2.5},
    )
    for path in (f"/integrations/{made['id']}", "/integrations"):
        status, shown = await call(ingress, "GET", path, admin_token)
        assert status == 200
        assert CANARY not in str(shown)
    assert CANARY not in str(made)


async def test_a_patch_changes_what_it_names_and_keeps_the_rest(
    ingress: Ingress, admin_token: str, receiver: Receiver, store: SqlStore
):
    framework = {
        "adapter": "botframework",
        "url": "http://127.0.0.1:9/api/messages",
        "appId": "app-" + CANARY,
        "appPassword": "password-" + CANARY,
    }
    status, made = await create(
        ingress, admin_token, receiver.url("patched"), bot=framework, deliveryRate=3
    )
    assert status == 201, made
    path = f"/integrations/{made['id']}"
    # A new URL for the same adapter keeps the credentials, never shown.
    moved = {"adapter": "botframework", "url": "http://127.0.0.1:9/moved"}
    status, changed = await call(ingress, "PATCH", path, admin_token, {"bot": moved})
    assert status == 200, changed
    assert changed["bot"]["credentials"] == ["appId", "appPassword"]
    assert changed["deliveryRate"] == 3  # not named: unchanged
    record = await store.get_integration(made["id"])
    assert record is not None
    assert record.bot is not None
    assert (record.bot.url, record.bot.app_password) == (moved["url"], "password-" + CANARY)
    # Another adapter drops them; null rate: unpaced; null expiring types: the default.
    status, changed = await call(
        ingress,
        "PATCH",
        path,
        admin_token,
        {"bot": {"adapter": "echo"}, "deliveryRate": None, "expiringTypes": {}},
    )
    assert status == 200, changed
    assert changed["bot"] == {"adapter": "echo", "url": None, "credentials": []}
    assert (changed["deliveryRate"], changed["expiringTypes"]) == (None, {})
    status, changed = await call(
        ingress, "PATCH", path, admin_token, {"bot": None, "expiringTypes": None}
    )
    assert status == 200, changed
    assert {k: changed[k] for k in DEFAULTS} == DEFAULTS


async def test_a_bot_that_does_not_fit_its_adapter_is_refused_and_nothing_written(
    ingress: Ingress, admin_token: str, receiver: Receiver, store: SqlStore
):
    unfit = [
        ({"adapter": "http"}, "needs its url"),
        ({"adapter": "echo", "url": "http://127.0.0.1:9/"}, "takes no url"),
        ({"adapter": "echo", "secret": "s"}, "only the http adapter"),
        (
            {"adapter": "botframework", "url": "http://127.0.0.1:9/", "appId": "a"},
            "go together",
        ),
        ({"adapter": "http", "url": "http://127.0.0.1:9/", "appId": "a"}, "only the botframework"),
    ]
    for bot, says in unfit:
        status, body = await create(ingress, admin_token, receiver.url("unfit"), bot=bot)
        assert status == 422, (bot, body)
        assert says in body["error"]["message"]
    status, body = await create(ingress, admin_token, receiver.url("unfit"), deliveryBurst=3)
    assert status == 422
    assert "needs a delivery rate" in body["error"]["message"]
    bad_shapes: list[dict[str, Any]] = [
        {"bot": {"adapter": "not an adapter!"}},
        {"bot": {"adapter": "echo", "extra": 1}},
        {"bot": {"adapter": "http", "url": "ftp://127.0.0.1/"}},
        {"deliveryRate": 0},
        {"deliveryRate": "20"},
        {"deliveryBurst": 0},
        {"expiringTypes": {"typing": 0}},
        {"expiringTypes": {"not a type!": 5}},
        {"operationsUrl": "not a url"},
    ]
    for fields in bad_shapes:
        status, body = await create(ingress, admin_token, receiver.url("unfit"), **fields)
        assert status == 400, (fields, body)
        assert body["error"]["code"] == "invalid_body"
    assert [r for r in await store.list_integrations() if r.name == "unfit"] == []
    # A patch that does not fit writes nothing, not even its valid parts.
    status, made = await create(ingress, admin_token, receiver.url("kept"))
    assert status == 201
    path = f"/integrations/{made['id']}"
    status, _ = await call(
        ingress, "PATCH", path, admin_token, {"deliveryRate": 5, "bot": {"adapter": "http"}}
    )
    assert status == 422
    status, shown = await call(ingress, "GET", path, admin_token)
    assert {k: shown[k] for k in DEFAULTS} == DEFAULTS
