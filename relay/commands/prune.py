"""`relay prune --older-than AGE`: what retention would delete, now, under the same lease as
the workers' janitor (`relay.admin.retention`)."""

from __future__ import annotations

import argparse
from datetime import timedelta

from relay.admin import AdminError
from relay.admin.retention import LEASE_SECONDS, PRUNE_LEASE, Lease, parse_age, prune
from relay.commands.common import Commands, on_store
from relay.commands.settings_help import settings_epilog
from relay.settings import Settings
from relay.store import SqlStore
from relay.wire import utcnow

HELP = "delete what retention would delete, now"
DESCRIPTION = (
    f"{HELP}: messages and responses settled before then (nothing in"
    " flight), with their idempotency keys and delivery attempts, and the users and"
    " conversations left with no message; one prune at a time (the workers' janitor"
    " does it every RELAY_PRUNE_INTERVAL, for RELAY_RETENTION_DAYS)"
)


@on_store
async def run(store: SqlStore, _: Settings, args: argparse.Namespace) -> int:
    lease = Lease(store, PRUNE_LEASE, LEASE_SECONDS)
    if not await lease.take():
        raise AdminError("another process is pruning now; try again in a while")
    try:
        pruned, reclaimed = await prune(store, lease, utcnow() - args.older_than, None)
    finally:
        await lease.release()
    for kind, count in pruned.counts.items():
        print(f"deleted {count} {kind}")
    if reclaimed:
        print(f"gave {reclaimed} bytes of the database file back")
    if not pruned.complete:
        raise AdminError("stopped early: another process took the lease over")
    return 0


def age(text: str) -> timedelta:
    """An age argument, or argparse's usage error."""
    try:
        return parse_age(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from error


def add_to(commands: Commands[argparse.ArgumentParser]) -> None:
    """`relay prune`."""
    command = commands.add_parser(
        "prune",
        help=HELP,
        description=DESCRIPTION,
        epilog=settings_epilog("prune"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    command.add_argument(
        "--older-than",
        required=True,
        type=age,
        metavar="AGE",
        help="what is older than this goes: 90m, 12h, 7d or 2w",
    )
    command.set_defaults(run=run)
