"""`relay queues [--json] [--watch [SECONDS]]`: depth, unacked and consumers of every relay
queue of every partition count in use, and each paced integration's pace with how many of
its responses wait (the tables or JSON on stdout, warnings on stderr)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys

from aio_pika.abc import AbstractConnection

from relay.admin.pacing import paced_integrations
from relay.broker import BROKER_ERRORS, queues, topology_of
from relay.broker.topology import Topology, declared_otherwise
from relay.broker.version import version_of
from relay.commands.common import Commands, add_json, broker_connection
from relay.settings import Settings
from relay.store import SqlStore, StoreError, open_store
from relay.wire.admin import PacedView

CLEAR_SCREEN = "\033[H\033[J"
WATCH_DEFAULT = 2.0


async def look(settings: Settings, args: argparse.Namespace) -> int:
    try:
        connection = await broker_connection(settings)
    except BROKER_ERRORS as error:
        print(f"error: cannot reach the broker: {error}", file=sys.stderr)
        return 1
    store = await _store_if_reachable(settings)
    topology = topology_of(settings)
    async with connection, contextlib.AsyncExitStack() as closing:
        if store is not None:
            closing.push_async_callback(store.close)
        await _broker_said(connection, topology)
        while True:
            await _look_once(settings, topology, connection, store, args)
            if args.watch is None:
                return 0
            sys.stdout.flush()
            await asyncio.sleep(args.watch)


async def _look_once(
    settings: Settings,
    topology: Topology,
    connection: AbstractConnection,
    store: SqlStore | None,
    args: argparse.Namespace,
) -> None:
    others = await _counts(store)
    stats, unanswered = await queues.survey(connection, topology, others, settings.management_url)
    if unanswered is not None:
        print(f"warning: management API: {unanswered}", file=sys.stderr)
    paced = await _paced(settings, store)
    if args.watch is not None and not args.json:
        print(CLEAR_SCREEN, end="")  # between looks
    if args.json:
        document = json.loads(queues.render_json(stats))
        print(json.dumps({**document, "paced": [view.model_dump() for view in paced]}, indent=2))
    else:
        print(queues.render_table(stats))
        if paced:
            print("\n" + render_paced(paced))


async def _broker_said(connection: AbstractConnection, topology: Topology) -> None:
    """The broker's version, and the dead-letter queues declared with a delivery limit that
    drops letters (on standard error: the table or JSON goes to standard output)."""
    async with connection.channel() as channel:
        print(f"broker: {await version_of(channel)}", file=sys.stderr)
        for name in await declared_otherwise(channel, topology):
            print(
                f"warning: {name} was declared with a delivery limit (RabbitMQ 4's default of"
                " 20): letters returned that often are dropped; see docs/operating/versions.md",
                file=sys.stderr,
            )


async def _store_if_reachable(settings: Settings) -> SqlStore | None:
    """The store, for the partition counts in use (None if it cannot be opened: the queues
    of this configuration's count are still worth showing)."""
    try:
        return await open_store(settings.database_url)
    except (StoreError, OSError) as error:
        print(f"warning: other partition counts unknown: {error}", file=sys.stderr)
        return None


async def _paced(settings: Settings, store: SqlStore | None) -> list[PacedView]:
    """The paced integrations, looked up again on each look (none without the store)."""
    if store is None:
        return []
    try:
        return await paced_integrations(store, settings.delivery_max_age)
    except StoreError as error:
        print(f"warning: paced integrations unknown: {error}", file=sys.stderr)
        return []


def render_paced(paced: list[PacedView]) -> str:
    """A fixed-width table, one paced integration per line."""
    header = ("PACED INTEGRATION", "NAME", "RATE/S", "BURST", "WAITING")
    rows = [header] + [
        (p.integrationId, p.name, f"{p.deliveryRate:g}", str(p.deliveryBurst), str(p.waiting))
        for p in paced
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


async def _counts(store: SqlStore | None) -> list[int]:
    """The partition counts noted in the store, looked up again on each look."""
    if store is None:
        return []
    try:
        return list(await store.partition_counts())
    except StoreError as error:
        print(f"warning: other partition counts unknown: {error}", file=sys.stderr)
        return []


def add_to(commands: Commands[argparse.ArgumentParser]) -> None:
    """`relay queues`."""
    command = commands.add_parser(
        "queues",
        help="depth, unacked and consumers of every relay queue; the paced integrations",
    )
    add_json(command)
    command.add_argument(
        "--watch",
        type=float,
        nargs="?",
        const=WATCH_DEFAULT,
        metavar="SECONDS",
        help="look again every SECONDS (default 2) until interrupted",
    )
    command.set_defaults(run=look)
