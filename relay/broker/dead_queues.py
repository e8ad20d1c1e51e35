"""The dead-letter queues: declared with no delivery limit, in the words of the broker's
version (`relay.broker.version`).

On RabbitMQ 4 a quorum queue that names no delivery limit gets one of 20, and a message
returned past it, with nowhere to dead-letter to, is dropped. A queue's arguments cannot
change once it exists: a dead-letter queue that an earlier Relay declared on RabbitMQ 4
(or on 3.x before an upgrade to 4) keeps that default. It is taken as it is, and reported
(`relay queues`, `/readyz`): the keeper takes each letter off it at once, so only a keeper
that dies holding a letter twenty times over loses it; docs/operating/versions.md gives the
policy that lifts the limit (`delivery-limit: -1`), or the queue can be deleted once empty
(the next start declares it anew).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import aiormq.abc
import aiormq.exceptions
import structlog
from aio_pika.abc import AbstractChannel, AbstractExchange

from relay.broker.channels import close_channel
from relay.broker.errors import CONNECTION_ERRORS
from relay.broker.version import BrokerVersion

log = structlog.get_logger(__name__)


def dead_arguments(base: dict[str, Any], version: BrokerVersion) -> dict[str, Any]:
    """A dead-letter queue's arguments (`base`, and no delivery limit): nothing it holds
    is ever dropped."""
    return {**base, **version.no_delivery_limit()}


async def declare_dead_queue(
    channel: AbstractChannel,
    name: str,
    exchange: AbstractExchange,
    routing_key: str,
    arguments: dict[str, Any],
) -> bool:
    """Declare the dead-letter queue `name` (with `arguments`: `dead_arguments`) bound to
    `exchange`; False if it exists declared otherwise (taken as it is)."""
    meant = await declared_as_meant(channel, name, arguments)
    if meant:
        queue = await channel.declare_queue(name, durable=True, arguments=arguments)
    else:
        log.warning(
            "dead_letter_queue_declared_otherwise",
            queue=name,
            meant=arguments,
            advice="see docs/operating/versions.md: queues declared by older versions",
        )
        queue = await channel.declare_queue(name, passive=True)
    await queue.bind(exchange, routing_key=routing_key)
    return meant


async def declared_as_meant(channel: AbstractChannel, name: str, arguments: dict[str, Any]) -> bool:
    """Whether the queue is (or now is) declared with `arguments`, asked on a channel of its
    own: the broker closes the channel of a refused declaration."""
    async with probe(channel) as probing:
        try:
            await probing.queue_declare(name, durable=True, arguments=arguments)
        except aiormq.exceptions.ChannelPreconditionFailed as error:
            if "x-delivery-limit" not in str(error) and "x-queue-leader-locator" not in str(error):
                raise
            return False
    return True


@contextlib.asynccontextmanager
async def probe(channel: AbstractChannel) -> AsyncIterator[aiormq.abc.AbstractChannel]:
    """A channel of its own on `channel`'s connection, for a declaration the broker may
    refuse (a refusal closes the channel it came on, which `channel` is spared); closed
    after, whatever the broker did with it."""
    underlay = await channel.get_underlay_channel()
    probing = await underlay.connection.channel()
    try:
        yield probing
    finally:
        with contextlib.suppress(*CONNECTION_ERRORS):
            # Shielded: a stop cancels the broker's connect task here, and a cancelled
            # close would break the connection (`close_channel`).
            await close_channel(probing)
