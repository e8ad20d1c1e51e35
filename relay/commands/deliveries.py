"""`relay deliveries show ID`: every attempt of one delivery, by its webhook-id."""

from __future__ import annotations

import argparse

from relay.admin import AdminError
from relay.commands.common import Commands, add_json, group, on_store
from relay.commands.output import show
from relay.settings import Settings
from relay.store import SqlStore

COLUMNS = ["attempt", "created_at", "status", "latency_ms", "error", "next_attempt_at"]


@on_store
async def show_attempts(store: SqlStore, _: Settings, args: argparse.Namespace) -> int:
    attempts = [a.model_dump(mode="json") for a in await store.list_attempts(args.id)]
    if not attempts:
        raise AdminError(f"no attempts logged for {args.id}")
    show(attempts, COLUMNS, args.json)
    return 0


def add_to(commands: Commands[argparse.ArgumentParser]) -> None:
    """`relay deliveries show`."""
    actions = group(commands, "deliveries", "delivery attempts")
    showing = actions.add_parser("show", help="every attempt of one delivery (its webhook-id)")
    showing.add_argument("id", help="the delivery's webhook-id (msg_…)")
    add_json(showing)
    showing.set_defaults(run=show_attempts)
