"""The `relay` command: parses arguments, builds the settings, starts the chosen role."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from pydantic import ValidationError

from relay import admin
from relay.ingress.app import create_app
from relay.logs import configure_logging
from relay.metrics import Metrics
from relay.runner import serve
from relay.service import create_service_app
from relay.settings import Settings, describe_error
from relay.store import SqlStore, open_store
from workers.bot.service import bot_worker_context

Command = Callable[[Settings, argparse.Namespace], Coroutine[Any, Any, int]]


async def _ingress(settings: Settings, _: argparse.Namespace) -> int:
    await serve(
        create_app(settings), settings.http_host, settings.http_port, settings.shutdown_timeout
    )
    return 0


async def _bot_worker(settings: Settings, _: argparse.Namespace) -> int:
    app = create_service_app(Metrics(), [], client_max_size=1024)
    app.cleanup_ctx.append(bot_worker_context(settings))
    await serve(app, settings.http_host, settings.bot_worker_port, settings.shutdown_timeout)
    return 0


async def _run_all(settings: Settings, _: argparse.Namespace) -> int:
    # One process, one port: the ingress routes, and the workers alongside.
    app = create_app(settings)
    app.cleanup_ctx.append(bot_worker_context(settings))
    await serve(app, settings.http_host, settings.http_port, settings.shutdown_timeout)
    return 0


async def _with_store(settings: Settings, work: Callable[[SqlStore], Awaitable[int]]) -> int:
    store = await open_store(settings.database_url)
    try:
        return await work(store)
    finally:
        await store.close()


async def _integrations_create(settings: Settings, args: argparse.Namespace) -> int:
    async def work(store: SqlStore) -> int:
        view = await admin.create_integration(
            store, settings, args.name, args.response_url, verify=not args.no_verify
        )
        _print_json({k: view[k] for k in ("id", "name", "webhookUrl", "signingSecret")})
        return 0

    return await _with_store(settings, work)


async def _integrations_list(settings: Settings, args: argparse.Namespace) -> int:
    async def work(store: SqlStore) -> int:
        views = [admin.integration_view(r, settings) for r in await store.list_integrations()]
        if args.json:
            _print_json(views)
        else:
            print(admin.table(views, ["id", "name", "responseUrl", "createdAt"]))
        return 0

    return await _with_store(settings, work)


async def _tokens_create(settings: Settings, args: argparse.Namespace) -> int:
    async def work(store: SqlStore) -> int:
        token, record = await admin.create_token(store, args.integration, args.kind)
        if args.json:
            _print_json({**admin.token_view(record), "token": token})
        else:
            # The token alone on stdout, so `TOKEN=$(relay tokens create ...)` works.
            print(token)
            print(
                f"token id {record.id} ({record.kind}); shown once, only its hash is kept",
                file=sys.stderr,
            )
        return 0

    return await _with_store(settings, work)


async def _tokens_list(settings: Settings, args: argparse.Namespace) -> int:
    async def work(store: SqlStore) -> int:
        views = [admin.token_view(r) for r in await store.list_tokens(args.integration)]
        if args.json:
            _print_json(views)
        else:
            print(admin.table(views, ["id", "kind", "prefix", "createdAt", "revokedAt"]))
        return 0

    return await _with_store(settings, work)


async def _tokens_revoke(settings: Settings, args: argparse.Namespace) -> int:
    async def work(store: SqlStore) -> int:
        if not await store.revoke_token(args.token_id):
            raise admin.AdminError(f"no active token {args.token_id}")
        print(f"revoked {args.token_id}")
        return 0

    return await _with_store(settings, work)


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2))


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every `relay` command."""
    parser = argparse.ArgumentParser(prog="relay", description="HTTP messaging relay for bots")
    roles = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    roles.add_parser("ingress", help="the HTTP API").set_defaults(run=_ingress)
    roles.add_parser("bot-worker", help="consumes inbound messages, runs the bot").set_defaults(
        run=_bot_worker
    )
    roles.add_parser("run", help="every service in one process").set_defaults(run=_run_all)
    _integration_commands(roles)
    _token_commands(roles)
    return parser


def _integration_commands(roles: Any) -> None:
    group = roles.add_parser("integrations", help="manage integrations")
    sub = group.add_subparsers(dest="action", required=True, metavar="ACTION")
    create = sub.add_parser("create", help="create an integration")
    create.add_argument("--name", required=True)
    create.add_argument("--response-url", required=True, help="the back end's response endpoint")
    create.add_argument(
        "--no-verify",
        action="store_true",
        help="do not POST a test event to the response endpoint first",
    )
    create.set_defaults(run=_integrations_create)
    listing = sub.add_parser("list", help="list integrations")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(run=_integrations_list)


def _token_commands(roles: Any) -> None:
    group = roles.add_parser("tokens", help="manage tokens")
    sub = group.add_subparsers(dest="action", required=True, metavar="ACTION")
    create = sub.add_parser("create", help="create a token (printed once)")
    create.add_argument("--integration", required=True, help="integration id")
    create.add_argument(
        "--kind",
        choices=["integration", "bot"],
        default="integration",
        help="integration: the back end's token; bot: for the bot push API",
    )
    create.add_argument("--json", action="store_true")
    create.set_defaults(run=_tokens_create)
    listing = sub.add_parser("list", help="list an integration's tokens")
    listing.add_argument("--integration", required=True)
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(run=_tokens_list)
    revoke = sub.add_parser("revoke", help="revoke a token by its id")
    revoke.add_argument("token_id")
    revoke.set_defaults(run=_tokens_revoke)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `relay` console script."""
    args = build_parser().parse_args(argv)
    try:
        settings = Settings()
    except ValidationError as error:
        print(describe_error(error), file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    command: Command = args.run
    try:
        return asyncio.run(command(settings, args))
    except admin.AdminError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
