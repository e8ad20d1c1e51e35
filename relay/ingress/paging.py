"""History pages bounded in items and in bytes, for the history route and the event streams.

A page ends before the item that would take its encoded items past `max_bytes` (the first
item always comes, however big), and its watermark is that of the last item it holds, so
the reader goes on from there. Items are encoded one by one as they are read, and the
store is asked for `READ_ROWS` rows at a time and about the bytes still free: a page of a
thousand small items costs a few reads, one of big items never more than a page of text.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from relay.store import History, HistoryRow, Watermark

READ_ROWS = 100  # rows asked of the store at a time

Scope = tuple[Literal["conversation", "integration"], str]
Encode = Callable[[HistoryRow], bytes]


@dataclass(frozen=True)
class EncodedPage:
    """Encoded items after a watermark, and where the next page starts."""

    chunks: list[bytes]
    watermark: Watermark
    # Items may still be joined by earlier ones (a transaction not finished): read again
    # shortly (`relay.store.HistoryPage`).
    held_back: bool = False
    # The page stopped at a bound with items after it: read on at once.
    more: bool = False


@dataclass
class _Filling:
    """The page being filled: its chunks, their bytes, the watermark of the last one."""

    watermark: Watermark
    chunks: list[bytes] = field(default_factory=list)
    size: int = 0

    def fits(self, chunk: bytes, max_bytes: int) -> bool:
        return not self.chunks or self.size + len(chunk) <= max_bytes

    def add(self, row: HistoryRow, chunk: bytes) -> None:
        self.chunks.append(chunk)
        self.size += len(chunk)
        self.watermark = row.watermark


async def read_page(
    store: History,
    scope: Scope,
    after: Watermark | None,
    limit: int,
    max_bytes: int,
    encode: Encode,
) -> EncodedPage:
    """Up to `limit` items of `scope` after `after`, encoded, at most `max_bytes` of them
    (or the first alone)."""
    filling = _Filling(after or Watermark.ORIGIN)
    while True:
        wanted = min(READ_ROWS, limit - len(filling.chunks))
        # The store stops near the bound too: big items past it are not even read out.
        page = await store.history(*scope, after, wanted, max(max_bytes - filling.size, 1))
        for row in page.items:
            chunk = encode(row)
            if not filling.fits(chunk, max_bytes):
                return EncodedPage(filling.chunks, filling.watermark, more=True)
            filling.add(row, chunk)
        after = page.watermark
        if len(filling.chunks) >= limit or not page.more:
            return EncodedPage(filling.chunks, page.watermark, page.held_back, page.more)
