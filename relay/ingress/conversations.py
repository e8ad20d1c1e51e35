"""The conversation API's reads: who may read a conversation, and its history after a
watermark (`GET .../messages`).

An integration token reads every conversation of its integration; a conversation token
(`relay.ingress.conversation_tokens`, either scope) reads its own conversation's history and
events, and is the only token accepted in the query (`?token=`), because a browser's
`EventSource` cannot set headers. Tokens in the query are never logged (the ingress logs no
URLs).

A history page holds at most `limit` items and `RELAY_HISTORY_PAGE_BYTES` of them
(`relay.ingress.paging`); its watermark is that of its last item either way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from aiohttp import web

from relay.auth import hash_token, is_conversation_token, token_matches
from relay.errors import InvalidQuery, NotFound, Unauthorized
from relay.ingress.grants import Grants
from relay.ingress.handlers import addressed_integration, plausible_id, request_token
from relay.ingress.paging import read_page
from relay.ingress.ratelimit import IntegrationLimit
from relay.store import History, HistoryRow, IntegrationRecord, Watermark
from relay.store.directory import Directory
from relay.views import history_item

DEFAULT_LIMIT, MAX_LIMIT = 100, 1000


@dataclass(frozen=True)
class Reader:
    """Who reads, and which conversation (None: the integration's every conversation);
    `credential` is the hash of the token it read with (never the token itself), `revocable`
    whether that is a conversation token, which may be revoked or expire while it reads."""

    integration: IntegrationRecord
    conversation_id: str | None
    credential: str
    revocable: bool = False

    @property
    def scope(self) -> tuple[Literal["conversation", "integration"], str]:
        """What the reader reads, as the store's history takes it."""
        if self.conversation_id is not None:
            return "conversation", self.conversation_id
        return "integration", self.integration.id


def item_json(row: HistoryRow) -> bytes:
    """A history row as the API shows it, in JSON."""
    return history_item(row).model_dump_json(exclude_none=True).encode()


def parse_watermark(text: str | None, name: str) -> Watermark | None:
    """A watermark from the query or a header (None if absent), or a 400."""
    if text is None:
        return None
    watermark = Watermark.parse(text)
    if watermark is None:
        raise InvalidQuery(f"{name} is not a watermark this relay gave out")
    return watermark


def parse_limit(text: str | None) -> int:
    """`limit`: 1 to 1000, 100 if absent; else a 400."""
    if text is None:
        return DEFAULT_LIMIT
    # The length first: int() refuses a string of thousands of digits with a ValueError.
    if (
        not (text.isascii() and text.isdigit() and len(text) <= 6)
        or not 1 <= int(text) <= MAX_LIMIT
    ):
        raise InvalidQuery(f"limit must be a whole number from 1 to {MAX_LIMIT}")
    return int(text)


class ConversationApi:
    """Authorizes readers and answers history requests."""

    def __init__(
        self,
        store: History,
        directory: Directory,
        limiter: IntegrationLimit,
        grants: Grants,
        page_bytes: int,
    ) -> None:
        self.store = store
        self._directory = directory
        self._limiter = limiter
        self._grants = grants
        self.page_bytes = page_bytes

    async def messages(self, request: web.Request) -> web.Response:
        """`GET .../conversations/{conversationId}/messages?after=W&limit=N`."""
        reader = await self.authorize(request, conversation_token_ok=True)
        after = parse_watermark(request.query.get("after"), "after")
        limit = parse_limit(request.query.get("limit"))
        page = await read_page(self.store, reader.scope, after, limit, self.page_bytes, item_json)
        # HistoryAnswer's JSON, written out: each item was encoded once, as it was read.
        watermark = str(page.watermark).encode()  # digits and a dot: nothing to escape
        body = b'{"messages":[%s],"watermark":"%s"}' % (b",".join(page.chunks), watermark)
        return web.Response(body=body, content_type="application/json", charset="utf-8")

    async def authorize(
        self, request: web.Request, *, conversation_token_ok: bool, whole_integration: bool = False
    ) -> Reader:
        """The reader of the request's conversation (or integration), or a 401/404/429.

        A conversation token is checked against the conversation it was made for before
        anything says whether that conversation exists (404: a `converse` token made before
        the first message); an integration token learns that too.
        """
        integration, hashes = await addressed_integration(self._directory, request)
        token = request_token(request)
        if conversation_token_ok and token is None:
            token = request.query.get("token")
        revocable = False
        if conversation_token_ok and token is not None and is_conversation_token(token):
            await self._grants.reading(integration, token, request.match_info["conversationId"])
            revocable = True
        elif request.query.get("token") is not None or not token_matches(token, hashes):
            # Only a conversation token goes in the query: an integration token there is
            # refused.
            raise Unauthorized("missing or invalid token")
        await self._limiter.enforce(f"read:{integration.id}")
        assert token is not None  # a conversation token's, or it matched a hash
        if whole_integration:
            return Reader(integration, None, hash_token(token))
        conversation_id = await self._conversation(integration, request)
        if conversation_id is None:
            raise NotFound("unknown conversation")
        return Reader(integration, conversation_id, hash_token(token), revocable)

    async def still_reads(self, reader: Reader) -> bool:
        """Whether the reader's token still holds: a conversation token may have been revoked
        or have expired since (an integration token's revocation counts from the next
        request)."""
        return not reader.revocable or await self._grants.holds(
            reader.integration, reader.credential
        )

    async def _conversation(
        self, integration: IntegrationRecord, request: web.Request
    ) -> str | None:
        external_id = request.match_info["conversationId"]
        if not plausible_id(external_id):
            return None
        return await self.store.find_conversation(integration.id, external_id)
