"""`relay tokens create | list | revoke`: integration, bot and admin tokens, made by the same
operation (`relay.admin`) and shown by the same view (`relay.views`) as the admin API's.
`relay tokens conversation`: a conversation token for a browser, minted as
`POST …/conversations/{conversationId}/tokens` mints it (`make run` gives the chat page one)."""

from __future__ import annotations

import argparse
import sys

from pydantic import ValidationError

from relay import admin, views
from relay.admin import AdminError
from relay.commands.common import Commands, add_json, group, on_store
from relay.commands.output import plain, print_json, show
from relay.ingress.conversation_tokens import mint
from relay.settings import Settings
from relay.store import SqlStore
from relay.views import conversation_token_answer
from relay.wire.tokens import ConversationTokenRequest

LIST_COLUMNS = ["id", "kind", "prefix", "createdAt", "revokedAt"]


@on_store
async def create(store: SqlStore, _: Settings, args: argparse.Namespace) -> int:
    token, record = await admin.create_token(store, args.integration, args.kind)
    if args.json:
        print_json({**plain(views.token_view(record)), "token": token})
        return 0
    # The token alone on stdout, so `TOKEN=$(relay tokens create ...)` works.
    print(token)
    print(
        f"token id {record.id} ({record.kind}); shown once, only its hash is kept",
        file=sys.stderr,
    )
    return 0


@on_store
async def listing(store: SqlStore, _: Settings, args: argparse.Namespace) -> int:
    records = (
        await store.list_admin_tokens() if args.admin else await store.list_tokens(args.integration)
    )
    show([plain(views.token_view(r)) for r in records], LIST_COLUMNS, args.json)
    return 0


@on_store
async def revoke(store: SqlStore, _: Settings, args: argparse.Namespace) -> int:
    if not await store.revoke_token(args.token_id):
        raise AdminError(f"no active token {args.token_id}")
    print(f"revoked {args.token_id}")
    return 0


@on_store
async def conversation(store: SqlStore, settings: Settings, args: argparse.Namespace) -> int:
    if await store.get_integration(args.integration) is None:
        raise AdminError(f"no integration {args.integration}")
    try:
        asked = ConversationTokenRequest(
            userId=args.user, scope=args.scope, expiresIn=args.expires_in
        )
    except ValidationError as error:
        problems = "; ".join(f"{e['loc'][0]}: {e['msg']}" for e in error.errors())
        raise AdminError(problems) from error
    minted = await mint(
        store, args.integration, args.conversation, asked, settings.read_token_seconds
    )
    if minted is None:
        raise AdminError(
            f"no conversation {args.conversation} to read (a converse token needs none)"
        )
    token, record = minted
    if args.json:
        answer = conversation_token_answer(token, record)
        print(answer.model_dump_json(indent=2))
        return 0
    print(token)  # alone on stdout, as `relay tokens create`
    print(
        f"conversation token {record.id} ({asked.scope}), expires"
        f" {record.grant.expires_at.isoformat(timespec='seconds')}; shown once",
        file=sys.stderr,
    )
    return 0


def add_to(commands: Commands[argparse.ArgumentParser]) -> None:
    """`relay tokens` and its actions."""
    actions = group(commands, "tokens", "manage tokens")
    made = actions.add_parser("create", help="create a token (printed once)")
    made.add_argument("--integration", help="integration id (not for --kind admin)")
    made.add_argument(
        "--kind",
        choices=["integration", "bot", "admin"],
        default="integration",
        help="integration: the back end's token; bot: for the bot push API;"
        " admin: for the admin API (/admin/v1), of no integration",
    )
    add_json(made)
    made.set_defaults(run=create)
    listed = actions.add_parser("list", help="list an integration's tokens, or the admin tokens")
    which = listed.add_mutually_exclusive_group(required=True)
    which.add_argument("--integration", help="integration id")
    which.add_argument("--admin", action="store_true", help="the admin tokens")
    add_json(listed)
    listed.set_defaults(run=listing)
    revoking = actions.add_parser("revoke", help="revoke a token by its id")
    revoking.add_argument("token_id", help="the token's id (from tokens list)")
    revoking.set_defaults(run=revoke)
    minting = actions.add_parser(
        "conversation",
        help="a conversation token for a browser (printed once): one user of one conversation",
    )
    minting.add_argument("--integration", required=True, help="integration id")
    minting.add_argument("--conversation", required=True, help="your id of the conversation")
    minting.add_argument("--user", required=True, help="your id of the user it acts as")
    minting.add_argument(
        "--scope",
        choices=["read", "converse"],
        default="read",
        help="read: its history and events; converse: also post the user's messages",
    )
    minting.add_argument(
        "--expires-in",
        type=int,
        default=None,
        metavar="SECONDS",
        help="60 to 86400 (default: RELAY_READ_TOKEN_SECONDS, an hour)",
    )
    add_json(minting)
    minting.set_defaults(run=conversation)
