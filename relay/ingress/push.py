"""The bot push API: `POST /bot/conversations/{botpressConversationId}/messages`.

A bot that answers later posts `{type, payload}` here with a bot token of the conversation's
integration (`relay tokens create --kind bot`) or the conversation-scoped reply token it was
handed with the message. The response is stored and queued exactly like a turn's reply.
`Idempotency-Key` makes a retried POST answer the message it created instead of a new one.
"""

from __future__ import annotations

import re
import time
from typing import Any

import structlog
from aiohttp import web
from pydantic import ValidationError

from relay.auth import REPLY_PREFIX, reply_token_valid, token_matches
from relay.errors import InvalidBody, Unauthorized, invalid_fields
from relay.ingress.body import parse_json_object
from relay.ingress.clients import UnknownTarget
from relay.ingress.handlers import plausible_id, request_token
from relay.ingress.ratelimit import IntegrationLimit
from relay.payloads import InvalidPayload, validate_outgoing
from relay.pipeline.replies import ReplyPublisher
from relay.store import ConversationRecord, Conversations
from relay.store.directory import Directory
from relay.views import outgoing_view
from relay.wire import BotReply, PushAnswer

log = structlog.get_logger(__name__)

# Visible ASCII, spaces inside (HTTP drops outer ones): a header byte that is not UTF-8
# reaches us as a lone surrogate, which no store can keep.
IDEMPOTENCY_KEY = re.compile(r"[!-~]([ -~]*[!-~])?")
IDEMPOTENCY_KEY_MAX = 256


def idempotency_key(request: web.Request) -> str | None:
    """The request's Idempotency-Key, if any; InvalidBody if it is not a valid one."""
    key = request.headers.get("Idempotency-Key")
    if key is None or (len(key) <= IDEMPOTENCY_KEY_MAX and IDEMPOTENCY_KEY.fullmatch(key)):
        return key
    raise InvalidBody(
        f"Idempotency-Key must be 1 to {IDEMPOTENCY_KEY_MAX} visible ASCII characters",
        details=[{"field": "Idempotency-Key", "message": "not a valid key"}],
    )


def validate_reply(body: dict[str, Any]) -> BotReply:
    """The bot's message, or InvalidBody naming each bad field."""
    try:
        reply = BotReply.model_validate(body)
        validate_outgoing(reply.type, reply.payload)
    except ValidationError as error:
        raise invalid_fields(error, "the message is invalid") from error
    except InvalidPayload as error:
        raise InvalidBody(
            "the payload is not a valid message of its type", details=error.details
        ) from error
    return reply


async def addressed_conversation(store: Conversations, request: web.Request) -> ConversationRecord:
    """The conversation named by the `conversationId` route part; NotFound if none."""
    conversation_id = request.match_info["conversationId"]
    conversation = (
        await store.get_conversation(conversation_id) if plausible_id(conversation_id) else None
    )
    if conversation is None:
        # Not echoed: what a caller put in the path could be a token. Answered before any
        # token is checked, so it costs the client's failed-authentication budget.
        raise UnknownTarget("unknown conversation")
    structlog.contextvars.bind_contextvars(
        integration_id=conversation.integration_id, conversation_id=conversation.id
    )
    return conversation


class PushHandler:
    """Authenticates bots and stores the messages they push."""

    def __init__(
        self,
        store: Conversations,
        directory: Directory,
        limiter: IntegrationLimit,
        replies: ReplyPublisher,
    ) -> None:
        self._store = store
        self._directory = directory
        self._limiter = limiter
        self._replies = replies

    async def post_message(self, request: web.Request) -> web.Response:
        """Store and queue one bot message; 201 with it (the same one for a repeated key)."""
        conversation = await self.authenticate(request)
        await self._limiter.enforce(f"bot:{conversation.integration_id}")
        reply = validate_reply(parse_json_object(await request.read()))
        key = idempotency_key(request)
        record, created = await self._replies.push(conversation, reply.type, reply.payload, key)
        log.info("bot_message_pushed", message_id=record.id, created=created)
        headers = {} if created else {"Idempotent-Replayed": "true"}
        body = PushAnswer(message=outgoing_view(record)).model_dump_json()
        return web.json_response(text=body, status=201, headers=headers)

    async def authenticate(self, request: web.Request) -> ConversationRecord:
        """The addressed conversation, if the bearer may post into it; 404/401 otherwise."""
        conversation = await addressed_conversation(self._store, request)
        if not await self._allowed(request_token(request), conversation):
            raise Unauthorized("missing or invalid token")
        return conversation

    async def _allowed(self, token: str | None, conversation: ConversationRecord) -> bool:
        if token is not None and token.startswith(REPLY_PREFIX):
            secret = await self._store.bot_secret(conversation.integration_id)
            return reply_token_valid(secret, token, conversation.id, time.time())
        entry = await self._directory.lookup(conversation.integration_id, "bot")
        return token_matches(token, entry.token_hashes)
