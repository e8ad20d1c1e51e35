"""`relay`: builds the parser from the command groups, reads the settings, runs the command.

Exit codes: 0 done; 1 a command that could not be carried out (`error: …` on stderr);
2 bad arguments or bad settings; 130 interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import sys

import uvloop
from pydantic import ValidationError

from relay.admin import AdminError
from relay.commands import (
    deliveries,
    dlq,
    integrations,
    partitions,
    prune,
    queues,
    roles,
    secrets,
    sink,
    tokens,
)
from relay.commands.common import Command
from relay.commands.logs import configure_logging
from relay.settings import Settings, describe_error

# In the order `relay --help` lists them.
GROUPS = (roles, sink, dlq, queues, partitions, deliveries, prune, integrations, tokens, secrets)
# The long-running commands: they log to stdout at RELAY_LOG_LEVEL.
SERVICES: frozenset[Command] = roles.SERVICES | {sink.run}
INTERRUPTED = 130


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every `relay` command."""
    parser = argparse.ArgumentParser(prog="relay", description="HTTP messaging relay for bots")
    parser.add_argument("--version", action="version", version=f"relay {_version()}")
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="commands other than the services: print log lines too (to stderr)",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in GROUPS:
        group.add_to(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `relay` console script."""
    args = build_parser().parse_args(argv)
    try:
        settings = Settings()
    except ValidationError as error:
        print(describe_error(error), file=sys.stderr)
        return 2
    command: Command = args.run
    if command in SERVICES:
        configure_logging(settings.log_level, sys.stdout, settings.log_format)
    else:
        # An interactive command's output is its own: log lines only when asked for.
        level = settings.log_level if args.verbose else "critical"
        configure_logging(level, sys.stderr, settings.log_format)
    try:
        # uvloop: the same asyncio, with the event loop and its sockets in C; every service
        # spends most of its time there (a few round trips per message).
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(command(settings, args))
    except AdminError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return INTERRUPTED


def _version() -> str:
    try:
        return importlib.metadata.version("relay")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
