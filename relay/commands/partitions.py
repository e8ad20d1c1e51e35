"""`relay partitions [--json]` and `relay partitions retire COUNT`: the partition counts in
use (RELAY_PARTITIONS changed on the fly), and retiring one (`relay.admin.partitions`)."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict

from relay.admin import AdminError
from relay.admin.partitions import CannotRetire, CountView, counts, retire
from relay.broker import topology_of
from relay.commands.common import Commands, add_json, broker_connection, on_store
from relay.settings import Settings
from relay.store import SqlStore

HEADER = ("PARTITIONS", "LAST NOTED", "RUNNING", "UNFINISHED IN", "UNFINISHED OUT", "READY")


@on_store
async def listing(store: SqlStore, settings: Settings, args: argparse.Namespace) -> int:
    connection = await broker_connection(settings)
    async with connection:
        views = await counts(store, connection, topology_of(settings))
    print(render_json(views) if args.json else render_table(views, settings.partitions))
    return 0


@on_store
async def retiring(store: SqlStore, settings: Settings, args: argparse.Namespace) -> int:
    # The workers look for counts every RELAY_GENERATIONS_INTERVAL: two looks and a second.
    let_go = 2 * settings.generations_interval + 1
    connection = await broker_connection(settings)
    async with connection:
        try:
            deleted = await retire(store, connection, topology_of(settings), args.count, let_go)
        except CannotRetire as error:
            raise AdminError(f"cannot retire {args.count} partitions: {error}") from error
    print(f"retired {args.count} partitions; deleted {len(deleted)} queues")
    return 0


def render_table(views: list[CountView], own: int) -> str:
    """A fixed-width table, one count per line (`own`: this configuration's count)."""
    rows = [HEADER] + [
        (
            f"{v.partitions}{' (this config)' if v.partitions == own else ''}",
            v.last_noted.isoformat(timespec="seconds"),
            "yes" if v.running else "no",
            str(v.unfinished_inbound),
            str(v.unfinished_outbound),
            "?" if v.ready is None else str(v.ready),
        )
        for v in views
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(HEADER))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def render_json(views: list[CountView]) -> str:
    """The counts as one JSON document."""
    rows = [{**asdict(v), "last_noted": v.last_noted.isoformat()} for v in views]
    return json.dumps({"partition_counts": rows}, indent=2)


def add_to(commands: Commands[argparse.ArgumentParser]) -> None:
    """`relay partitions` (a listing) and its one action, `retire`."""
    command = commands.add_parser(
        "partitions", help="the partition counts in use (RELAY_PARTITIONS changed on the fly)"
    )
    add_json(command)
    command.set_defaults(run=listing, action="list")
    retire_count = command.add_subparsers(dest="action", metavar="ACTION").add_parser(
        "retire", help="remove a count nobody runs with any more, and its empty queues"
    )
    retire_count.add_argument("count", type=int, help="the partition count to retire")
    retire_count.set_defaults(run=retiring)
