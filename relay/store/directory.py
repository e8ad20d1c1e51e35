"""Integrations and their token hashes, cached for a few seconds per process.

Every ingress request needs both, and every delivery its integration; the cache keeps the
store off the hot path. A revoked token or a new integration takes effect within
`auth_cache_seconds`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from relay.store.protocols import IntegrationLookup
from relay.store.records import IntegrationRecord, TokenKind


@dataclass(frozen=True)
class Entry:
    """An integration (None when unknown) and the hashes of its active tokens of one kind."""

    integration: IntegrationRecord | None
    token_hashes: list[str]
    expires: float


class Directory:
    """Looks up integrations and token hashes through a short-lived cache."""

    def __init__(self, store: IntegrationLookup, ttl: float) -> None:
        self._store = store
        self._ttl = ttl
        self._entries: dict[tuple[str, TokenKind], Entry] = {}

    async def lookup(self, integration_id: str, kind: TokenKind) -> Entry:
        """The integration with its active token hashes of `kind`."""
        key = (integration_id, kind)
        entry = self._entries.get(key)
        now = time.monotonic()
        if entry is not None and entry.expires > now:
            return entry
        integration = await self._store.get_integration(integration_id)
        hashes = await self._store.active_token_hashes(integration_id, kind) if integration else []
        entry = Entry(integration, hashes, now + self._ttl)
        if self._ttl > 0:
            if len(self._entries) > 10_000:
                self._entries.clear()  # bound memory against floods of random ids
            self._entries[key] = entry
        return entry
