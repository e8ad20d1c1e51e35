"""`GET /dead-letters?stage=&integrationId=&conversationId=`, `POST /dead-letters/replay`,
`POST /dead-letters/purge`: the dead-letter queues, through the same `DeadLetters` as
`relay dlq`.

A listing reads a stage's whole queue and puts it back (the broker cannot seek), keeping
one page in memory; pages run inbound first, then outbound, each in the order the letters
died. The queues are bounded (`RELAY_DLQ_MAX_LENGTH`), and so is the cost of a page.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

from aiohttp import web

from relay.broker import STAGES, Broker, StageName
from relay.errors import InvalidQuery
from relay.ingress.admin.common import (
    body_of,
    cursor_of,
    decode_cursor,
    encode_cursor,
    json_answer,
    page_size,
    query_choice,
    query_text,
)
from relay.pipeline.dlq import (
    DeadLetter,
    DeadLetters,
    Position,
    Select,
    matching,
    position,
    settle,
    stages_of,
)
from relay.wire.admin import Count, DeadLetterSelection, DeadLetterView, Page


def view(letter: DeadLetter) -> DeadLetterView:
    dead_at = None if letter.dead_at is None else datetime.fromtimestamp(letter.dead_at, UTC)
    return DeadLetterView(
        id=letter.id,
        stage=letter.stage,
        integrationId=letter.integration_id,
        conversationId=letter.conversation_id,
        reason=letter.reason,
        attempts=letter.attempts,
        lastStatus=letter.last_status,
        deadAt=dead_at,
        body=letter.body,
    )


def _cursor(text: str | None) -> tuple[StageName, Position] | None:
    if text is None:
        return None
    stage, dead_at, letter_id = decode_cursor(text, 3)
    if stage not in STAGES or not dead_at.isdigit():
        raise InvalidQuery("cursor is not one this API gave out")
    return stage, (int(dead_at), letter_id)


async def _page(
    broker: Broker, stages: list[StageName], select: Select, cursor: str | None, limit: int
) -> Page[DeadLetterView]:
    after = _cursor(cursor)
    found: list[DeadLetter] = []
    for stage in stages:
        if after is not None and STAGES.index(stage) < STAGES.index(after[0]):
            continue
        start = after[1] if after is not None and after[0] == stage else None
        found += await DeadLetters(broker, stage).page(select, start, limit + 1 - len(found))
        if len(found) > limit:
            break
    items = found[:limit]
    last = items[-1] if len(found) > limit else None
    next_cursor = None
    if last is not None:
        dead_at, letter_id = position(last)
        next_cursor = encode_cursor(last.stage, str(dead_at), letter_id)
    return Page[DeadLetterView](items=[view(letter) for letter in items], nextCursor=next_cursor)


def add_routes(app: web.Application, broker_key: web.AppKey[Broker]) -> None:
    """The routes; the broker connection is the ingress's own."""

    async def list_letters(request: web.Request) -> web.Response:
        limit = page_size(request)
        stage = query_choice(request, "stage", STAGES)
        select = matching(
            query_text(request, "integrationId"), query_text(request, "conversationId")
        )
        broker = request.config_dict[broker_key]
        page = await _page(broker, stages_of(stage), select, cursor_of(request), limit)
        return json_answer(page)

    def settling(replay: bool) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def act(request: web.Request) -> web.Response:
            selection = await body_of(request, DeadLetterSelection)
            count = await settle(request.config_dict[broker_key], selection, replay=replay)
            return json_answer(Count(count=count))

        return act

    app.router.add_get("/dead-letters", list_letters)
    app.router.add_post("/dead-letters/replay", settling(replay=True))
    app.router.add_post("/dead-letters/purge", settling(replay=False))
