"""The back end's endpoint: `POST /webhooks/{integrationId}`."""

from __future__ import annotations

import json
from typing import Any

import structlog
from aiohttp import web
from pydantic import ValidationError

from relay.auth import bearer_token, token_matches
from relay.errors import InvalidBody, NotFound, RateLimited, Unauthorized
from relay.ingress.accept import Acceptor
from relay.ingress.directory import Directory
from relay.ingress.ratelimit import RateLimiter, retry_after
from relay.models import InboundRequest, storable_text
from relay.store import IntegrationRecord

log = structlog.get_logger(__name__)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def parse_json_object(raw: bytes) -> dict[str, Any]:
    """The body as a JSON object, or InvalidBody saying why not."""
    try:
        value = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        raise InvalidBody("the body is not valid JSON", details=str(error)[:200]) from error
    if not isinstance(value, dict):
        raise InvalidBody("the body must be a JSON object", details=type(value).__name__)
    return value


def validate_inbound(body: dict[str, Any]) -> InboundRequest:
    """The inbound message, or InvalidBody naming each bad field."""
    try:
        return InboundRequest.model_validate(body)
    except ValidationError as error:
        fields = [
            {"field": ".".join(str(p) for p in item["loc"]) or "body", "message": item["msg"]}
            for item in error.errors(include_url=False)
        ]
        raise InvalidBody("the message is invalid", details=fields) from error


def plausible_id(value: str) -> bool:
    """Could this be a relay id? Anything else is unknown without asking the store."""
    try:
        storable_text(value)
    except ValueError:
        return False
    return 0 < len(value) <= 256


class WebhookHandler:
    """Authenticates, validates, rate-limits and accepts inbound messages."""

    def __init__(self, directory: Directory, limiter: RateLimiter, acceptor: Acceptor) -> None:
        self._directory = directory
        self._limiter = limiter
        self._acceptor = acceptor

    async def post_message(self, request: web.Request) -> web.Response:
        """Accept one user message; the answer holds the user, conversation and message."""
        integration = await self._authenticate(request)
        wait = self._limiter.check(integration.id)
        if wait:
            raise RateLimited(
                "over the integration's rate limit", headers={"Retry-After": retry_after(wait)}
            )
        inbound = validate_inbound(parse_json_object(await request.read()))
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
        return web.json_response(text=bundle.model_dump_json())

    async def _authenticate(self, request: web.Request) -> IntegrationRecord:
        integration_id = request.match_info["integrationId"]
        if not plausible_id(integration_id):
            raise NotFound("unknown integration", details={"integrationId": integration_id[:256]})
        structlog.contextvars.bind_contextvars(integration_id=integration_id)
        entry = await self._directory.lookup(integration_id, "integration")
        if entry.integration is None:
            raise NotFound("unknown integration", details={"integrationId": integration_id})
        token = bearer_token(request.headers.get("Authorization"))
        if not token_matches(token, entry.token_hashes):
            raise Unauthorized("missing or invalid token")
        return entry.integration
