"""Dead letters: list them, replay them, purge them.

Listing takes every message of a dead-letter queue without acking and then closes the
channel, which puts them all back: the queue is unchanged. Replaying publishes the message
back to its stage with confirms (outbound: attempts reset, same delivery id and so the same
`webhook-id`) and only then acks the dead copy, so nothing is lost in between.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from aio_pika.abc import AbstractChannel, AbstractIncomingMessage

from relay.broker import STAGES, Broker, BrokerUnavailable, StageName
from relay.pipeline.unpublishable import replayable
from relay.wire import (
    ATTEMPT_HEADER,
    ATTEMPTS_HEADER,
    DEAD_AT_HEADER,
    LAST_STATUS_HEADER,
    REASON_HEADER,
    utcnow,
)
from relay.wire.admin import DeadLetterSelection


@dataclass(frozen=True)
class DeadLetter:
    """A dead message, as `relay dlq list` and the admin API show it."""

    id: str
    stage: StageName
    integration_id: str
    conversation_id: str
    reason: str
    attempts: int
    last_status: int | None
    dead_at: int | None
    body: dict[str, Any]

    def view(self) -> dict[str, Any]:
        """JSON for `--json`."""
        return {
            "id": self.id,
            "stage": self.stage,
            "integrationId": self.integration_id,
            "conversationId": self.conversation_id,
            "reason": self.reason,
            "attempts": self.attempts,
            "lastStatus": self.last_status,
            "deadAt": self.dead_at,
            "body": self.body,
        }


def read(stage: StageName, message: AbstractIncomingMessage) -> DeadLetter:
    """The dead letter a message holds."""
    headers = message.headers or {}
    try:
        body = json.loads(message.body)
    except ValueError:
        body = {}
    if stage == "outbound":
        conversation = body.get("body", {}).get("botpressConversationId", "")
    else:
        conversation = body.get("bundle", {}).get("conversation", {}).get("id", "")
    return DeadLetter(
        id=message.message_id or "",
        stage=stage,
        integration_id=body.get("integrationId", ""),
        conversation_id=conversation,
        reason=str(headers.get(REASON_HEADER, "")),
        attempts=_int(headers.get(ATTEMPTS_HEADER, headers.get(ATTEMPT_HEADER))) or 0,
        last_status=_int(headers.get(LAST_STATUS_HEADER)) or None,
        dead_at=_int(headers.get(DEAD_AT_HEADER)),
        body=body,
    )


def _int(value: object) -> int | None:
    return value if isinstance(value, int) else None


Select = Callable[[DeadLetter], bool]
Position = tuple[int, str]  # a listing's order: when a letter died (unix seconds), its id


def position(letter: DeadLetter) -> Position:
    return (letter.dead_at or 0, letter.id)


class DeadLetters:
    """The dead-letter queue of one stage, through a connected broker."""

    def __init__(self, broker: Broker, stage: StageName) -> None:
        self._broker = broker
        self._stage = stage

    async def _taken(self, channel: AbstractChannel) -> AsyncIterator[AbstractIncomingMessage]:
        """Every message of the queue, one at a time, unacked (closing the channel returns
        those not acked). Only the one in hand is held here: a long queue is never all in
        memory."""
        # Dead-letter queues have no single active consumer, so basic.get works; messages
        # held by another listing are simply not seen this time.
        queue = await channel.declare_queue(
            self._broker.topology.dead_queue(self._stage), passive=True
        )
        while (message := await queue.get(no_ack=False, fail=False)) is not None:
            yield message

    async def _channel(self) -> AbstractChannel:
        connection = self._broker.connection
        if connection is None or connection.is_closed:
            raise BrokerUnavailable("not connected to the broker")
        return await connection.channel()

    async def page(self, select: Select, after: Position | None, limit: int) -> list[DeadLetter]:
        """The first `limit` selected dead letters after `after`, in the order they died
        (then by id); the queue is left as it was. Keeps at most twice a page in memory."""
        kept: list[DeadLetter] = []
        channel = await self._channel()
        try:
            async for message in self._taken(channel):
                letter = read(self._stage, message)
                if select(letter) and (after is None or position(letter) > after):
                    kept.append(letter)
                    if len(kept) >= 2 * limit:
                        kept = sorted(kept, key=position)[:limit]
        finally:
            await channel.close()  # returns every message taken, unacked
        return sorted(kept, key=position)[:limit]

    async def first(self) -> DeadLetter | None:
        """The letter at the head of the queue, the first to have died (left in place)."""
        channel = await self._channel()
        try:
            async for message in self._taken(channel):
                return read(self._stage, message)
            return None
        finally:
            await channel.close()

    async def replay(self, select: Select) -> int:
        """Send the selected dead letters back to their stage; how many."""
        return await self._settle(select, republish=True)

    async def purge(self, select: Select) -> int:
        """Delete the selected dead letters for good; how many."""
        return await self._settle(select, republish=False)

    async def _settle(self, select: Select, republish: bool) -> int:
        channel = await self._channel()
        done: set[str] = set()
        try:
            async for message in self._taken(channel):
                letter = read(self._stage, message)
                if letter.id in done:
                    # Replayed and dead again already, at the queue's tail: everything that
                    # was there before has been met.
                    break
                if not select(letter) or (republish and not replayable(letter.body)):
                    continue  # a letter with no envelope can only be purged
                if republish:
                    await self._republish(letter)
                await message.ack()
                done.add(letter.id)
        finally:
            await channel.close()
        return len(done)

    async def _republish(self, letter: DeadLetter) -> None:
        body = dict(letter.body)
        if self._stage == "outbound":
            # A fresh start: attempts and the age limit count from the replay.
            body["attempt"] = 0
            body["createdAt"] = utcnow().isoformat()
        await self._broker.publish(
            self._stage, letter.conversation_id, json.dumps(body).encode(), message_id=letter.id
        )


def matching(
    integration_id: str | None, conversation_id: str | None, ids: set[str] | None = None
) -> Select:
    """The letters of that integration, conversation and ids (None: any)."""

    def select(letter: DeadLetter) -> bool:
        return (
            (integration_id is None or letter.integration_id == integration_id)
            and (conversation_id is None or letter.conversation_id == conversation_id)
            and (ids is None or letter.id in ids)
        )

    return select


def stages_of(stage: StageName | None) -> list[StageName]:
    """The stages a selection names (None: both)."""
    return list(STAGES) if stage is None else [stage]


async def settle(broker: Broker, selection: DeadLetterSelection, replay: bool) -> int:
    """Replay or purge the selected dead letters; how many (the CLI's path, too)."""
    ids = set(selection.ids) if selection.ids is not None else None
    select = matching(selection.integrationId, selection.conversationId, ids)
    done = 0
    for stage in stages_of(selection.stage):
        letters = DeadLetters(broker, stage)
        done += await (letters.replay(select) if replay else letters.purge(select))
    return done
