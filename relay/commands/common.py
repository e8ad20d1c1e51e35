"""What the commands share: their signature, the store and broker they open, the options
several groups take. Where the store and the broker are is the settings' (RELAY_DATABASE_URL,
RELAY_AMQP_URL), read once in `main`; no command takes them as options."""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

from aio_pika.abc import AbstractConnection

from relay.admin import AdminError
from relay.broker import Broker, topology_of
from relay.broker.addresses import Addresses
from relay.settings import Settings
from relay.store import SecretBox, SqlStore, open_store

Command = Callable[[Settings, argparse.Namespace], Coroutine[Any, Any, int]]
StoreCommand = Callable[[SqlStore, Settings, argparse.Namespace], Awaitable[int]]
# What a group adds its commands to (`add_subparsers()`'s answer).
# argparse names no public type for it.
Commands = argparse._SubParsersAction
T = TypeVar("T")

JSON_HELP = "print JSON instead of a table"
BROKER_WAIT = 15.0  # seconds a command waits for the broker to connect
CONNECT_SECONDS = 10.0  # seconds a command tries each broker address for a plain connection


def add_json(parser: argparse.ArgumentParser) -> None:
    """The `--json` option of a command that prints a table by default."""
    parser.add_argument("--json", action="store_true", help=JSON_HELP)


def group(commands: Commands[Any], name: str, helptext: str, **more: Any) -> Commands[Any]:
    """A command group (`relay NAME ACTION`): the subparsers its actions are added to."""
    parser = commands.add_parser(name, help=helptext, **more)
    actions: Commands[Any] = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    return actions


async def using_store(settings: Settings, work: Callable[[SqlStore], Awaitable[T]]) -> T:
    """`work` on the store, opened with the keys of RELAY_SECRET_KEYS and closed after."""
    store = await open_store(settings.database_url, secrets=secret_box(settings))
    try:
        return await work(store)
    finally:
        await store.close()


def on_store(work: StoreCommand) -> Command:
    """A command that works on the store (opened before it runs, closed after)."""

    async def run(settings: Settings, args: argparse.Namespace) -> int:
        return await using_store(settings, lambda store: work(store, settings, args))

    return run


async def broker_connection(settings: Settings) -> AbstractConnection:
    """A plain connection to the broker (the first address that answers), for commands that
    read or declare queues rather than publish."""
    return await Addresses(settings.amqp_url).connect(attempt_seconds=CONNECT_SECONDS)


async def using_broker(settings: Settings, work: Callable[[Broker], Awaitable[T]]) -> T:
    """`work` with a broker connection (publishing with confirms), closed after; AdminError
    (nothing done) if the broker cannot be reached within `BROKER_WAIT`."""
    broker = Broker(settings.amqp_url, topology_of(settings), settings.publish_timeout)
    broker.start()
    try:
        try:
            await asyncio.wait_for(broker.wait_connected(), BROKER_WAIT)
        except TimeoutError as error:
            raise AdminError(f"broker unreachable within {BROKER_WAIT:g}s: nothing done") from error
        return await work(broker)
    finally:
        await broker.close()


def secret_box(settings: Settings) -> SecretBox:
    """What seals the secrets the store keeps (RELAY_SECRET_KEYS: the settings checked them)."""
    return SecretBox.of(settings.secret_keys)
