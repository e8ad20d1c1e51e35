"""The flags of `relay integrations create | update` that name a bot and set delivery
options, read into the admin API's own body (`IntegrationPatch`), so the CLI accepts exactly
what the API does and says why not the same way.

A credential given as `-` is read from standard input (one line each, in the order of the
flags), which keeps it out of the shell's history and the process list."""

from __future__ import annotations

import argparse
import sys
from typing import IO, Any

from pydantic import ValidationError

from relay.admin import AdminError
from relay.wire.admin import IntegrationPatch

NONE = "none"  # `--operations-url none`, `--delivery-rate none`, `--expiring none`
DEFAULT_BOT = "default"  # `--bot default`: back to RELAY_BOT
_CREDENTIALS = (
    ("bot_secret", "secret"),
    ("bot_app_id", "appId"),
    ("bot_app_password", "appPassword"),
)


def add_flags(command: argparse.ArgumentParser) -> None:
    """The bot and delivery flags of `create` and `update`."""
    command.add_argument(
        "--bot",
        metavar="ADAPTER",
        help="echo, http, botframework or module:function (update: `default` for RELAY_BOT)",
    )
    command.add_argument("--bot-url", metavar="URL", help="the http or botframework bot's URL")
    command.add_argument("--bot-secret", metavar="VALUE", help="the http bot's bearer (`-`: stdin)")
    command.add_argument("--bot-app-id", metavar="VALUE", help="a Bot Framework app id (`-`)")
    command.add_argument("--bot-app-password", metavar="VALUE", help="its password (`-`: stdin)")
    command.add_argument(
        "--operations-url", metavar="URL", help="where operations events go (`none`: nowhere)"
    )
    command.add_argument(
        "--delivery-rate", metavar="N", help="responses per second at most (`none`: unpaced)"
    )
    command.add_argument("--delivery-burst", metavar="N", type=int, help="with --delivery-rate")
    command.add_argument(
        "--expiring",
        metavar="TYPE=SECONDS",
        action="append",
        help="drop an undelivered response of TYPE past SECONDS (repeat; `none`: no type;"
        " default typing=30)",
    )


def patch_of(args: argparse.Namespace, stdin: IO[str] = sys.stdin) -> IntegrationPatch:
    """The bot and delivery options the flags give, as the admin API's patch body."""
    body: dict[str, Any] = {}
    bot = _bot(args, stdin)
    if bot is not None:
        body["bot"] = None if bot == DEFAULT_BOT else bot
    if args.operations_url is not None:
        body["operationsUrl"] = None if args.operations_url == NONE else args.operations_url
    if args.delivery_rate is not None:
        body["deliveryRate"] = None if args.delivery_rate == NONE else _number(args.delivery_rate)
    if args.delivery_burst is not None:
        body["deliveryBurst"] = args.delivery_burst
    if args.expiring is not None:
        body["expiringTypes"] = _expiring(args.expiring)
    try:
        return IntegrationPatch.model_validate(body)
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in e['loc'])}: {e['msg']}" for e in error.errors()
        )
        raise AdminError(problems) from None  # the input is not echoed: it may hold secrets


def _bot(args: argparse.Namespace, stdin: IO[str]) -> dict[str, str] | str | None:
    given = {name: getattr(args, flag) for flag, name in _CREDENTIALS}
    if args.bot is None:
        if args.bot_url is not None or any(v is not None for v in given.values()):
            raise AdminError("--bot-url and the bot's credentials go with --bot ADAPTER")
        return None
    if args.bot == DEFAULT_BOT:
        return DEFAULT_BOT
    bot = {"adapter": args.bot}
    if args.bot_url is not None:
        bot["url"] = args.bot_url
    for name, value in given.items():
        if value is not None:
            bot[name] = stdin.readline().rstrip("\n") if value == "-" else value
    return bot


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise AdminError(f"not a number: {text!r}") from None


def _expiring(items: list[str]) -> dict[str, float] | None:
    if items == [NONE]:
        return {}
    expiring = {}
    for item in items:
        type_, sep, seconds = item.partition("=")
        if not sep:
            raise AdminError(f"--expiring takes TYPE=SECONDS, not {item!r}")
        expiring[type_] = _number(seconds)
    return expiring
