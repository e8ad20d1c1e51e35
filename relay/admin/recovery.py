"""Recovering an integration: every response given up on since a time, sent again as a first
attempt under its webhook-id, in each conversation's order; then their dead letters go.

A crash in between leaves a dead letter whose replay the back end would see under the same
webhook-id again: a duplicate it can drop, never a loss.
"""

from __future__ import annotations

from datetime import datetime
from typing import Protocol

from relay.pipeline.dlq import DeadLetters
from relay.pipeline.replies import ReplyPublisher
from relay.store import DeadLetterFilter, DeadLetterStore
from relay.store.protocols import Recovery
from relay.views import delivery_id


class RecoveryStore(Recovery, DeadLetterStore, Protocol):
    """What a recovery reads (the responses given up on) and clears (their dead letters)."""


async def recover_integration(
    store: RecoveryStore, replies: ReplyPublisher, integration_id: str, since: datetime
) -> int:
    """Send again every response of the integration given up on since `since`; how many
    were sent (a response that can never be published is not)."""
    records = await store.given_up_since(integration_id, since)
    sent: set[str] = set()
    try:
        for record in records:
            if await replies.send_again(record):
                sent.add(delivery_id(record.id))
    finally:
        # What was sent again leaves the dead letters, even if the broker went away
        # before the end (the rest stay, to be recovered again).
        if sent:
            chosen = DeadLetterFilter("outbound", integration_id, ids=frozenset(sent))
            await DeadLetters(store).purge(chosen)
    return len(sent)
