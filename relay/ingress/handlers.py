"""The back end's endpoint: `POST /webhooks/{integrationId}`, with an integration token, or
with a browser's `converse` token for a message of its conversation and user
(`relay.ingress.grants`)."""

from __future__ import annotations

from typing import Any

import structlog
from aiohttp import web
from pydantic import ValidationError

from relay.auth import bearer_token, is_conversation_token, token_matches
from relay.errors import Unauthorized, invalid_fields
from relay.ingress.accept import Acceptor
from relay.ingress.body import parse_json_object
from relay.ingress.clients import UnknownTarget
from relay.ingress.grants import Grants, admit
from relay.ingress.ratelimit import IntegrationLimit
from relay.ingress.waiting import WAIT_LIMITED_HEADER, ReplyWaiter, parse_wait
from relay.store import ConversationGrant, IntegrationRecord
from relay.store.directory import Directory
from relay.wire import InboundRequest
from relay.wire.contract import storable_text

log = structlog.get_logger(__name__)


def validate_inbound(body: dict[str, Any]) -> InboundRequest:
    """The inbound message, or InvalidBody naming each bad field."""
    try:
        return InboundRequest.model_validate(body)
    except ValidationError as error:
        raise invalid_fields(error, "the message is invalid") from error


def request_token(request: web.Request) -> str | None:
    """The request's bearer token, if it could be one of ours.

    Tokens are ASCII (base64url): anything else is no token, and is never hashed (a header
    byte that is not UTF-8 reaches us as a lone surrogate, which cannot be encoded).
    """
    token = bearer_token(request.headers.get("Authorization"))
    return token if token is not None and token.isascii() else None


def plausible_id(value: str) -> bool:
    """Could this be a relay id? Anything else is unknown without asking the store."""
    try:
        storable_text(value)
    except ValueError:
        return False
    return 0 < len(value) <= 256


class WebhookHandler:
    """Authenticates, validates, rate-limits and accepts inbound messages."""

    def __init__(
        self,
        directory: Directory,
        limiter: IntegrationLimit,
        acceptor: Acceptor,
        waiter: ReplyWaiter,
        grants: Grants,
    ) -> None:
        self._directory = directory
        self._limiter = limiter
        self._acceptor = acceptor
        self._waiter = waiter
        self._grants = grants

    async def post_message(self, request: web.Request) -> web.Response:
        """Accept one user message; the answer holds the user, conversation and message."""
        integration, grant = await self._authenticate(request)
        await self._limiter.enforce(integration.id)
        seconds = parse_wait(request.query.get("wait"))
        inbound = validate_inbound(parse_json_object(await request.read()))
        if grant is not None:
            admit(grant, inbound)
        structlog.contextvars.bind_contextvars(
            external_message_id=inbound.messageId,
            external_conversation_id=inbound.conversationId,
        )
        bundle = await self._acceptor.accept(
            integration.id, inbound, structlog.contextvars.get_contextvars().get("request_id")
        )
        structlog.contextvars.bind_contextvars(
            message_id=bundle.message.id, conversation_id=bundle.conversation.id
        )
        if seconds is not None:
            waited = await self._waiter.wait(integration.id, bundle, seconds)
            headers = {WAIT_LIMITED_HEADER: waited.limited_by} if waited.limited_by else None
            return web.json_response(text=waited.answer.model_dump_json(), headers=headers)
        return web.json_response(text=bundle.model_dump_json())

    async def _authenticate(
        self, request: web.Request
    ) -> tuple[IntegrationRecord, ConversationGrant | None]:
        """The integration, and the grant of a browser's `converse` token (None: the back
        end's integration token); or a 401."""
        integration, hashes = await addressed_integration(self._directory, request)
        token = request_token(request)
        if token is not None and is_conversation_token(token):
            return integration, await self._grants.conversing(integration, token)
        if not token_matches(token, hashes):
            raise Unauthorized("missing or invalid token")
        return integration, None


async def addressed_integration(
    directory: Directory, request: web.Request
) -> tuple[IntegrationRecord, list[str]]:
    """The integration of the path, with its integration tokens' hashes; or a 404 (which
    counts as a failed authentication)."""
    integration_id = request.match_info["integrationId"]
    # An unknown id is neither echoed nor logged: it could be a token pasted into the URL.
    if not plausible_id(integration_id):
        raise UnknownTarget("unknown integration")
    entry = await directory.lookup(integration_id, "integration")
    if entry.integration is None:
        raise UnknownTarget("unknown integration")
    structlog.contextvars.bind_contextvars(integration_id=integration_id)
    return entry.integration, entry.token_hashes
