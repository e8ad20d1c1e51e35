"""The services: `relay ingress`, `relay bot-worker`, `relay delivery-worker`, and `relay run`
(all three in one process, on one port). Each serves until SIGTERM, then stops gracefully.
"""

from __future__ import annotations

import argparse

from aiohttp import web

from relay.commands.common import Command, Commands
from relay.commands.settings_help import settings_epilog
from relay.ingress.app import create_app
from relay.metrics import Metrics
from relay.service.app import create_service_app
from relay.service.runner import serve
from relay.settings import Settings
from workers.bot.service import bot_worker_context
from workers.delivery.service import delivery_worker_context

STATUS_BODY_LIMIT = 1024  # a worker's HTTP port serves probes and metrics, takes no bodies


async def ingress(settings: Settings, _: argparse.Namespace) -> int:
    await serve(
        create_app(settings), settings.http_host, settings.http_port, settings.shutdown_timeout
    )
    return 0


async def bot_worker(settings: Settings, _: argparse.Namespace) -> int:
    app = create_service_app(Metrics(), [], client_max_size=STATUS_BODY_LIMIT)
    app.cleanup_ctx.append(bot_worker_context(settings))
    await serve(app, settings.http_host, settings.bot_worker_port, settings.shutdown_timeout)
    return 0


async def delivery_worker(settings: Settings, _: argparse.Namespace) -> int:
    app = create_service_app(Metrics(), [], client_max_size=STATUS_BODY_LIMIT)
    app.cleanup_ctx.append(delivery_worker_context(settings))
    await serve(app, settings.http_host, settings.delivery_worker_port, settings.shutdown_timeout)
    return 0


def create_all_app(settings: Settings) -> web.Application:
    """Every service in one application: the ingress routes, and the workers alongside."""
    app = create_app(settings)
    app.cleanup_ctx.append(bot_worker_context(settings))
    app.cleanup_ctx.append(delivery_worker_context(settings))
    return app


async def run_all(settings: Settings, _: argparse.Namespace) -> int:
    app = create_all_app(settings)
    await serve(app, settings.http_host, settings.http_port, settings.shutdown_timeout)
    return 0


ROLES: tuple[tuple[str, Command, str], ...] = (
    ("ingress", ingress, "the HTTP API"),
    ("bot-worker", bot_worker, "consumes inbound messages, runs the bot"),
    ("delivery-worker", delivery_worker, "delivers responses to back ends"),
    ("run", run_all, "every service in one process, on one port"),
)
SERVICES: frozenset[Command] = frozenset(run for _, run, _ in ROLES)


def add_to(commands: Commands[argparse.ArgumentParser]) -> None:
    """One command per role, whose --help lists the settings it reads."""
    for role, run, helptext in ROLES:
        commands.add_parser(
            role,
            help=helptext,
            description=f"{helptext}; stops gracefully on SIGTERM",
            epilog=settings_epilog(role),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        ).set_defaults(run=run)
