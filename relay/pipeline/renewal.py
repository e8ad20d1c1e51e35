"""Giving messages back without wearing them out.

A quorum queue counts every return towards its delivery limit, on RabbitMQ 3.10 and 4 alike
(`relay.broker.version`), and dead-letters a message past it. Relay gives messages back on
purpose when a worker stops or hands a partition over: those that waited unstarted go back
with the channel. A healthy message met by enough of those (a fleet scaling up and down)
would be dead-lettered for nothing. So a message given back on purpose that has used half
its deliveries is renewed instead: published again to its own partition queue, with a
confirm, then acked, which starts its count afresh. It goes to the queue's tail: its
conversation's order is kept by the stage's numbers (a later message that meets the worker
first sends it to the store, which lets the renewed one lead). What a crash gives back (a
lost connection, a kill -9) is not renewed: that is what the limit is for.
"""

from __future__ import annotations

from collections.abc import Sequence

import structlog
from aio_pika.abc import AbstractIncomingMessage

from relay.broker import BROKER_ERRORS, Broker, StageName
from relay.broker.topology import Topology

log = structlog.get_logger(__name__)

# What a quorum queue tells a consumer: how many times the message was delivered before.
DELIVERY_COUNT_HEADER = "x-delivery-count"


def worn(message: AbstractIncomingMessage, limit: int) -> bool:
    """Whether the message has used half of its deliveries or more."""
    count = (message.headers or {}).get(DELIVERY_COUNT_HEADER)
    return isinstance(count, int) and count >= max(1, limit // 2)


def _kept_headers(message: AbstractIncomingMessage) -> dict[str, str | int]:
    """Relay's own headers (the broker's are its account of this copy, not of the next)."""
    return {
        name: value
        for name, value in (message.headers or {}).items()
        if not name.startswith("x-") or name.startswith("x-relay-")
        if isinstance(value, str | int) and not isinstance(value, bool)
    }


async def renew_worn(
    broker: Broker,
    topology: Topology,
    stage: StageName,
    partition: int,
    messages: Sequence[AbstractIncomingMessage],
) -> list[AbstractIncomingMessage]:
    """Renew the worn messages among those about to be given back; the others (to go back
    with the channel, as before: also a worn one whose renewal failed)."""
    returned: list[AbstractIncomingMessage] = []
    renewed = 0
    for message in messages:
        if not worn(message, topology.delivery_limit):
            returned.append(message)
            continue
        try:
            await broker.publish_to(
                topology.exchange(stage),
                topology.routing_key(partition),
                message.body,
                message_id=message.message_id or "",
                headers=_kept_headers(message),
            )
            await message.ack()
            renewed += 1
        except BROKER_ERRORS as error:
            # The copy may be there as well as the original: each stage takes a message
            # twice safely (it is its id that counts).
            log.warning("message_renewal_failed", message_id=message.message_id, error=str(error))
            returned.append(message)
    if renewed:
        log.info("messages_renewed", stage=stage, partition=partition, renewed=renewed)
    return returned
