"""Retention: a prune run under the store's lease, by the worker services' janitor
(`relay.service.janitor`, every RELAY_PRUNE_INTERVAL) or by hand (`relay prune --older-than
7d`, `relay.commands.prune`).

What goes and what stays is the store's (`relay.store.sql.retention`); here: the lease
that keeps one process at a time at it, and the ages people type.
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
import uuid
from datetime import datetime, timedelta

import structlog

from relay.store import Pruned, Retention
from relay.wire import utcnow

log = structlog.get_logger(__name__)

PRUNE_LEASE = "prune"  # held by whoever prunes, a janitor or `relay prune`
BATCH = 500  # rows per statement: each a short transaction of its own
# A pruner renews its lease before each batch: one that stopped answering frees it soon.
LEASE_SECONDS = 300.0

_UNITS = {"m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_AGE = re.compile(r"(\d+(?:\.\d+)?)([mhdw])")


def parse_age(text: str) -> timedelta:
    """`90m`, `12h`, `7d` or `2w` as a duration; ValueError for anything else."""
    match = _AGE.fullmatch(text.strip())
    if match is None or float(match[1]) <= 0:
        raise ValueError(f"not an age: {text!r} (try 90m, 12h, 7d or 2w)")
    return timedelta(seconds=float(match[1]) * _UNITS[match[2]])


def holder_name() -> str:
    """Who holds a lease, as its row and the logs say: host, process, and a nonce."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class Lease:
    """A named lease in the store, held by this process: taken (or renewed) for `seconds`
    at a time, with one statement that succeeds only if it is free, expired or ours."""

    def __init__(self, store: Retention, name: str, seconds: float) -> None:
        self._store = store
        self.name = name
        self.holder = holder_name()
        self._seconds = seconds

    async def take(self) -> bool:
        """Take or renew the lease; whether this process holds it now."""
        now = utcnow()
        return await self._store.take_lease(
            self.name, self.holder, now + timedelta(seconds=self._seconds), now
        )

    async def release(self) -> None:
        """Let it go (shielded: a cancelled caller still frees it for the others)."""
        await asyncio.shield(self._store.release_lease(self.name, self.holder))


async def prune(
    store: Retention, lease: Lease, cutoff: datetime, full_vacuum_limit: int | None
) -> tuple[Pruned, int]:
    """Delete what is settled and older than `cutoff` while `lease` (held by the caller)
    stays ours, then give SQLite's freed space back; what went, and the bytes given back."""
    pruned = await store.prune(cutoff, BATCH, lease.take)
    if not pruned.complete:
        log.warning("prune_lease_lost", lease=lease.name, **pruned.counts)
    reclaimed = await store.reclaim_space(full_vacuum_limit)
    log.info("pruned", cutoff=cutoff.isoformat(), reclaimed_bytes=reclaimed, **pruned.counts)
    return pruned, reclaimed
