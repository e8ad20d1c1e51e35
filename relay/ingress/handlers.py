"""The back end's endpoint: `POST /webhooks/{integrationId}`."""

from __future__ import annotations

import json
import math
from typing import Any

import structlog
from aiohttp import web
from pydantic import ValidationError

from relay.auth import bearer_token, token_matches
from relay.errors import InvalidBody, NotFound, Unauthorized, invalid_fields
from relay.ingress.accept import Acceptor
from relay.ingress.ratelimit import RateLimiter
from relay.ingress.waiting import ReplyWaiter, parse_wait
from relay.store import IntegrationRecord
from relay.store.directory import Directory
from relay.wire import InboundRequest, storable_text

log = structlog.get_logger(__name__)


class _NotFinite:
    """Stands in, while parsing, for a number no float can hold: `1e400`, `NaN`, `Infinity`.

    Python's json reads `1e400` as infinity (and, as an extension, the three constants);
    stored, it would be answered as `null` and kept as `Infinity`. A marker lets the error
    name the field that holds it.
    """

    __slots__ = ()


def parse_json_object(raw: bytes) -> dict[str, Any]:
    """The body as a JSON object, or InvalidBody saying why not (naming a non-finite number)."""
    found: list[_NotFinite] = []

    def not_finite() -> _NotFinite:
        found.append(_NotFinite())
        return found[-1]

    def number(text: str) -> float | _NotFinite:
        value = float(text)
        return value if math.isfinite(value) else not_finite()

    try:
        value = json.loads(
            raw.decode("utf-8"), parse_float=number, parse_constant=lambda _: not_finite()
        )
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        raise InvalidBody("the body is not valid JSON", details=str(error)[:200]) from error
    if not isinstance(value, dict):
        kind = "float" if isinstance(value, _NotFinite) else type(value).__name__
        raise InvalidBody("the body must be a JSON object", details=kind)
    # None found in the result: each was the value of a key repeated later (the last wins).
    out_of_range = _paths_of(value, found) if found else []
    if out_of_range:
        raise InvalidBody(
            "the body holds a number out of range",
            details=[
                {"field": path, "message": "must be a finite number"} for path in out_of_range
            ],
        )
    return value


def _paths_of(body: dict[str, Any], markers: list[_NotFinite]) -> list[str]:
    """Where in `body` the markers are, in document order, as `a.b.2` (the paths every
    error detail uses)."""
    wanted = {id(marker) for marker in markers}
    paths: list[str] = []
    # an explicit stack (nesting is bounded by the body size, not the recursion limit),
    # children pushed last first so they come off in document order
    stack: list[tuple[Any, str]] = [(child, str(key)) for key, child in body.items()][::-1]
    while stack:
        item, path = stack.pop()
        if id(item) in wanted:
            paths.append(path)
        elif isinstance(item, dict):
            stack.extend([(child, f"{path}.{key}") for key, child in item.items()][::-1])
        elif isinstance(item, list):
            stack.extend([(child, f"{path}.{i}") for i, child in enumerate(item)][::-1])
    return paths


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
        self, directory: Directory, limiter: RateLimiter, acceptor: Acceptor, waiter: ReplyWaiter
    ) -> None:
        self._directory = directory
        self._limiter = limiter
        self._acceptor = acceptor
        self._waiter = waiter

    async def post_message(self, request: web.Request) -> web.Response:
        """Accept one user message; the answer holds the user, conversation and message."""
        integration = await self._authenticate(request)
        self._limiter.enforce(integration.id)
        seconds = parse_wait(request.query.get("wait"))
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
        if seconds is not None:
            answer = await self._waiter.wait(bundle, seconds)
            return web.json_response(text=answer.model_dump_json())
        return web.json_response(text=bundle.model_dump_json())

    async def _authenticate(self, request: web.Request) -> IntegrationRecord:
        integration, hashes = await addressed_integration(self._directory, request)
        if not token_matches(request_token(request), hashes):
            raise Unauthorized("missing or invalid token")
        return integration


async def addressed_integration(
    directory: Directory, request: web.Request
) -> tuple[IntegrationRecord, list[str]]:
    """The integration of the path, with its integration tokens' hashes; or a 404."""
    integration_id = request.match_info["integrationId"]
    # An unknown id is neither echoed nor logged: it could be a token pasted into the URL.
    if not plausible_id(integration_id):
        raise NotFound("unknown integration")
    entry = await directory.lookup(integration_id, "integration")
    if entry.integration is None:
        raise NotFound("unknown integration")
    structlog.contextvars.bind_contextvars(integration_id=integration_id)
    return entry.integration, entry.token_hashes
