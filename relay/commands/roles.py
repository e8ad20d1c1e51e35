"""The services: `relay ingress`, `relay bot-worker`, `relay delivery-worker`, and `relay run`
(all three on one machine: the ingress in this process and each worker in a process of its
own, `relay.service.supervisor`, or all in one process with `RELAY_RUN_PROCESSES=1`). Each
serves until SIGTERM, then stops gracefully.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import AsyncIterator

import structlog
from aiohttp import web

from relay.commands.common import Command, Commands
from relay.commands.settings_help import settings_epilog
from relay.ingress.app import create_app
from relay.metrics import Metrics
from relay.service.app import READINESS_KEY, create_service_app
from relay.service.lifecycle import Context
from relay.service.runner import serve
from relay.service.supervisor import Workers, announce_started, follow_parent, split_roles
from relay.settings import Settings
from workers.bot.service import bot_worker_context
from workers.delivery.service import delivery_worker_context

log = structlog.get_logger(__name__)

STATUS_BODY_LIMIT = 1024  # a worker's HTTP port serves probes and metrics, takes no bodies
PARENT_GONE = 1


async def ingress(settings: Settings, _: argparse.Namespace) -> int:
    await serve(
        create_app(settings), settings.http_host, settings.http_port, settings.shutdown_timeout
    )
    return 0


async def bot_worker(settings: Settings, args: argparse.Namespace) -> int:
    return await worker(settings, args, bot_worker_context(settings), settings.bot_worker_port)


async def delivery_worker(settings: Settings, args: argparse.Namespace) -> int:
    context = delivery_worker_context(settings)
    return await worker(settings, args, context, settings.delivery_worker_port)


async def worker(settings: Settings, args: argparse.Namespace, context: Context, port: int) -> int:
    """A worker role, serving its status routes on `port`."""
    if not following(args):
        return PARENT_GONE
    app = create_service_app(Metrics(), [], client_max_size=STATUS_BODY_LIMIT)
    app.cleanup_ctx.append(context)
    if args.ready_fd is not None:
        app.cleanup_ctx.append(announce_started(args.ready_fd))  # once the worker has started
    await serve(app, settings.http_host, port, settings.shutdown_timeout)
    return 0


def create_all_app(settings: Settings) -> web.Application:
    """Every service in one application: the ingress routes, and the workers alongside."""
    app = create_app(settings)
    app.cleanup_ctx.append(bot_worker_context(settings))
    app.cleanup_ctx.append(delivery_worker_context(settings))
    return app


def following(args: argparse.Namespace) -> bool:
    """A worker started with `--parent`: stop with that parent (False if it is gone)."""
    parent: int | None = args.parent
    if parent is None or follow_parent(parent):
        return True
    log.error("parent_gone", parent=parent)
    return False


def create_split_app(settings: Settings) -> web.Application:
    """The ingress, with the workers in processes of their own while it runs; its `/readyz`
    says which worker is down."""
    app = create_app(settings)
    workers = Workers(settings)
    app[READINESS_KEY].extend(workers.checks())

    @contextlib.asynccontextmanager
    async def running(_: web.Application) -> AsyncIterator[None]:
        workers.start()
        try:
            yield
        finally:
            await workers.stop()

    async def stopping(_: web.Application) -> None:
        workers.terminate()  # at once: the workers stop while the ingress's requests finish

    # Last, so the workers start once the ingress has opened (and migrated) the store.
    app.cleanup_ctx.append(running)
    app.on_shutdown.append(stopping)
    return app


async def run_all(settings: Settings, _: argparse.Namespace) -> int:
    app = create_split_app(settings) if split_roles(settings) else create_all_app(settings)
    await serve(app, settings.http_host, settings.http_port, settings.shutdown_timeout)
    return 0


ROLES: tuple[tuple[str, Command, str], ...] = (
    ("ingress", ingress, "the HTTP API"),
    ("bot-worker", bot_worker, "consumes inbound messages, runs the bot"),
    ("delivery-worker", delivery_worker, "delivers responses to back ends"),
    ("run", run_all, "every service on this machine, the workers in processes of their own"),
)
SERVICES: frozenset[Command] = frozenset(run for _, run, _ in ROLES)


def add_to(commands: Commands[argparse.ArgumentParser]) -> None:
    """One command per role, whose --help lists the settings it reads."""
    for role, run, helptext in ROLES:
        parser = commands.add_parser(
            role,
            help=helptext,
            description=f"{helptext}; stops gracefully on SIGTERM",
            epilog=settings_epilog(role),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        parser.set_defaults(run=run, parent=None, ready_fd=None)
        if run in (bot_worker, delivery_worker):
            add_supervision(parser)


def add_supervision(parser: argparse.ArgumentParser) -> None:
    """The options with which `relay run` starts a worker as its child."""
    parser.add_argument(
        "--parent",
        type=int,
        metavar="PID",
        help="stop (as on SIGTERM) when the process PID, which started this one, exits",
    )
    parser.add_argument(
        "--ready-fd",
        type=int,
        metavar="FD",
        help="write a line to the pipe FD (inherited) once started",
    )
