"""The `relay` command: parses arguments, builds the settings, starts the chosen role."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import json
import sys
from collections.abc import Awaitable, Callable, Coroutine
from datetime import timedelta
from typing import Any

import uvloop
from aio_pika.abc import AbstractConnection
from aiohttp import web
from pydantic import ValidationError

from relay import admin, repartition, retention
from relay.broker import BROKER_ERRORS, Broker, queues, topology_of
from relay.broker.addresses import Addresses
from relay.broker.topology import Topology, declared_otherwise
from relay.broker.version import version_of
from relay.cli_help import settings_epilog
from relay.ingress.app import create_app
from relay.logs import configure_logging
from relay.metrics import Metrics
from relay.pipeline.dlq import DeadLetters, settle
from relay.service.app import create_service_app
from relay.service.runner import serve
from relay.settings import Settings, describe_error
from relay.sink import SinkOptions, create_sink_app
from relay.store import DeadLetterFilter, SecretBox, SqlStore, StoreError, open_store
from relay.store.secrets import new_key
from relay.wire import utcnow
from relay.wire.admin import ROTATION_GRACE_SECONDS, DeadLetterSelection
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


async def _with_broker(settings: Settings, work: Callable[[Broker], Awaitable[int]]) -> int:
    broker = Broker(settings.amqp_url, topology_of(settings), settings.publish_timeout)
    broker.start()
    try:
        await asyncio.wait_for(broker.wait_connected(), 15)
        return await work(broker)
    finally:
        await broker.close()


def _dead_letter_selection(args: argparse.Namespace) -> DeadLetterSelection:
    """What `replay` and `purge` act on, as the admin API takes it (a 2 here, not a 400).
    `--stage` always has a value here, so it alone chooses nothing."""
    if not (args.id or args.all or args.integration):
        raise admin.AdminError("say which: --id X and/or --integration ID, or --all")
    try:
        return DeadLetterSelection(
            ids=[args.id] if args.id else None,
            all=args.all,
            stage=args.stage,
            integrationId=args.integration,
        )
    except ValidationError as error:
        raise admin.AdminError("say which: --id X and/or --integration ID, or --all") from error


async def _dlq_list(settings: Settings, args: argparse.Namespace) -> int:
    async def work(store: SqlStore) -> int:
        ids = frozenset({args.id}) if args.id else None
        selection = DeadLetterFilter(args.stage, args.integration, ids=ids)
        found = await DeadLetters(store).page(selection, args.limit)
        if args.json:
            _print_json([letter.view() for letter in found])
        else:
            rows = [letter.view() for letter in found]
            print(admin.table(rows, ["id", "integrationId", "attempts", "lastStatus", "reason"]))
        return 0

    return await _with_store(settings, work)


async def _dlq_settle(settings: Settings, args: argparse.Namespace, replay: bool) -> int:
    selection = _dead_letter_selection(args)

    async def work(store: SqlStore) -> int:
        async def with_broker(broker: Broker | None) -> int:
            count = await settle(store, broker, selection, replay=replay)
            print(f"{'replayed' if replay else 'purged'} {count}")
            return 0

        # Purging is the store's alone; replaying publishes.
        return await (_with_broker(settings, with_broker) if replay else with_broker(None))

    return await _with_store(settings, work)


async def _dlq_replay(settings: Settings, args: argparse.Namespace) -> int:
    return await _dlq_settle(settings, args, replay=True)


async def _dlq_purge(settings: Settings, args: argparse.Namespace) -> int:
    return await _dlq_settle(settings, args, replay=False)


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
    grace = admin.parse_duration(args.grace)

    async def work(store: SqlStore) -> int:
        _print_json((await admin.rotate_secret(store, args.integration_id, grace)).view())
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
    store = await open_store(settings.database_url, secrets=_secret_box(settings))
    try:
        return await work(store)
    finally:
        await store.close()


def _secret_box(settings: Settings) -> SecretBox:
    """What seals the secrets the store keeps (RELAY_SECRET_KEYS: the settings checked them)."""
    return SecretBox.of(settings.secret_keys)


async def _integrations_create(settings: Settings, args: argparse.Namespace) -> int:
    async def work(store: SqlStore) -> int:
        record = await admin.create_integration(
            store, settings, args.name, args.response_url, verify=not args.no_verify
        )
        view = admin.integration_view(record, settings)
        # The signing secret is shown here, once: no listing shows it again.
        shown = {k: view[k] for k in ("id", "name", "webhookUrl")}
        _print_json({**shown, "signingSecret": record.signing_secret})
        return 0

    return await _with_store(settings, work)


async def _integrations_show(settings: Settings, args: argparse.Namespace) -> int:
    async def work(store: SqlStore) -> int:
        record = await store.get_integration(args.integration_id)
        if record is None:
            raise admin.AdminError(f"no integration {args.integration_id}")
        _print_json(admin.integration_view(record, settings))
        return 0

    return await _with_store(settings, work)


async def _secrets_reencrypt(settings: Settings, _: argparse.Namespace) -> int:
    if not _secret_box(settings).encrypts:
        raise admin.AdminError("RELAY_SECRET_KEYS is empty: set the keys, the new one first")

    async def work(store: SqlStore) -> int:
        done = await store.reseal_secrets()
        print(f"re-encrypted {done.count} secrets with the first key")
        if done.changed:
            print(f"{done.changed} changed meanwhile (a rotation?): run it again", file=sys.stderr)
        for problem in done.unreadable:
            print(f"error: {problem}", file=sys.stderr)
        return 1 if done.unreadable or done.changed else 0

    return await _with_store(settings, work)


async def _secrets_new_key(_: Settings, __: argparse.Namespace) -> int:
    print(new_key())
    return 0


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
        records = (
            await store.list_admin_tokens()
            if args.admin
            else await store.list_tokens(args.integration)
        )
        views = [admin.token_view(r) for r in records]
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
        connection = await Addresses(settings.amqp_url).connect(attempt_seconds=10)
    except BROKER_ERRORS as error:
        print(f"error: cannot reach the broker: {error}", file=sys.stderr)
        return 1
    store = await _store_if_reachable(settings)
    async with connection, contextlib.AsyncExitStack() as closing:
        if store is not None:
            closing.push_async_callback(store.close)
        await _broker_said(connection, topology_of(settings))
        while True:
            others = await _counts(store)
            stats, unanswered = await queues.survey(
                connection, topology_of(settings), others, settings.management_url
            )
            if unanswered is not None:
                print(f"warning: management API: {unanswered}", file=sys.stderr)
            if args.watch is not None and not args.json:
                print("\033[H\033[J", end="")  # clear the terminal between looks
            print(queues.render_json(stats) if args.json else queues.render_table(stats))
            if args.watch is None:
                return 0
            sys.stdout.flush()
            await asyncio.sleep(args.watch)


async def _broker_said(connection: AbstractConnection, topology: Topology) -> None:
    """The broker's version, and the dead-letter queues declared with a delivery limit that
    drops letters (on standard error: the table or JSON goes to standard output)."""
    async with connection.channel() as channel:
        print(f"broker: {await version_of(channel)}", file=sys.stderr)
        for name in await declared_otherwise(channel, topology):
            print(
                f"warning: {name} was declared with a delivery limit (RabbitMQ 4's default of"
                " 20): letters returned that often are dropped; see the README",
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


async def _counts(store: SqlStore | None) -> list[int]:
    """The partition counts noted in the store, looked up again on each look."""
    if store is None:
        return []
    try:
        return list(await store.partition_counts())
    except StoreError as error:
        print(f"warning: other partition counts unknown: {error}", file=sys.stderr)
        return []


async def _partitions(settings: Settings, args: argparse.Namespace) -> int:
    async def work(store: SqlStore) -> int:
        connection = await Addresses(settings.amqp_url).connect(attempt_seconds=10)
        async with connection:
            topology = topology_of(settings)
            if args.action == "retire":
                let_go = 2 * settings.generations_interval + 1
                try:
                    deleted = await repartition.retire(
                        store, connection, topology, args.count, let_go
                    )
                except repartition.CannotRetire as error:
                    message = f"cannot retire {args.count} partitions: {error}"
                    raise admin.AdminError(message) from error
                print(f"retired {args.count} partitions; deleted {len(deleted)} queues")
                return 0
            views = await repartition.counts(store, connection, topology)
        own = settings.partitions
        print(repartition.render_json(views) if args.json else repartition.render_table(views, own))
        return 0

    return await _with_store(settings, work)


async def _prune(settings: Settings, args: argparse.Namespace) -> int:
    async def work(store: SqlStore) -> int:
        lease = retention.Lease(store, retention.PRUNE_LEASE, retention.LEASE_SECONDS)
        if not await lease.take():
            raise admin.AdminError("another process is pruning now; try again in a while")
        try:
            cutoff = utcnow() - args.older_than
            pruned, reclaimed = await retention.prune(store, lease, cutoff, None)
        finally:
            await lease.release()
        for kind, count in pruned.counts.items():
            print(f"deleted {count} {kind}")
        if reclaimed:
            print(f"gave {reclaimed} bytes of the database file back")
        if not pruned.complete:
            raise admin.AdminError("stopped early: another process took the lease over")
        return 0

    return await _with_store(settings, work)


def _age(text: str) -> timedelta:
    """An age argument, or argparse's usage error."""
    try:
        return retention.parse_age(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from error


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2))


SERVICES = {_ingress, _bot_worker, _delivery_worker, _run_all, _sink}
_JSON = "print JSON instead of a table"


def _version() -> str:
    try:
        return importlib.metadata.version("relay")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


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
    roles = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for role, run, helptext in (
        ("ingress", _ingress, "the HTTP API"),
        ("bot-worker", _bot_worker, "consumes inbound messages, runs the bot"),
        ("delivery-worker", _delivery_worker, "delivers responses to back ends"),
        ("run", _run_all, "every service in one process, on one port"),
    ):
        roles.add_parser(
            role,
            help=helptext,
            description=f"{helptext}; stops gracefully on SIGTERM",
            epilog=settings_epilog(role),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        ).set_defaults(run=run)
    sink = roles.add_parser("sink", help="a local response endpoint that prints what it gets")
    sink.add_argument("--host", default="127.0.0.1", help="address to listen on")
    sink.add_argument("--port", type=int, default=8090, help="port to listen on")
    sink.add_argument("--fail", type=int, default=0, help="answer 500 to the first N")
    sink.add_argument("--status", type=int, default=200, help="the status to answer")
    sink.add_argument("--retry-after", help="Retry-After to send with failures")
    sink.set_defaults(run=_sink)
    _dlq_commands(roles)
    look = roles.add_parser("queues", help="depth, unacked and consumers of every relay queue")
    look.add_argument("--json", action="store_true", help=_JSON)
    look.add_argument(
        "--watch",
        type=float,
        nargs="?",
        const=2.0,
        metavar="SECONDS",
        help="look again every SECONDS (default 2) until interrupted",
    )
    look.set_defaults(run=_queues)
    counts = roles.add_parser(
        "partitions", help="the partition counts in use (RELAY_PARTITIONS changed on the fly)"
    )
    counts.add_argument("--json", action="store_true", help=_JSON)
    counts.set_defaults(run=_partitions, action="list")
    retiring = counts.add_subparsers(dest="action", metavar="ACTION").add_parser(
        "retire", help="remove a count nobody runs with any more, and its empty queues"
    )
    retiring.add_argument("count", type=int, help="the partition count to retire")
    retiring.set_defaults(run=_partitions)
    deliveries = roles.add_parser("deliveries", help="delivery attempts")
    show = deliveries.add_subparsers(dest="action", required=True, metavar="ACTION").add_parser(
        "show", help="every attempt of one delivery (its webhook-id)"
    )
    show.add_argument("id", help="the delivery's webhook-id (msg_…)")
    show.add_argument("--json", action="store_true", help=_JSON)
    show.set_defaults(run=_deliveries_show)
    _prune_command(roles)
    _integration_commands(roles)
    _token_commands(roles)
    _secret_commands(roles)
    return parser


def _prune_command(roles: Any) -> None:
    helptext = "delete what retention would delete, now"
    pruning = roles.add_parser(
        "prune",
        help=helptext,
        description=f"{helptext}: messages and responses settled before then (nothing in"
        " flight), with their idempotency keys and delivery attempts, and the users and"
        " conversations left with no message; one prune at a time (the workers' janitor"
        " does it every RELAY_PRUNE_INTERVAL, for RELAY_RETENTION_DAYS)",
        epilog=settings_epilog("prune"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    pruning.add_argument(
        "--older-than",
        required=True,
        type=_age,
        metavar="AGE",
        help="what is older than this goes: 90m, 12h, 7d or 2w",
    )
    pruning.set_defaults(run=_prune)


def _integration_commands(roles: Any) -> None:
    group = roles.add_parser("integrations", help="manage integrations")
    sub = group.add_subparsers(dest="action", required=True, metavar="ACTION")
    create = sub.add_parser("create", help="create an integration")
    create.add_argument("--name", required=True, help="a name for people to read")
    create.add_argument("--response-url", required=True, help="the back end's response endpoint")
    create.add_argument(
        "--no-verify",
        action="store_true",
        help="do not POST a test event to the response endpoint first",
    )
    create.set_defaults(run=_integrations_create)
    listing = sub.add_parser("list", help="list integrations")
    listing.add_argument("--json", action="store_true", help=_JSON)
    listing.set_defaults(run=_integrations_list)
    show = sub.add_parser("show", help="one integration (never its signing secret)")
    show.add_argument("integration_id", help="the integration's id")
    show.set_defaults(run=_integrations_show)
    rotate = sub.add_parser(
        "rotate-secret", help="new signing secret (shown once); the old one signs a while too"
    )
    rotate.add_argument("integration_id", help="the integration's id")
    rotate.add_argument(
        "--grace",
        default=f"{ROTATION_GRACE_SECONDS // 3600}h",
        help="how long the old secret still signs, alongside the new one (default 24h,"
        " at most 30d)",
    )
    rotate.set_defaults(run=_integrations_rotate)
    enable = sub.add_parser("enable", help="re-enable an endpoint disabled by a 410")
    enable.add_argument("integration_id", help="the integration's id")
    enable.set_defaults(run=_integrations_enable)


def _secret_commands(roles: Any) -> None:
    group = roles.add_parser(
        "secrets",
        help="the stored secrets' encryption (RELAY_SECRET_KEYS)",
        description="Signing and bot secrets are stored encrypted with the first key of"
        " RELAY_SECRET_KEYS (comma-separated Fernet keys; every key decrypts). To change"
        " keys, each step on every service before the next: add the new key after the old"
        " one; then put it first; run `relay secrets reencrypt`; then remove the old key.",
    )
    sub = group.add_subparsers(dest="action", required=True, metavar="ACTION")
    sub.add_parser(
        "reencrypt", help="encrypt every stored secret again with the first key"
    ).set_defaults(run=_secrets_reencrypt)
    sub.add_parser("new-key", help="print a new key for RELAY_SECRET_KEYS").set_defaults(
        run=_secrets_new_key
    )


def _dlq_commands(roles: Any) -> None:
    group = roles.add_parser("dlq", help="dead letters: list, replay, purge")
    sub = group.add_subparsers(dest="action", required=True, metavar="ACTION")
    for name, run, helptext in (
        ("list", _dlq_list, "show dead letters"),
        ("replay", _dlq_replay, "send dead letters back"),
        ("purge", _dlq_purge, "delete dead letters"),
    ):
        command = sub.add_parser(name, help=helptext)
        command.add_argument(
            "--stage",
            choices=["outbound", "inbound"],
            default="outbound",
            help="responses (outbound, the default) or user messages (inbound)",
        )
        command.add_argument("--integration", help="only this integration's")
        command.add_argument("--id", help="only this one (message or delivery id)")
        if name == "list":
            command.add_argument("--json", action="store_true", help=_JSON)
            command.add_argument(
                "--limit",
                type=int,
                default=100,
                help="show at most this many, those that died first (default 100)",
            )
        else:
            command.add_argument("--all", action="store_true", help=f"{name} every dead letter")
        command.set_defaults(run=run)


def _token_commands(roles: Any) -> None:
    group = roles.add_parser("tokens", help="manage tokens")
    sub = group.add_subparsers(dest="action", required=True, metavar="ACTION")
    create = sub.add_parser("create", help="create a token (printed once)")
    create.add_argument("--integration", help="integration id (not for --kind admin)")
    create.add_argument(
        "--kind",
        choices=["integration", "bot", "admin"],
        default="integration",
        help="integration: the back end's token; bot: for the bot push API;"
        " admin: for the admin API (/admin/v1), of no integration",
    )
    create.add_argument("--json", action="store_true", help=_JSON)
    create.set_defaults(run=_tokens_create)
    listing = sub.add_parser("list", help="list an integration's tokens, or the admin tokens")
    which = listing.add_mutually_exclusive_group(required=True)
    which.add_argument("--integration", help="integration id")
    which.add_argument("--admin", action="store_true", help="the admin tokens")
    listing.add_argument("--json", action="store_true", help=_JSON)
    listing.set_defaults(run=_tokens_list)
    revoke = sub.add_parser("revoke", help="revoke a token by its id")
    revoke.add_argument("token_id", help="the token's id (from tokens list)")
    revoke.set_defaults(run=_tokens_revoke)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `relay` console script."""
    args = build_parser().parse_args(argv)
    try:
        settings = Settings()
    except ValidationError as error:
        print(describe_error(error), file=sys.stderr)
        return 2
    if args.run in SERVICES:
        configure_logging(settings.log_level, sys.stdout)
    else:
        # An interactive command's output is its own: log lines only when asked for.
        configure_logging(settings.log_level if args.verbose else "critical", sys.stderr)
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
