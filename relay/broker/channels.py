"""Closing a channel where a stop (a cancel) may come at any moment."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Protocol


class Closable(Protocol):
    """A channel, of aio-pika or of aiormq under it."""

    def close(self) -> Awaitable[object]:
        """Close the channel (Channel.Close, then wait for the broker's Channel.CloseOk)."""


async def close_channel(channel: Closable) -> None:
    """Close `channel`; a cancel meanwhile is raised at once, the close going on unseen.

    aiormq answers a cancel that comes while it waits for Channel.CloseOk by sending
    Channel.Close again. The broker has answered the first and forgotten the channel: it
    takes the second for a frame on a channel never opened and closes the whole connection
    (504 CHANNEL_ERROR "expected 'channel.open'", which aiormq logs at error level). A stop
    cancels whoever is closing a channel at that moment (the broker's connect task closing
    its probe channel, the queue gauges theirs), so the handshake is shielded: it ends on
    its own, or with the connection, which the stop closes next."""
    await asyncio.shield(channel.close())
