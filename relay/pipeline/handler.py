"""What a stage is to the pipeline: a handler object behind a small protocol.

The pipeline (`relay.pipeline.stage`) knows nothing of bots or webhooks. A stage gives it a
handler that reads its envelope model, names each message's conversation, says what the
store holds unfinished of a conversation, and decides what becomes of one message as data
(a `Verdict`). The bot and delivery workers are such handlers (`workers/`): the pipeline
calls the handler it is given, never up into a subclass.
"""

from __future__ import annotations

from datetime import datetime
from typing import Protocol, TypeVar

import structlog
from aio_pika.abc import AbstractIncomingMessage
from pydantic import BaseModel, ValidationError

from relay.broker import StageName
from relay.pipeline.settle import Verdict
from relay.store import Unfinished

log = structlog.get_logger(__name__)

E = TypeVar("E", bound=BaseModel)  # the stage's envelope model


class StageHandler(Protocol[E]):
    """One stage's work on its messages: `decide` does it; the rest keeps the order."""

    @property
    def stage(self) -> StageName:
        """The stage whose partition queues carry the handler's messages."""
        ...

    @property
    def envelope_type(self) -> type[E]:
        """The versioned model of the stage's messages."""
        ...

    def keys(self, envelope: E) -> tuple[str, str]:
        """(conversation, message) ids of an envelope, for order and parking."""
        ...

    def created_at(self, envelope: E) -> datetime:
        """When the message came into being (its age is watched)."""
        ...

    def sequence(self, envelope: E) -> int | None:
        """The message's number in its conversation, if the stage numbers them without gaps
        (a skipped number sends the worker to the store again), else None."""
        ...

    def parking_key(self, message_id: str) -> str:
        """The parking key (see `keys`) of a stored message."""
        ...

    async def unfinished(self, envelope: E) -> list[Unfinished]:
        """The conversation's messages not finished with (this one among them, unless it
        was), oldest first: asked the first time a worker meets the conversation, to find
        parking left by another worker, or by itself before a restart."""
        ...

    async def unreadable(self, message_id: str) -> None:
        """Note in the store that the message `message_id` (its id on the stage's queues)
        is dead, its envelope unreadable: nothing may wait behind it."""
        ...

    async def decide(self, message: AbstractIncomingMessage, envelope: E) -> Verdict:
        """Do the work for one message and say what becomes of it."""
        ...


def parse(handler: StageHandler[E], message: AbstractIncomingMessage) -> E | None:
    """The envelope, or None (logged) if it is not one: it is then dead-lettered."""
    try:
        return handler.envelope_type.model_validate_json(message.body)
    except ValidationError:
        log.error("invalid_envelope", stage=handler.stage, message_id=message.message_id)
        return None
