"""What every admin route shares: its settings, request bodies, paging."""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

from aiohttp import web
from pydantic import BaseModel, ValidationError

from relay.broker import Broker
from relay.broker.presence import QueueAges
from relay.errors import InvalidBody, InvalidQuery, NotFound, invalid_fields
from relay.ingress.body import parse_json_object
from relay.ingress.conversations import parse_limit
from relay.ingress.handlers import plausible_id
from relay.pipeline.replies import ReplyPublisher
from relay.settings import Settings
from relay.store import IntegrationLookup, IntegrationRecord, Store
from relay.wire.contract import storable_text

SETTINGS_KEY = web.AppKey("admin_settings", Settings)


@dataclass(frozen=True)
class AdminKeys:
    """Where the admin routes find the ingress's resources (its application's keys)."""

    store: web.AppKey[Store]
    broker: web.AppKey[Broker]
    replies: web.AppKey[ReplyPublisher]
    ages: web.AppKey[QueueAges]


M = TypeVar("M", bound=BaseModel)


async def body_of(request: web.Request, model: type[M], optional: bool = False) -> M:
    """The request's JSON body as `model` (an empty one if `optional` and there is none),
    or a 400 naming each bad field."""
    raw = await request.read()
    if not raw and not optional:
        raise InvalidBody("a JSON body is required")
    value = parse_json_object(raw) if raw else {}
    try:
        return model.model_validate(value)
    except ValidationError as error:
        raise invalid_fields(error, "the body is invalid") from error


def page_size(request: web.Request) -> int:
    """`?limit=`: 1 to 1000, 100 if absent (as the conversation history's)."""
    return parse_limit(request.query.get("limit"))


def json_answer(model: BaseModel, status: int = 200) -> web.Response:
    return web.json_response(text=model.model_dump_json(), status=status)


def cursor_of(request: web.Request) -> str | None:
    """`?cursor=`: the `nextCursor` of the page before (None: the first page)."""
    text = request.query.get("cursor")
    if text == "":
        raise InvalidQuery("cursor is not one this API gave out")
    return text


def encode_cursor(*parts: str) -> str:
    """An opaque cursor of where a page ended."""
    return base64.urlsafe_b64encode("|".join(parts).encode()).decode()


def decode_cursor(text: str, count: int) -> list[str]:
    """The `count` parts of a cursor `encode_cursor` made, or a 400."""
    try:
        parts = base64.urlsafe_b64decode(text.encode()).decode().split("|", count - 1)
    except (ValueError, binascii.Error, UnicodeError) as error:
        raise InvalidQuery("cursor is not one this API gave out") from error
    if len(parts) != count:
        raise InvalidQuery("cursor is not one this API gave out")
    return parts


def query_text(request: web.Request, name: str) -> str | None:
    """A text parameter: absent (None), or text the store can look for (the input contract's
    `storable_text`: a NUL would reach PostgreSQL, which refuses it)."""
    text = request.query.get(name)
    if text is None:
        return None
    if text == "":
        raise InvalidQuery(f"{name} must not be empty")
    try:
        return storable_text(text)
    except ValueError as error:
        raise InvalidQuery(f"{name} {error}") from error


def query_time(request: web.Request, name: str) -> datetime | None:
    text = request.query.get(name)
    if text is None:
        return None
    try:
        moment = datetime.fromisoformat(text)
        # In UTC now: a time near the calendar's ends cannot be moved to UTC later.
        return moment.astimezone(UTC) if moment.tzinfo else moment.replace(tzinfo=UTC)
    except (ValueError, OverflowError) as error:
        raise InvalidQuery(f"{name} must be an ISO 8601 time") from error


def query_choice(request: web.Request, name: str, choices: tuple[str, ...]) -> Any:
    text = request.query.get(name)
    if text is not None and text not in choices:
        raise InvalidQuery(f"{name} must be one of {', '.join(choices)}")
    return text


async def find_integration(store: IntegrationLookup, integration_id: str) -> IntegrationRecord:
    """The integration of that id, or a 404."""
    record = await store.get_integration(integration_id) if plausible_id(integration_id) else None
    if record is None:
        raise NotFound("unknown integration")
    return record
