"""Conversation tokens (Direct Line's model, `relay.wire.tokens`): a back end mints one with
its integration token for one user of one conversation, and hands it to a browser; where it
is accepted is `relay.ingress.grants`'s.

- `POST …/conversations/{conversationId}/tokens` mints one (201 `{id, token, expiresAt}`);
  a `converse` token may be minted before the conversation exists (the browser's first
  message starts it), a `read` token only for a conversation that has a message (404).
- `DELETE …/conversations/{conversationId}/tokens` revokes every token of the conversation
  (204, whether there were any or not); `DELETE …/tokens/{tokenId}` the one with that id
  (204; 404 if it is not a live token of this conversation).

Only the token's hash is stored, and the token is in the mint's answer only.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any, Protocol

from aiohttp import web
from pydantic import ValidationError

from relay.auth import hash_token, new_conversation_token, token_matches
from relay.errors import NotFound, Unauthorized, invalid_fields
from relay.ingress.body import parse_json_object
from relay.ingress.handlers import addressed_integration, plausible_id, request_token
from relay.ingress.ratelimit import IntegrationLimit
from relay.store import (
    ConversationGrant,
    ConversationTokenRecord,
    ConversationTokens,
    History,
    IntegrationRecord,
)
from relay.store.directory import Directory
from relay.views import conversation_token_answer
from relay.wire import utcnow
from relay.wire.tokens import ConversationTokenRequest


class TokenStore(ConversationTokens, History, Protocol):
    """The store as minting sees it: the tokens, and whether a conversation exists."""


def validate_token_request(body: dict[str, Any]) -> ConversationTokenRequest:
    """The body of a mint, or InvalidBody naming each bad field."""
    try:
        return ConversationTokenRequest.model_validate(body)
    except ValidationError as error:
        raise invalid_fields(error, "the token request is invalid") from error


async def mint(
    store: TokenStore,
    integration_id: str,
    conversation_id: str,
    asked: ConversationTokenRequest,
    default_seconds: float,
) -> tuple[str, ConversationTokenRecord] | None:
    """A new token (shown once) and its record; None if there is nothing it could be for: a
    conversation id no message could carry, or a `read` token for a conversation with no
    message yet."""
    if not plausible_id(conversation_id):
        return None
    if asked.scope == "read" and not await store.find_conversation(integration_id, conversation_id):
        return None
    seconds = default_seconds if asked.expiresIn is None else asked.expiresIn
    grant = ConversationGrant(
        integration_id=integration_id,
        conversation_id=conversation_id,
        user_id=asked.userId,
        scope=asked.scope,
        expires_at=utcnow() + timedelta(seconds=seconds),
    )
    token = new_conversation_token(asked.scope)
    return token, await store.create_conversation_token(grant, hash_token(token), token[:8])


class ConversationTokenApi:
    """Mints and revokes conversation tokens for the back end (integration token only)."""

    def __init__(
        self,
        store: TokenStore,
        directory: Directory,
        limiter: IntegrationLimit,
        default_seconds: float,
    ) -> None:
        self._store = store
        self._directory = directory
        self._limiter = limiter
        self._default_seconds = default_seconds

    async def create(self, request: web.Request) -> web.Response:
        """`POST …/conversations/{conversationId}/tokens`."""
        integration = await self._back_end(request)
        asked = validate_token_request(parse_json_object(await request.read()))
        conversation_id = request.match_info["conversationId"]
        minted = await mint(
            self._store, integration.id, conversation_id, asked, self._default_seconds
        )
        if minted is None:
            raise NotFound("unknown conversation")
        token, record = minted
        answer = conversation_token_answer(token, record)
        return web.json_response(text=answer.model_dump_json(), status=201)

    async def revoke_all(self, request: web.Request) -> web.Response:
        """`DELETE …/conversations/{conversationId}/tokens`."""
        integration = await self._back_end(request)
        conversation_id = request.match_info["conversationId"]
        if plausible_id(conversation_id):
            await self._store.revoke_conversation_tokens(integration.id, conversation_id)
        return web.Response(status=204)

    async def revoke_one(self, request: web.Request) -> web.Response:
        """`DELETE …/conversations/{conversationId}/tokens/{tokenId}`."""
        integration = await self._back_end(request)
        conversation_id, token_id = (
            request.match_info["conversationId"],
            request.match_info["tokenId"],
        )
        if not (plausible_id(conversation_id) and plausible_id(token_id)):
            raise NotFound("no such token")
        revoked = await self._store.revoke_conversation_tokens(
            integration.id, conversation_id, token_id
        )
        if not revoked:
            raise NotFound("no such token")
        return web.Response(status=204)

    async def _back_end(self, request: web.Request) -> IntegrationRecord:
        """The integration, if the request bears one of its integration tokens; else a 401.
        A conversation token never mints or revokes."""
        integration, hashes = await addressed_integration(self._directory, request)
        if not token_matches(request_token(request), hashes):
            raise Unauthorized("missing or invalid token")
        await self._limiter.enforce(f"tokens:{integration.id}")
        return integration
