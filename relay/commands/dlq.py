"""`relay dlq list | replay | purge`: the dead letters kept in the store, through the same
`relay.pipeline.dlq` as the admin API's `/dead-letters`."""

from __future__ import annotations

import argparse

from pydantic import ValidationError

from relay.admin import AdminError
from relay.broker import Broker
from relay.commands.common import Commands, add_json, group, on_store, using_broker, using_store
from relay.commands.output import show
from relay.pipeline.dlq import DeadLetters, settle
from relay.settings import Settings
from relay.store import DeadLetterFilter, SqlStore
from relay.wire.admin import DeadLetterSelection

NOTHING_CHOSEN = "say which: --id X and/or --integration ID, or --all"
LIST_COLUMNS = ["id", "integrationId", "attempts", "lastStatus", "reason"]


@on_store
async def list_letters(store: SqlStore, _: Settings, args: argparse.Namespace) -> int:
    ids = frozenset({args.id}) if args.id else None
    selection = DeadLetterFilter(args.stage, args.integration, ids=ids)
    found = await DeadLetters(store).page(selection, args.limit)
    show([letter.view() for letter in found], LIST_COLUMNS, args.json)
    return 0


async def replay_or_purge(settings: Settings, args: argparse.Namespace) -> int:
    """Replaying publishes; purging is the store's alone (no broker is opened for it)."""
    selection = chosen(args)

    async def work(store: SqlStore) -> int:
        async def with_broker(broker: Broker | None) -> int:
            count = await settle(store, broker, selection, replay=args.replay)
            print(f"{'replayed' if args.replay else 'purged'} {count}")
            return 0

        return await (using_broker(settings, with_broker) if args.replay else with_broker(None))

    return await using_store(settings, work)


def chosen(args: argparse.Namespace) -> DeadLetterSelection:
    """What `replay` and `purge` act on, as the admin API takes it (a 1 here, not a 400).
    `--stage` always has a value here, so it alone chooses nothing."""
    if not (args.id or args.all or args.integration):
        raise AdminError(NOTHING_CHOSEN)
    try:
        return DeadLetterSelection(
            ids=[args.id] if args.id else None,
            all=args.all,
            stage=args.stage,
            integrationId=args.integration,
        )
    except ValidationError as error:
        raise AdminError(NOTHING_CHOSEN) from error


def add_to(commands: Commands[argparse.ArgumentParser]) -> None:
    """`relay dlq` and its actions, which choose letters the same way."""
    actions = group(commands, "dlq", "dead letters: list, replay, purge")
    listing = _choosing(actions, "list", "show dead letters")
    add_json(listing)
    listing.add_argument(
        "--limit",
        type=int,
        default=100,
        help="show at most this many, those that died first (default 100)",
    )
    listing.set_defaults(run=list_letters)
    for name, helptext in (("replay", "send dead letters back"), ("purge", "delete dead letters")):
        acting = _choosing(actions, name, helptext)
        acting.add_argument("--all", action="store_true", help=f"{name} every dead letter")
        acting.set_defaults(run=replay_or_purge, replay=name == "replay")


def _choosing(
    actions: Commands[argparse.ArgumentParser], name: str, helptext: str
) -> argparse.ArgumentParser:
    """An action with the options that choose letters: stage, integration, id."""
    command = actions.add_parser(name, help=helptext)
    command.add_argument(
        "--stage",
        choices=["outbound", "inbound"],
        default="outbound",
        help="responses (outbound, the default) or user messages (inbound)",
    )
    command.add_argument("--integration", help="only this integration's")
    command.add_argument("--id", help="only this one (message or delivery id)")
    return command
