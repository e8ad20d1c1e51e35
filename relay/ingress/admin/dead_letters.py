"""`GET /dead-letters?stage=&integrationId=&conversationId=`, `POST /dead-letters/replay`,
`POST /dead-letters/purge`: the dead letters kept in the store, through the same
`DeadLetters` as `relay dlq`. Pages run in the order the letters died (then by stage and id);
a listing reads rows, never a queue.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable

from aiohttp import web

from relay.broker import STAGES
from relay.errors import InvalidQuery
from relay.ingress.admin.common import (
    AdminKeys,
    body_of,
    cursor_of,
    decode_cursor,
    encode_cursor,
    json_answer,
    page_size,
    query_choice,
    query_text,
)
from relay.pipeline.dlq import settle
from relay.store import DeadLetterFilter, DeadPosition
from relay.views import dead_letter_view
from relay.wire.admin import Count, DeadLetterSelection, DeadLetterView, Page

_UNIX_SECONDS = re.compile(r"[0-9]{1,18}")


def _cursor(text: str | None) -> DeadPosition | None:
    if text is None:
        return None
    dead_at, stage, letter_id = decode_cursor(text, 3)
    # ASCII digits that fit the store's 64-bit column (`isdigit` takes other scripts' digits,
    # and a time past 64 bits reached the database as a 500).
    if stage not in STAGES or not _UNIX_SECONDS.fullmatch(dead_at):
        raise InvalidQuery("cursor is not one this API gave out")
    return int(dead_at), stage, letter_id


def add_routes(app: web.Application, keys: AdminKeys) -> None:
    """The routes; the store and broker connection are the ingress's own."""

    async def list_letters(request: web.Request) -> web.Response:
        limit = page_size(request)
        selection = DeadLetterFilter(
            stage=query_choice(request, "stage", STAGES),
            integration_id=query_text(request, "integrationId"),
            conversation_id=query_text(request, "conversationId"),
        )
        store = request.config_dict[keys.store]
        found = await store.dead_letters(selection, _cursor(cursor_of(request)), limit + 1)
        items = found[:limit]
        next_cursor = None
        if len(found) > limit:
            last = items[-1]
            next_cursor = encode_cursor(str(last.dead_at), last.stage, last.id)
        page = Page[DeadLetterView](
            items=[dead_letter_view(letter) for letter in items], nextCursor=next_cursor
        )
        return json_answer(page)

    def settling(replay: bool) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def act(request: web.Request) -> web.Response:
            selection = await body_of(request, DeadLetterSelection)
            store, broker = request.config_dict[keys.store], request.config_dict[keys.broker]
            count = await settle(store, broker, selection, replay=replay)
            return json_answer(Count(count=count))

        return act

    app.router.add_get("/dead-letters", list_letters)
    app.router.add_post("/dead-letters/replay", settling(replay=True))
    app.router.add_post("/dead-letters/purge", settling(replay=False))
