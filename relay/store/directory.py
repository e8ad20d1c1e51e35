"""Integrations and their token hashes, cached for a few seconds per process.

Every ingress request needs both, and every delivery its integration; the cache keeps the
store off the hot path. A revoked token or a new integration takes effect within
`auth_cache_seconds`.

Memory is bounded: at most `size` known integrations (per token kind), least recently used
first out, and as many ids found unknown, kept apart so that a flood of made-up ids never
pushes out the integrations in use. An id asked for again and again while unknown costs
one query per `auth_cache_seconds`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from relay.lru import Lru
from relay.store.protocols import IntegrationLookup
from relay.store.records import IntegrationRecord, TokenKind

DEFAULT_SIZE = 10_000

Key = tuple[str, TokenKind]


@dataclass(frozen=True)
class Entry:
    """An integration (None when unknown) and the hashes of its active tokens of one kind."""

    integration: IntegrationRecord | None
    token_hashes: list[str]
    expires: float


class Directory:
    """Looks up integrations and token hashes through a short-lived, bounded cache."""

    def __init__(
        self,
        store: IntegrationLookup,
        ttl: float,
        size: int = DEFAULT_SIZE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self._ttl = ttl
        self._clock = clock
        self._known: Lru[Key, Entry] = Lru(size)
        self._unknown: Lru[Key, Entry] = Lru(size)

    def __len__(self) -> int:
        """Entries held, known and unknown."""
        return len(self._known) + len(self._unknown)

    async def lookup(self, integration_id: str, kind: TokenKind) -> Entry:
        """The integration with its active token hashes of `kind`."""
        key = (integration_id, kind)
        now = self._clock()
        entry = self._known.get(key) or self._unknown.get(key)
        if entry is not None and entry.expires > now:
            return entry
        integration = await self._store.get_integration(integration_id)
        hashes = await self._store.active_token_hashes(integration_id, kind) if integration else []
        entry = Entry(integration, hashes, now + self._ttl)
        if self._ttl > 0:
            self._remember(key, entry)
        return entry

    def _remember(self, key: Key, entry: Entry) -> None:
        into, out_of = (
            (self._known, self._unknown) if entry.integration else (self._unknown, self._known)
        )
        into.put(key, entry)
        out_of.pop(key)
