"""Who in this ingress waits for news of which conversation or integration.

A `?wait` POST or an event stream registers before it first reads the store, then sleeps
on its event; the news feed (`relay.broker.news`) wakes those of the conversations and
integrations a notice names, and everyone after a gap in the feed or at stop. The event
is a flag, not a count: news arriving while its owner reads is one more read, never lost.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict
from collections.abc import Iterator

from relay.broker.news import News


class Watch:
    """One waiter's flag, and whether the ingress is stopping."""

    def __init__(self, watchers: Watchers) -> None:
        self._event = asyncio.Event()
        self._watchers = watchers

    @property
    def stopping(self) -> bool:
        """The ingress stops: end the wait or stream now."""
        return self._watchers.stopping

    def wake(self) -> None:
        self._event.set()

    async def news(self, within: float) -> bool:
        """Wait for news up to `within` seconds; whether there was any (the flag is taken)."""
        try:
            async with asyncio.timeout(max(within, 0)):
                await self._event.wait()
        except TimeoutError:
            return False
        self._event.clear()
        return True


class Watchers:
    """The waiters of one ingress, by conversation and by integration."""

    def __init__(self) -> None:
        self._by_conversation: defaultdict[str, set[Watch]] = defaultdict(set)
        self._by_integration: defaultdict[str, set[Watch]] = defaultdict(set)
        self.stopping = False

    def __len__(self) -> int:
        return sum(map(len, self._by_conversation.values())) + sum(
            map(len, self._by_integration.values())
        )

    @contextlib.contextmanager
    def conversation(self, conversation_id: str) -> Iterator[Watch]:
        """Wait for news of one conversation while in scope."""
        with _registered(self._by_conversation, conversation_id, Watch(self)) as watch:
            yield watch

    @contextlib.contextmanager
    def integration(self, integration_id: str) -> Iterator[Watch]:
        """Wait for news of every conversation of an integration while in scope."""
        with _registered(self._by_integration, integration_id, Watch(self)) as watch:
            yield watch

    def heard(self, news: list[News]) -> None:
        """A notice: wake whoever waits on its conversations or their integrations."""
        for integration_id, conversation_id in news:
            for watch in self._by_conversation.get(conversation_id, ()):
                watch.wake()
            for watch in self._by_integration.get(integration_id, ()):
                watch.wake()

    def wake_all(self) -> None:
        """Notices may have been missed (or the ingress stops): everyone reads again."""
        for group in (self._by_conversation, self._by_integration):
            for watches in group.values():
                for watch in watches:
                    watch.wake()

    def stop(self) -> None:
        """End every wait and stream (they answer what they have, or close)."""
        self.stopping = True
        self.wake_all()


@contextlib.contextmanager
def _registered(group: defaultdict[str, set[Watch]], key: str, watch: Watch) -> Iterator[Watch]:
    group[key].add(watch)
    try:
        yield watch
    finally:
        group[key].discard(watch)
        if not group[key]:
            del group[key]
