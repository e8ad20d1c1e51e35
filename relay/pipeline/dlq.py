"""Dead letters: kept in the store, listed, replayed and purged there.

A dead-letter queue only carries a letter to the store (`relay.pipeline.dlq_keeper`): what
the broker dead-letters (a delivery limit reached) and what the stages dead-letter (a reason
of their own) is taken off the queue once it is kept. Listing a letter reads a row, so no
look ever takes a letter off a queue or counts against a broker's delivery limit (RabbitMQ 4
gives quorum queues one of 20 by default, and counts a message taken and given back).

Replaying publishes the letter back to its stage with confirms (outbound: attempts reset,
same delivery id and so the same `webhook-id`), and only then forgets it, unless it died
again meanwhile: nothing is lost in between.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

from aio_pika.abc import AbstractIncomingMessage

from relay.broker import Broker, StageName
from relay.pipeline.unpublishable import replayable
from relay.store import DeadLetter, DeadLetterFilter, DeadLetterStore
from relay.wire import (
    ATTEMPT_HEADER,
    ATTEMPTS_HEADER,
    DEAD_AT_HEADER,
    LAST_STATUS_HEADER,
    REASON_HEADER,
    utcnow,
)
from relay.wire.admin import DeadLetterSelection

# Letters read from the store at a time, when replaying or purging a selection.
BATCH = 200


def read(stage: StageName, message: AbstractIncomingMessage, now: float) -> DeadLetter:
    """The dead letter a message of a dead-letter queue holds."""
    headers = message.headers or {}
    body = _body(message.body)
    if stage == "outbound":
        conversation = _text(_dict(body.get("body")).get("botpressConversationId"))
    else:
        conversation = _text(_dict(_dict(body.get("bundle")).get("conversation")).get("id"))
    return DeadLetter(
        # A message with no id (not one of Relay's) is known by its content.
        id=message.message_id or f"sha256:{hashlib.sha256(message.body).hexdigest()[:32]}",
        stage=stage,
        integration_id=_text(body.get("integrationId")),
        conversation_id=conversation,
        reason=str(headers.get(REASON_HEADER) or _broker_reason(headers) or ""),
        attempts=_int(headers.get(ATTEMPTS_HEADER, headers.get(ATTEMPT_HEADER))) or 0,
        last_status=_int(headers.get(LAST_STATUS_HEADER)) or None,
        dead_at=_dead_at(message, now),
        body=body,
    )


def _body(raw: bytes) -> dict[str, Any]:
    """The letter's JSON object; what is not one is kept as text, to be read and purged."""
    try:
        body = json.loads(raw)
    except ValueError:
        body = None
    return body if isinstance(body, dict) else {"unreadable": raw.decode(errors="replace")}


def _dict(value: object) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _text(value: object) -> str:
    return value if isinstance(value, str) else ""


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _death(headers: dict[str, Any]) -> dict[str, Any]:
    """The broker's latest account of the message's death (`x-death`), if it has one."""
    deaths = headers.get("x-death")
    return _dict(deaths[0]) if isinstance(deaths, list) and deaths else {}


def _broker_reason(headers: dict[str, Any]) -> str | None:
    """Why the broker dead-lettered it (e.g. `delivery_limit`, past the delivery limit)."""
    death = _death(headers)
    reason = death.get("reason")
    if not isinstance(reason, str):
        return None
    queue = death.get("queue")
    return f"{reason} (dead-lettered by the broker from {queue})"


def _dead_at(message: AbstractIncomingMessage, now: float) -> int:
    """When it died: Relay's own header, else the broker's (`x-death`), else when it was
    published, else now (unix seconds)."""
    headers = message.headers or {}
    own = _int(headers.get(DEAD_AT_HEADER))
    if own is not None:
        return own
    died = _death(headers).get("time")
    if isinstance(died, datetime):
        return int(died.timestamp())
    return int(message.timestamp.timestamp() if message.timestamp else now)


def selection_of(chosen: DeadLetterSelection) -> DeadLetterFilter:
    """The letters an admin selection names."""
    return DeadLetterFilter(
        stage=chosen.stage,
        integration_id=chosen.integrationId,
        conversation_id=chosen.conversationId,
        ids=frozenset(chosen.ids) if chosen.ids is not None else None,
    )


class DeadLetters:
    """The dead letters kept in the store; `broker` publishes replays."""

    def __init__(self, store: DeadLetterStore, broker: Broker | None = None) -> None:
        self._store = store
        self._broker = broker

    async def page(
        self, selection: DeadLetterFilter, limit: int, after: DeadLetter | None = None
    ) -> list[DeadLetter]:
        """The first `limit` selected letters (after `after`), in the order they died."""
        position = None if after is None else (after.dead_at, after.stage, after.id)
        return await self._store.dead_letters(selection, position, limit)

    async def _every(self, selection: DeadLetterFilter) -> AsyncIterator[list[DeadLetter]]:
        """The selected letters, a batch at a time, each letter once."""
        last: DeadLetter | None = None
        while batch := await self.page(selection, BATCH, last):
            yield batch
            last = batch[-1]

    async def replay(self, selection: DeadLetterFilter) -> int:
        """Send the selected letters back to their stage; how many. A letter with no
        envelope (an unpublishable row's) can only be purged: it stays."""
        if self._broker is None:
            raise RuntimeError("replaying needs a broker")
        done: set[tuple[str, str]] = set()
        async for batch in self._every(selection):
            for letter in batch:
                # One that died again after its replay is met again further on: once is all.
                if (letter.stage, letter.id) in done or not replayable(letter.body):
                    continue
                await self._republish(self._broker, letter)
                await self._store.forget_dead_letters([letter])
                done.add((letter.stage, letter.id))
        return len(done)

    async def purge(self, selection: DeadLetterFilter) -> int:
        """Delete the selected letters for good; how many."""
        purged = 0
        async for batch in self._every(selection):
            purged += await self._store.forget_dead_letters(batch)
        return purged

    @staticmethod
    async def _republish(broker: Broker, letter: DeadLetter) -> None:
        body = dict(letter.body)
        if letter.stage == "outbound":
            # A fresh start: attempts and the age limit count from the replay.
            body["attempt"] = 0
            body["createdAt"] = utcnow().isoformat()
        await broker.publish(
            letter.stage, letter.conversation_id, json.dumps(body).encode(), message_id=letter.id
        )


async def settle(
    store: DeadLetterStore, broker: Broker | None, selection: DeadLetterSelection, replay: bool
) -> int:
    """Replay or purge the selected dead letters; how many (the CLI's path, too)."""
    letters = DeadLetters(store, broker)
    chosen = selection_of(selection)
    return await (letters.replay(chosen) if replay else letters.purge(chosen))
