"""Changing an integration's bot and delivery options, the same way from the admin API and
the CLI: what a body (or the CLI's flags, validated as one) gives, settled against what the
integration has and checked before anything is written, then written."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any, Final

from relay.admin.bots import changed_bot, check_bot
from relay.admin.endpoints import check_shape
from relay.admin.errors import AdminError
from relay.settings import Settings
from relay.store import BotChoice, DeliveryOptions, IntegrationRecord, Integrations
from relay.store.records import DEFAULT_EXPIRING_TYPES
from relay.wire.admin import BotSpec, DeliveryFields, IntegrationPatch

_DELIVERY_FIELDS = {
    "operationsUrl": "operations_url",
    "deliveryRate": "delivery_rate",
    "deliveryBurst": "delivery_burst",
    "expiringTypes": "expiring_types",
}


class Unchanged(Enum):
    """A bot a change does not name (None names RELAY_BOT's)."""

    UNCHANGED = "unchanged"


UNCHANGED: Final = Unchanged.UNCHANGED


def bot_choice(spec: BotSpec) -> BotChoice:
    """The bot a body names, as the store keeps it."""
    return BotChoice(
        adapter=spec.adapter,
        url=spec.url,
        secret=spec.secret,
        app_id=spec.appId,
        app_password=spec.appPassword,
    )


def bot_given(body: IntegrationPatch) -> BotChoice | Unchanged | None:
    """The bot a patch names: unchanged if absent, RELAY_BOT's (None) if null."""
    if "bot" not in body.model_fields_set:
        return UNCHANGED
    return None if body.bot is None else bot_choice(body.bot)


def delivery_given(body: DeliveryFields) -> dict[str, Any]:
    """The delivery options a body gives, by their stored names (null: the default)."""
    return {
        stored: getattr(body, field)
        for field, stored in _DELIVERY_FIELDS.items()
        if field in body.model_fields_set
    }


@dataclass(frozen=True)
class Settled:
    """An integration's bot and delivery options after a change, checked."""

    bot: BotChoice | None
    delivery: DeliveryOptions


def settle_change(
    settings: Settings,
    record: IntegrationRecord,
    delivery: Mapping[str, Any],
    bot: BotChoice | Unchanged | None = UNCHANGED,
) -> Settled:
    """The bot and delivery options `record` has after a change (AdminError if they do not
    hold together), before anything is written: `bot` None is RELAY_BOT's; `delivery` maps
    the `DeliveryOptions` fields to change to their values (None: the default, unpaced for
    the rate)."""
    new_bot = record.bot
    if not isinstance(bot, Unchanged):
        new_bot = None if bot is None else changed_bot(record.bot, bot)
        if new_bot is not None:
            check_bot(new_bot, settings.bot_modules)
    new_delivery = delivery_options(delivery, record.delivery)
    check_delivery(settings, new_delivery)
    return Settled(new_bot, new_delivery)


def delivery_options(
    given: Mapping[str, Any], base: DeliveryOptions | None = None
) -> DeliveryOptions:
    """`base` (the defaults if None) with the fields given (None: the default; unpaced,
    without a burst, for the rate)."""
    update = dict(given)
    if "expiring_types" in update and update["expiring_types"] is None:
        update["expiring_types"] = dict(DEFAULT_EXPIRING_TYPES)
    if "delivery_rate" in update and update["delivery_rate"] is None:
        update["delivery_burst"] = None
    return (base or DeliveryOptions()).model_copy(update=update)


async def apply_change(store: Integrations, record: IntegrationRecord, settled: Settled) -> None:
    """Write what `settle_change` settled, where it differs from `record`."""
    if settled.bot != record.bot:
        await store.set_bot(record.id, settled.bot)
    if settled.delivery != record.delivery:
        await store.set_delivery(record.id, settled.delivery)


def check_delivery(settings: Settings, delivery: DeliveryOptions) -> None:
    """AdminError unless the options hold together: an operations URL deliveries may use,
    a burst only with a rate."""
    if delivery.operations_url is not None:
        check_shape(settings, delivery.operations_url, "operations")
    if delivery.delivery_burst is not None and delivery.delivery_rate is None:
        raise AdminError("a delivery burst needs a delivery rate")
