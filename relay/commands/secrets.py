"""`relay secrets reencrypt | new-key`: the keys that seal stored secrets (RELAY_SECRET_KEYS)."""

from __future__ import annotations

import argparse
import sys

from relay.admin import AdminError
from relay.commands.common import Commands, group, secret_box, using_store
from relay.settings import Settings
from relay.store.secrets import new_key

KEY_CHANGE = (
    "Signing and bot secrets are stored encrypted with the first key of"
    " RELAY_SECRET_KEYS (comma-separated Fernet keys; every key decrypts). To change"
    " keys, each step on every service before the next: add the new key after the old"
    " one; then put it first; run `relay secrets reencrypt`; then remove the old key."
)


async def reencrypt(settings: Settings, _: argparse.Namespace) -> int:
    if not secret_box(settings).encrypts:
        raise AdminError("RELAY_SECRET_KEYS is empty: set the keys, the new one first")
    done = await using_store(settings, lambda store: store.reseal_secrets())
    print(f"re-encrypted {done.count} secrets with the first key")
    if done.changed:
        print(f"{done.changed} changed meanwhile (a rotation?): run it again", file=sys.stderr)
    for problem in done.unreadable:
        print(f"error: {problem}", file=sys.stderr)
    return 1 if done.unreadable or done.changed else 0


async def print_new_key(_: Settings, __: argparse.Namespace) -> int:
    print(new_key())
    return 0


def add_to(commands: Commands[argparse.ArgumentParser]) -> None:
    """`relay secrets` and its actions."""
    actions = group(
        commands,
        "secrets",
        "the stored secrets' encryption (RELAY_SECRET_KEYS)",
        description=KEY_CHANGE,
    )
    actions.add_parser(
        "reencrypt", help="encrypt every stored secret again with the first key"
    ).set_defaults(run=reencrypt)
    actions.add_parser("new-key", help="print a new key for RELAY_SECRET_KEYS").set_defaults(
        run=print_new_key
    )
