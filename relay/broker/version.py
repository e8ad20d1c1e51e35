"""The broker's version, and what it changes in the queues Relay declares.

Measured (tests/test_dead_letters.py), on RabbitMQ 3.10 and 4.0 alike: a quorum queue
counts every return towards its delivery limit (a nack or reject with requeue, and the
messages a closed channel held). What differs is the limit a queue gets when it names none,
and how "no limit" is said:

- 3.10: no argument is no limit; `x-delivery-limit: -1` dead-letters at the first return.
- 4.x: no argument is a limit of 20, past which a message with nowhere to dead-letter to is
  dropped; `-1` is no limit.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from aio_pika.abc import AbstractChannel


@dataclass(frozen=True)
class BrokerVersion:
    """What the broker said it is when the connection opened (`server_properties`)."""

    product: str
    text: str  # e.g. "4.0.5"

    @property
    def major(self) -> int:
        found = re.match(r"\d+", self.text)
        return int(found.group()) if found else 0

    def no_delivery_limit(self) -> dict[str, Any]:
        """The arguments of a quorum queue whose messages are never dropped for being
        returned too often (its dead-letter queue, a delay queue)."""
        return {"x-delivery-limit": -1} if self.major >= 4 else {}

    def __str__(self) -> str:
        return f"{self.product} {self.text}"


async def version_of(channel: AbstractChannel) -> BrokerVersion:
    """The version of the broker a channel is open on."""
    underlay = await channel.get_underlay_channel()
    properties = underlay.connection.server_properties
    return BrokerVersion(str(properties.get("product", "")), str(properties.get("version", "")))
