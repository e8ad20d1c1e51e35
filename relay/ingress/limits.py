"""Counted slots per key, each key capped: the fair shares of one ingress.

An event stream holds a slot of the ingress's pool, of its integration's and of its
credential's while it runs; a `?wait` request one of the ingress's and of its
integration's. `take_all` takes a slot of every pool or of none, in one step (no await
between the look and the take), so two requests never both get the last slot. A key
holds memory only while it holds a slot.

These stay in the process, unlike an integration's rate limit (`relay.ingress.ratelimit`,
counted in the store across ingresses): what they share out, open streams and waiting
requests, is this ingress's own connections and memory.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import NamedTuple


class Slots:
    """At most `cap` slots held at once per key; `name` says which limit it is (the
    setting that sets it, as errors and metrics name it)."""

    def __init__(self, name: str, cap: int) -> None:
        self.name = name
        self.cap = cap
        self._held: dict[str, int] = {}

    def held(self, key: str) -> int:
        """Slots `key` holds now."""
        return self._held.get(key, 0)

    def total(self) -> int:
        """Slots held now, every key together."""
        return sum(self._held.values())

    def full(self, key: str) -> bool:
        """Whether `key` holds all its slots."""
        return self.held(key) >= self.cap

    def _take(self, key: str) -> None:
        self._held[key] = self.held(key) + 1

    def _give_back(self, key: str) -> None:
        left = self.held(key) - 1
        if left > 0:
            self._held[key] = left
        else:
            self._held.pop(key, None)


class Claim(NamedTuple):
    """A slot wanted of `slots` under `key`."""

    slots: Slots
    key: str


@contextlib.contextmanager
def take_all(claims: Sequence[Claim]) -> Iterator[Slots | None]:
    """Hold a slot of every claim while in scope and yield None; or, if one is full, hold
    none and yield the first full one (claims come narrowest first, so the limit named
    is the one the caller can do something about)."""
    full = next((claim.slots for claim in claims if claim.slots.full(claim.key)), None)
    if full is not None:
        yield full
        return
    for claim in claims:
        claim.slots._take(claim.key)
    try:
        yield None
    finally:
        for claim in claims:
            claim.slots._give_back(claim.key)
