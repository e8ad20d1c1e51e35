"""The `relay` command: parses arguments, builds the settings, starts the chosen role."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Awaitable, Callable, Coroutine
from datetime import timedelta
from typing import Any

import aio_pika
import aiohttp
import uvloop
from aiohttp import web
from pydantic import ValidationError

from relay import admin
from relay.auth import new_signing_secret
from relay.broker import BROKER_ERRORS, Broker, queues, topology_of
from relay.ingress.app import create_app
from relay.logs import configure_logging
from relay.metrics import Metrics
from relay.pipeline.dlq import DeadLetter, DeadLetters
from relay.service.app import create_service_app
from relay.service.runner import serve
from relay.settings import Settings, describe_error
from relay.sink import SinkOptions, create_sink_app
from relay.store import SqlStore, open_store
from relay.wire import utcnow
from workers.bot.service import bot_worker_context
from workers.delivery.service import delivery_worker_context

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


async def _delivery_worker(settings: Settings, _: argparse.Namespace) -> int:
    app = create_service_app(Metrics(), [], client_max_size=1024)
    app.cleanup_ctx.append(delivery_worker_context(settings))
    await serve(app, settings.http_host, settings.delivery_worker_port, settings.shutdown_timeout)
    return 0


def create_all_app(settings: Settings) -> web.Application:
    """Every service in one application: the ingress routes, and the workers alongside."""
    app = create_app(settings)
    app.cleanup_ctx.append(bot_worker_context(settings))
    app.cleanup_ctx.append(delivery_worker_context(settings))
    return app


async def _run_all(settings: Settings, _: argparse.Namespace) -> int:
    app = create_all_app(settings)
    await serve(app, settings.http_host, settings.http_port, settings.shutdown_timeout)
    return 0


async def _sink(settings: Settings, args: argparse.Namespace) -> int:
    async def work(store: SqlStore) -> int:
        options = SinkOptions(fail=args.fail, status=args.status, retry_after=args.retry_after)
        await serve(
            create_sink_app(store, options), args.host, args.port, settings.shutdown_timeout
        )
        return 0

    return await _with_store(settings, work)


async def _with_dead_letters(
    settings: Settings, args: argparse.Namespace, work: Callable[[DeadLetters], Awaitable[int]]
) -> int:
    broker = Broker(settings.amqp_url, topology_of(settings), settings.publish_timeout)
    broker.start()
    try:
        await asyncio.wait_for(broker.wait_connected(), 15)
        return await work(DeadLetters(broker, args.stage))
    finally:
        await broker.close()


def _selection(args: argparse.Namespace) -> Callable[[DeadLetter], bool]:
    def select(letter: DeadLetter) -> bool:
        if getattr(args, "id", None) and letter.id != args.id:
            return False
        return not (args.integration and letter.integration_id != args.integration)

    return select


async def _dlq_list(settings: Settings, args: argparse.Namespace) -> int:
    async def work(letters: DeadLetters) -> int:
        found = await letters.list(_selection(args))
        if args.json:
            _print_json([letter.view() for letter in found])
        else:
            rows = [{**letter.view(), "deadAt": letter.dead_at} for letter in found]
            print(admin.table(rows, ["id", "integrationId", "attempts", "lastStatus", "reason"]))
        return 0

    return await _with_dead_letters(settings, args, work)


async def _dlq_replay(settings: Settings, args: argparse.Namespace) -> int:
    if not (args.id or args.all or args.integration):
        raise admin.AdminError("say which: --id X, --integration ID or --all")

    async def work(letters: DeadLetters) -> int:
        print(f"replayed {await letters.replay(_selection(args))}")
        return 0

    return await _with_dead_letters(settings, args, work)


async def _dlq_purge(settings: Settings, args: argparse.Namespace) -> int:
    async def work(letters: DeadLetters) -> int:
        print(f"purged {await letters.purge(_selection(args))}")
        return 0

    return await _with_dead_letters(settings, args, work)


async def _deliveries_show(settings: Settings, args: argparse.Namespace) -> int:
    async def work(store: SqlStore) -> int:
        attempts = [a.model_dump(mode="json") for a in await store.list_attempts(args.id)]
        if not attempts:
            raise admin.AdminError(f"no attempts logged for {args.id}")
        if args.json:
            _print_json(attempts)
        else:
            print(
                admin.table(
                    attempts,
                    ["attempt", "created_at", "status", "latency_ms", "error", "next_attempt_at"],
                )
            )
        return 0

    return await _with_store(settings, work)


async def _integrations_rotate(settings: Settings, args: argparse.Namespace) -> int:
    async def work(store: SqlStore) -> int:
        until = utcnow() + timedelta(seconds=admin.parse_duration(args.grace))
        record = await store.rotate_secret(args.integration_id, new_signing_secret(), until)
        if record is None:
            raise admin.AdminError(f"no integration {args.integration_id}")
        _print_json(
            {
                "id": record.id,
                "signingSecret": record.signing_secret,
                "previousSecretValidUntil": until.isoformat(),
            }
        )
        return 0

    return await _with_store(settings, work)


async def _integrations_enable(settings: Settings, args: argparse.Namespace) -> int:
    async def work(store: SqlStore) -> int:
        if not await store.set_disabled(args.integration_id, None):
            raise admin.AdminError(f"no integration {args.integration_id}")
        print(f"enabled {args.integration_id}")
        return 0

    return await _with_store(settings, work)


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


async def _queues(settings: Settings, args: argparse.Namespace) -> int:
    try:
        connection = await aio_pika.connect(settings.amqp_url, timeout=10)
    except BROKER_ERRORS as error:
        print(f"error: cannot reach the broker: {error}", file=sys.stderr)
        return 1
    async with connection:
        while True:
            stats = await queues.look(connection, topology_of(settings))
            if settings.management_url:
                try:
                    stats = await queues.with_management(stats, settings.management_url)
                except (aiohttp.ClientError, TimeoutError) as error:
                    print(f"warning: management API: {error}", file=sys.stderr)
            if args.watch is not None and not args.json:
                print("\033[H\033[J", end="")  # clear the terminal between looks
            print(queues.render_json(stats) if args.json else queues.render_table(stats))
            if args.watch is None:
                return 0
            sys.stdout.flush()
            await asyncio.sleep(args.watch)


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2))


SERVICES = {_ingress, _bot_worker, _delivery_worker, _run_all, _sink}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every `relay` command."""
    parser = argparse.ArgumentParser(prog="relay", description="HTTP messaging relay for bots")
    roles = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    roles.add_parser("ingress", help="the HTTP API").set_defaults(run=_ingress)
    roles.add_parser("bot-worker", help="consumes inbound messages, runs the bot").set_defaults(
        run=_bot_worker
    )
    roles.add_parser("delivery-worker", help="delivers responses to back ends").set_defaults(
        run=_delivery_worker
    )
    roles.add_parser("run", help="every service in one process").set_defaults(run=_run_all)
    sink = roles.add_parser("sink", help="a local response endpoint that prints what it gets")
    sink.add_argument("--host", default="127.0.0.1")
    sink.add_argument("--port", type=int, default=8090)
    sink.add_argument("--fail", type=int, default=0, help="answer 500 to the first N")
    sink.add_argument("--status", type=int, default=200, help="the status to answer")
    sink.add_argument("--retry-after", help="Retry-After to send with failures")
    sink.set_defaults(run=_sink)
    _dlq_commands(roles)
    look = roles.add_parser("queues", help="depth, unacked and consumers of every relay queue")
    look.add_argument("--json", action="store_true")
    look.add_argument(
        "--watch",
        type=float,
        nargs="?",
        const=2.0,
        metavar="SECONDS",
        help="look again every SECONDS (default 2) until interrupted",
    )
    look.set_defaults(run=_queues)
    deliveries = roles.add_parser("deliveries", help="delivery attempts")
    show = deliveries.add_subparsers(dest="action", required=True, metavar="ACTION").add_parser(
        "show", help="every attempt of one delivery (its webhook-id)"
    )
    show.add_argument("id")
    show.add_argument("--json", action="store_true")
    show.set_defaults(run=_deliveries_show)
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
    rotate = sub.add_parser("rotate-secret", help="new signing secret; old one valid a while")
    rotate.add_argument("integration_id")
    rotate.add_argument("--grace", default="24h", help="how long the old secret still signs")
    rotate.set_defaults(run=_integrations_rotate)
    enable = sub.add_parser("enable", help="re-enable an endpoint disabled by a 410")
    enable.add_argument("integration_id")
    enable.set_defaults(run=_integrations_enable)


def _dlq_commands(roles: Any) -> None:
    group = roles.add_parser("dlq", help="dead letters: list, replay, purge")
    sub = group.add_subparsers(dest="action", required=True, metavar="ACTION")
    for name, run, helptext in (
        ("list", _dlq_list, "show dead letters"),
        ("replay", _dlq_replay, "send dead letters back"),
        ("purge", _dlq_purge, "delete dead letters"),
    ):
        command = sub.add_parser(name, help=helptext)
        command.add_argument("--stage", choices=["outbound", "inbound"], default="outbound")
        command.add_argument("--integration", help="only this integration's")
        command.add_argument("--id", help="only this one (message or delivery id)")
        if name == "list":
            command.add_argument("--json", action="store_true")
        if name == "replay":
            command.add_argument("--all", action="store_true")
        command.set_defaults(run=run)


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
    service = args.run in SERVICES
    configure_logging(settings.log_level, sys.stdout if service else sys.stderr)
    command: Command = args.run
    try:
        # uvloop: the same asyncio, with the event loop and its sockets in C; every service
        # spends most of its time there (a few round trips per message).
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(command(settings, args))
    except admin.AdminError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
