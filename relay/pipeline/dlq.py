"""Dead letters: list them, replay them, purge them.

Listing takes every message of a dead-letter queue without acking and then closes the
channel, which puts them all back: the queue is unchanged. Replaying publishes the message
back to its stage with confirms (outbound: attempts reset, same delivery id and so the same
`webhook-id`) and only then acks the dead copy, so nothing is lost in between.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aio_pika.abc import AbstractChannel, AbstractIncomingMessage

from relay.broker import Broker, StageName, partition_of
from relay.wire import (
    ATTEMPT_HEADER,
    ATTEMPTS_HEADER,
    DEAD_AT_HEADER,
    LAST_STATUS_HEADER,
    REASON_HEADER,
    utcnow,
)


@dataclass(frozen=True)
class DeadLetter:
    """A dead message, as `relay dlq list` shows it."""

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


class DeadLetters:
    """The dead-letter queue of one stage, through a connected broker."""

    def __init__(self, broker: Broker, stage: StageName) -> None:
        self._broker = broker
        self._stage = stage

    async def _take_all(self, channel: AbstractChannel) -> list[AbstractIncomingMessage]:
        # Dead-letter queues have no single active consumer, so basic.get works; messages
        # held by another listing are simply not seen this time.
        queue = await channel.declare_queue(
            self._broker.topology.dead_queue(self._stage), passive=True
        )
        taken: list[AbstractIncomingMessage] = []
        while (message := await queue.get(no_ack=False, fail=False)) is not None:
            taken.append(message)
        return taken

    async def _channel(self) -> AbstractChannel:
        connection = self._broker.connection
        if connection is None:
            raise RuntimeError("not connected to the broker")
        return await connection.channel()

    async def list(self, select: Select) -> list[DeadLetter]:
        """The selected dead letters; the queue is left as it was."""
        channel = await self._channel()
        try:
            return [d for m in await self._take_all(channel) if select(d := read(self._stage, m))]
        finally:
            await channel.close()  # returns every message taken, unacked

    async def replay(self, select: Select) -> int:
        """Send the selected dead letters back to their stage; how many."""
        return await self._settle(select, republish=True)

    async def purge(self, select: Select) -> int:
        """Delete the selected dead letters for good; how many."""
        return await self._settle(select, republish=False)

    async def _settle(self, select: Select, republish: bool) -> int:
        channel = await self._channel()
        done = 0
        try:
            for message in await self._take_all(channel):
                letter = read(self._stage, message)
                if not select(letter):
                    continue
                if republish:
                    await self._republish(letter)
                await message.ack()
                done += 1
        finally:
            await channel.close()
        return done

    async def _republish(self, letter: DeadLetter) -> None:
        body = dict(letter.body)
        if self._stage == "outbound":
            # A fresh start: attempts and the age limit count from the replay.
            body["attempt"] = 0
            body["createdAt"] = utcnow().isoformat()
        partition = partition_of(letter.conversation_id, self._broker.topology.partitions)
        await self._broker.publish(
            self._stage, partition, json.dumps(body).encode(), message_id=letter.id
        )
