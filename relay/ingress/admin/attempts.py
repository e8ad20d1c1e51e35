"""`GET /attempts?integrationId=&conversationId=&webhookId=&statusClass=&outcome=&since=&until=`:
delivery attempts, newest first, a page at a time."""

from __future__ import annotations

from datetime import datetime
from typing import get_args

from aiohttp import web

from relay.errors import InvalidQuery
from relay.ingress.admin.common import (
    cursor_of,
    decode_cursor,
    encode_cursor,
    json_answer,
    page_size,
    query_choice,
    query_text,
    query_time,
)
from relay.store import AttemptQuery, FoundAttempt, Store
from relay.store.records import AttemptOutcome, StatusClass
from relay.views import attempt_view
from relay.wire.admin import AttemptView, Page

_STATUS_CLASSES: tuple[str, ...] = get_args(StatusClass)
_OUTCOMES: tuple[str, ...] = get_args(AttemptOutcome)


def _cursor(text: str | None) -> tuple[datetime, str] | None:
    if text is None:
        return None
    moment, attempt_id = decode_cursor(text, 2)
    try:
        return datetime.fromisoformat(moment), attempt_id
    except ValueError as error:
        raise InvalidQuery("cursor is not one this API gave out") from error


def _next_cursor(found: FoundAttempt) -> str:
    return encode_cursor(found.created_at.isoformat(), found.id)


def add_routes(app: web.Application, store_key: web.AppKey[Store]) -> None:
    """The route."""

    async def search(request: web.Request) -> web.Response:
        limit = page_size(request)
        query = AttemptQuery(
            integration_id=query_text(request, "integrationId"),
            conversation_id=query_text(request, "conversationId"),
            delivery_id=query_text(request, "webhookId"),
            status_class=query_choice(request, "statusClass", _STATUS_CLASSES),
            outcome=query_choice(request, "outcome", _OUTCOMES),
            since=query_time(request, "since"),
            until=query_time(request, "until"),
            before=_cursor(cursor_of(request)),
        )
        found = await request.config_dict[store_key].search_attempts(query, limit + 1)
        page = Page[AttemptView](
            items=[attempt_view(f) for f in found[:limit]],
            nextCursor=_next_cursor(found[limit - 1]) if len(found) > limit else None,
        )
        return json_answer(page)

    app.router.add_get("/attempts", search)
