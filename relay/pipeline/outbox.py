"""The outbox: what a crashed process stored but never saw confirmed by the broker,
published again.

Two kinds are left `pending` by a crash between the store's commit and the broker's
confirm: inbound messages (the acceptor's lease runs out: `relay.ingress.inbound_outbox`
claims and publishes them under the same relay id) and bot responses
(`relay.pipeline.replies`). One loop sweeps each; the ingress runs them. A message published
twice is deduplicated downstream (the same relay id, the same `webhook-id`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Protocol

import structlog

from relay.aio import cancelled_from_outside, pause
from relay.broker import BrokerUnavailable
from relay.pipeline.replies import ReplyPublisher
from relay.store import Outgoing, StoreError
from relay.store.records import Unreadable
from relay.wire import utcnow

log = structlog.get_logger(__name__)


class InboundSweep(Protocol):
    """The inbound outbox: publishes pending messages whose lease ran out."""

    async def sweep_outbox(self, limit: int = 100) -> int:
        """Publish pending messages whose lease ran out; how many were queued."""


Sweep = Callable[[], Awaitable[object]]


async def sweep_forever(
    inbound: InboundSweep, replies: ReplyPublisher, store: Outgoing, lease: float, interval: float
) -> None:
    """Publish what a crashed process left pending: inbound messages (see
    `relay.ingress.inbound_outbox`) and responses stored but never confirmed by the broker.

    The two sweeps run side by side, each in its own loop: one that fails or hangs never
    holds up the other."""
    sweeps: list[tuple[str, Sweep]] = [
        ("inbound", lambda: inbound.sweep_outbox()),
        ("outbound", lambda: _sweep_responses(replies, store, lease)),
    ]
    async with asyncio.TaskGroup() as group:
        for stage, sweep in sweeps:
            group.create_task(_sweep_loop(stage, sweep, lease, interval))


async def _sweep_loop(stage: str, sweep: Sweep, lease: float, interval: float) -> None:
    while True:
        await pause(interval)
        try:
            # Bounded: one sweep stuck on a dependency must not end the sweeping.
            async with asyncio.timeout(max(lease, 30.0)):
                await sweep()
        except (BrokerUnavailable, StoreError, OSError) as error:
            log.warning(
                "outbox_sweep_failed", stage=stage, error=f"{type(error).__name__}: {error}"
            )
        except asyncio.CancelledError:
            if cancelled_from_outside():
                raise
            log.error("outbox_sweep_failed", stage=stage, error="cancelled under the sweep")
        except Exception:
            log.exception("outbox_sweep_failed", stage=stage)


async def _sweep_responses(replies: ReplyPublisher, store: Outgoing, lease: float) -> None:
    now = utcnow()
    claimed = await store.claim_stale_outgoing(
        now - timedelta(seconds=lease), now, now + timedelta(seconds=lease), 100
    )
    stale = []
    for row in claimed:
        if isinstance(row, Unreadable):
            await replies.bury_unreadable(row)
        else:
            stale.append(row)
    # A response published twice carries the same webhook-id: receivers deduplicate.
    await replies.publish(stale)
