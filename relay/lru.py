"""A mapping that keeps at most `size` entries, the least recently used dropped first: the
bounded memories of one process (rows and conversations seen, integrations looked up,
rate-limit buckets, credentials that worked), so that a flood of new keys costs bounded
memory and what is in use stays."""

from __future__ import annotations

from collections import OrderedDict
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class Lru(Generic[K, V]):
    """At most `size` entries; reading one (`get`) or writing it makes it the most recent."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._entries: OrderedDict[K, V] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def get(self, key: K) -> V | None:
        """The entry of `key` (None if there is none), now the most recent."""
        if key not in self._entries:
            return None
        self._entries.move_to_end(key)
        return self._entries[key]

    def put(self, key: K, value: V) -> None:
        """Set the entry of `key`, the most recent; the least recent goes past `size`."""
        self._entries[key] = value
        self._entries.move_to_end(key)
        while len(self._entries) > self._size:
            self._entries.popitem(last=False)

    def pop(self, key: K) -> None:
        """Forget `key`, if it is there."""
        self._entries.pop(key, None)
