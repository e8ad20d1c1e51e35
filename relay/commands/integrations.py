"""`relay integrations create | update | list | show | rotate-secret | enable | disable |
recover`: through the same operations (`relay.admin`) and views (`relay.views`) as the admin
API."""

from __future__ import annotations

import argparse
import math
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import TypeVar

from relay import admin, views
from relay.admin import AdminError
from relay.admin.recovery import recover_integration
from relay.broker import Broker
from relay.broker.operations import OperationsEvents
from relay.commands.common import (
    Commands,
    add_json,
    group,
    on_store,
    using_broker,
    using_store,
)
from relay.commands.integration_flags import add_flags, patch_of
from relay.commands.output import plain, print_json, show
from relay.metrics import Metrics
from relay.pipeline.replies import ReplyPublisher
from relay.settings import Settings
from relay.store import IntegrationRecord, SqlStore
from relay.wire import utcnow
from relay.wire.admin import ROTATION_GRACE_SECONDS, IntegrationPatch

LIST_COLUMNS = ["id", "name", "responseUrl", "createdAt"]
DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}

T = TypeVar("T")


async def create(settings: Settings, args: argparse.Namespace) -> int:
    patch = patch_of(args)  # before the store: a typo costs no connection
    bot = admin.bot_given(patch)
    record = await using_store(
        settings,
        lambda store: admin.create_integration(
            store,
            settings,
            args.name,
            args.response_url,
            verify=not args.no_verify,
            bot=None if isinstance(bot, admin.Unchanged) else bot,
            delivery=admin.delivery_options(admin.delivery_given(patch)),
        ),
    )
    view = plain(views.integration_view(record, settings.public_base_url))
    # The signing secret is shown here, once: no listing shows it again.
    shown = {k: view[k] for k in ("id", "name", "webhookUrl")}
    print_json({**shown, "signingSecret": record.signing_secret})
    return 0


async def update(settings: Settings, args: argparse.Namespace) -> int:
    patch = patch_of(args)
    if not patch.model_fields_set:
        raise AdminError("nothing to change: give --bot, --operations-url, --delivery-rate...")
    record = await using_store(settings, lambda store: _update(store, settings, args, patch))
    print_json(plain(views.integration_view(record, settings.public_base_url)))
    return 0


async def _update(
    store: SqlStore, settings: Settings, args: argparse.Namespace, patch: IntegrationPatch
) -> IntegrationRecord:
    record = await store.get_integration(args.integration_id)
    if record is None:
        raise AdminError(f"no integration {args.integration_id}")
    delivery = admin.delivery_given(patch)
    settled = admin.settle_change(settings, record, delivery, admin.bot_given(patch))
    await admin.apply_change(store, record, settled)
    changed = await store.get_integration(record.id)
    if changed is None:
        raise AdminError(f"no integration {args.integration_id}")  # deleted meanwhile
    return changed


@on_store
async def listing(store: SqlStore, settings: Settings, args: argparse.Namespace) -> int:
    base = settings.public_base_url
    found = [plain(views.integration_view(r, base)) for r in await store.list_integrations()]
    show(found, LIST_COLUMNS, args.json)
    return 0


@on_store
async def show_one(store: SqlStore, settings: Settings, args: argparse.Namespace) -> int:
    record = await store.get_integration(args.integration_id)
    if record is None:
        raise AdminError(f"no integration {args.integration_id}")
    print_json(plain(views.integration_view(record, settings.public_base_url)))
    return 0


async def rotate(settings: Settings, args: argparse.Namespace) -> int:
    grace = parse_duration(args.grace)  # before the store: a typo costs no connection
    rotated = await using_store(
        settings, lambda store: admin.rotate_secret(store, args.integration_id, grace)
    )
    print_json(plain(views.rotation_view(rotated)))
    return 0


@on_store
async def enable(store: SqlStore, _: Settings, args: argparse.Namespace) -> int:
    if not await store.set_disabled(args.integration_id, None):
        raise AdminError(f"no integration {args.integration_id}")
    print(f"enabled {args.integration_id}")
    return 0


async def disable(settings: Settings, args: argparse.Namespace) -> int:
    """As `PATCH /integrations/{id} {"enabled": false}`, through the same operation: the
    operations event told only by the run that disabled it. The broker is reached first:
    without it nothing is delivered anyway, and a disable that could not tell never would."""

    async def work(store: SqlStore, broker: Broker) -> bool:
        events = OperationsEvents(broker)  # `disable_integration` awaits its confirm
        return await admin.disable_integration(store, events, args.integration_id)

    changed = await _with_broker(settings, args.integration_id, work)
    name = args.integration_id
    print(f"disabled {name}" if changed else f"{name} was disabled already: nothing told")
    return 0


async def recover(settings: Settings, args: argparse.Namespace) -> int:
    """As `POST /integrations/{id}/recover {"since"}`, through the same operation: every
    response given up on since then, sent again under its webhook-id, in each conversation's
    order; their dead letters go."""
    since = since_of(args.since)

    async def work(store: SqlStore, broker: Broker) -> int:
        replies = ReplyPublisher(store, broker, Metrics())
        return await recover_integration(store, replies, args.integration_id, since)

    print(f"recovered {await _with_broker(settings, args.integration_id, work)}")
    return 0


async def _with_broker(
    settings: Settings, integration_id: str, work: Callable[[SqlStore, Broker], Awaitable[T]]
) -> T:
    """`work` on the store and the broker, for an integration that exists (AdminError if
    not, before the broker is reached)."""

    async def on_store(store: SqlStore) -> T:
        if await store.get_integration(integration_id) is None:
            raise AdminError(f"no integration {integration_id}")
        return await using_broker(settings, lambda broker: work(store, broker))

    return await using_store(settings, on_store)


def since_of(text: str) -> datetime:
    """A time in ISO 8601 with its offset (as the admin API's `since`), or a duration ago
    (`90s`, `15m`, `24h`, `7d`)."""
    try:
        at = datetime.fromisoformat(text)
    except ValueError:
        seconds = parse_duration(text)
        try:
            return utcnow() - timedelta(seconds=seconds)
        except OverflowError as error:
            raise AdminError(f"{text!r} reaches back before any time there is") from error
    if at.tzinfo is None:
        raise AdminError(f"{text!r} needs its offset (…Z or +00:00), or give a duration (24h)")
    return at.astimezone(UTC)


def parse_duration(text: str) -> float:
    """Seconds of `90`, `90s`, `15m`, `24h` or `7d`."""
    number, unit = (text[:-1], text[-1]) if text[-1:] in DURATION_UNITS else (text, "s")
    try:
        seconds = float(number) * DURATION_UNITS[unit]
    except ValueError as error:
        raise AdminError(f"not a duration: {text!r} (try 90s, 15m, 24h, 7d)") from error
    if not math.isfinite(seconds):
        raise AdminError(f"not a duration: {text!r} (try 90s, 15m, 24h, 7d)")
    if seconds < 0:
        raise AdminError("a duration cannot be negative")
    return seconds


def add_to(commands: Commands[argparse.ArgumentParser]) -> None:
    """`relay integrations` and its actions."""
    actions = group(commands, "integrations", "manage integrations")
    made = actions.add_parser("create", help="create an integration")
    made.add_argument("--name", required=True, help="a name for people to read")
    made.add_argument("--response-url", required=True, help="the back end's response endpoint")
    made.add_argument(
        "--no-verify",
        action="store_true",
        help="do not POST a test event to the response endpoint first",
    )
    add_flags(made)
    made.set_defaults(run=create)
    updating = _one(actions, "update", "change an integration's bot or delivery options")
    add_flags(updating)
    updating.set_defaults(run=update)
    listed = actions.add_parser("list", help="list integrations")
    add_json(listed)
    listed.set_defaults(run=listing)
    _one(actions, "show", "one integration (never its signing secret)").set_defaults(run=show_one)
    rotating = _one(
        actions, "rotate-secret", "new signing secret (shown once); the old one signs a while too"
    )
    rotating.add_argument(
        "--grace",
        default=f"{ROTATION_GRACE_SECONDS // 3600}h",
        help="how long the old secret still signs, alongside the new one (default 24h,"
        " at most 30d)",
    )
    rotating.set_defaults(run=rotate)
    _one(actions, "enable", "re-enable an endpoint disabled by a 410").set_defaults(run=enable)
    _one(
        actions,
        "disable",
        "disable an endpoint (its responses dead-lettered), telling its operations URL",
    ).set_defaults(run=disable)
    recovering = _one(
        actions, "recover", "send again every response given up on since a time, in order"
    )
    recovering.add_argument(
        "--since",
        required=True,
        help="a duration ago (90s, 15m, 24h, 7d) or an ISO 8601 time with its offset",
    )
    recovering.set_defaults(run=recover)


def _one(
    actions: Commands[argparse.ArgumentParser], name: str, helptext: str
) -> argparse.ArgumentParser:
    """An action on one integration, named by its id."""
    command = actions.add_parser(name, help=helptext)
    command.add_argument("integration_id", help="the integration's id")
    return command
