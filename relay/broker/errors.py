"""What the broker's client libraries raise when the broker is away or refuses."""

from __future__ import annotations

import aio_pika
import aiormq.exceptions

# What a publish or a declare raises when the broker is away or refuses the message.
BROKER_ERRORS: tuple[type[BaseException], ...] = (
    aiormq.exceptions.AMQPError,
    aiormq.exceptions.ChannelInvalidStateError,
    aio_pika.exceptions.AMQPException,
    ConnectionError,
    TimeoutError,
)

# Those, and aiormq's bare RuntimeError for a connection that closed meanwhile.
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (*BROKER_ERRORS, RuntimeError)
