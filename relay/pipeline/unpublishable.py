"""What can never be published: a stored message whose envelope cannot be made.

The input contract (`relay.wire.contract`) keeps such rows from being written, but a row
written by an older Relay, or edited by hand, may still hold a payload no serializer takes.
Retrying it would fail the same way for ever and hold up every row behind it (the outbox
sweeps oldest first), so it is ended instead: marked dead in the store (no conversation
waits behind it) and put in its stage's dead-letter queue with the reason, where
`relay dlq list` and the console show it. Its letter holds the message's ids, not the
envelope that could not be made, so it can be listed and purged but not replayed.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import structlog
from pydantic import BaseModel

from relay.broker import Broker, StageName
from relay.metrics import Metrics
from relay.pipeline.settle import dead_letter
from relay.store.protocols import Queued
from relay.wire import dump_json, utcnow

log = structlog.get_logger(__name__)

KIND_SUFFIX = ".unpublishable"  # the `kind` of a letter that holds ids, not an envelope


class Unpublishable(Exception):
    """A message that can never be published as it is; the text says why."""


def envelope_bytes(build: Callable[[], BaseModel]) -> bytes:
    """The JSON of the envelope `build` makes, or Unpublishable saying why it cannot be made
    (not the broker's failure: trying again would fail the same way)."""
    try:
        return dump_json(build())
    except (ValueError, TypeError, RecursionError) as error:
        # pydantic's errors are ValueErrors; too deep a payload is a RecursionError or a
        # serialization error, depending on how deep.
        raise Unpublishable(f"{type(error).__name__}: {str(error)[:300]}") from error


def replayable(body: dict[str, Any]) -> bool:
    """False for a letter of a message that could not be published: it has no envelope."""
    return not str(body.get("kind", "")).endswith(KIND_SUFFIX)


class Burial:
    """Ends unpublishable messages of one stage: dead in the store, then in the dead-letter
    queue (a broker failure leaves the row as it was, for the next sweep)."""

    def __init__(self, store: Queued, broker: Broker, metrics: Metrics, stage: StageName):
        self._store = store
        self._broker = broker
        self._metrics = metrics
        self._stage = stage

    async def bury(self, row_id: str, letter_id: str, letter: dict[str, Any], reason: str) -> None:
        """Dead-letter the message as `letter_id` (its id on the stage's queues) with `letter`
        (its ids) and the reason, then mark its row dead."""
        body = json.dumps({**letter, "kind": f"{self._stage}{KIND_SUFFIX}"}).encode()
        await dead_letter(
            self._broker, self._stage, body, letter_id, f"could not be published: {reason}"
        )
        await self._store.end_unpublished(row_id, utcnow())
        self._metrics.unpublishable.labels(self._stage).inc()
        log.error("message_unpublishable", stage=self._stage, message_id=row_id, reason=reason)
