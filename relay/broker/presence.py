"""Which workers of a stage are alive: heartbeats on the stage's presence exchange.

RabbitMQ does not say how many consumers wait behind a single active one (a passive
declare counts only the active one), so workers tell each other: each publishes a small
heartbeat to a fanout exchange every `interval` and listens on a queue of its own. A worker
not heard from for three intervals (at least 5 s) is gone; one that stops says so at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import Callable

import aio_pika
import structlog
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractIncomingMessage

from relay.aio import pause
from relay.broker.client import BROKER_ERRORS, CONNECTION_ERRORS, Broker, BrokerUnavailable
from relay.broker.topology import StageName

log = structlog.get_logger(__name__)


class Presence:
    """This worker's heartbeat, and the count of live peers (itself included)."""

    def __init__(
        self,
        broker: Broker,
        stage: StageName,
        interval: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.worker_id = uuid.uuid4().hex[:12]
        self._broker = broker
        self._stage = stage
        self._interval = interval
        # A busy machine delays heartbeats: a peer stays counted at least a few seconds.
        self._horizon = max(3 * interval, 5.0)
        self._clock = clock
        self._seen: dict[str, float] = {}
        self._channel: AbstractChannel | None = None
        self._exchange: AbstractExchange | None = None
        self._task: asyncio.Task[None] | None = None

    def peers(self) -> int:
        """Workers of the stage heard from lately, this one included."""
        horizon = self._clock() - self._horizon
        self._seen = {worker: at for worker, at in self._seen.items() if at >= horizon}
        return len(self._seen.keys() | {self.worker_id})

    def heard(self, worker: str, leaving: bool) -> None:
        """Note a heartbeat (or a goodbye) from `worker`."""
        if leaving:
            self._seen.pop(worker, None)
        else:
            self._seen[worker] = self._clock()

    async def start(self) -> None:
        """Listen to the others and start beating (the broker must be connected)."""
        connection = self._broker.connection
        if connection is None:
            raise BrokerUnavailable("no broker connection")
        topology = self._broker.topology
        self._channel = await connection.channel(publisher_confirms=False)
        self._exchange = await self._channel.get_exchange(
            topology.presence_exchange(self._stage), ensure=False
        )
        queue = await self._channel.declare_queue(
            f"{topology.presence_exchange(self._stage)}.{self.worker_id}",
            exclusive=True,
            auto_delete=True,
            arguments={"x-message-ttl": round(self._horizon * 1000)},
        )
        await queue.bind(self._exchange)
        await queue.consume(self._on_beat, no_ack=True)
        self._task = asyncio.create_task(self._beat_forever(), name=f"presence-{self._stage}")

    async def _on_beat(self, message: AbstractIncomingMessage) -> None:
        try:
            beat = json.loads(message.body)
            self.heard(str(beat["worker"]), bool(beat.get("leaving")))
        except (ValueError, KeyError, TypeError):
            log.warning("presence_beat_invalid", stage=self._stage)

    async def _beat_forever(self) -> None:
        while True:
            try:
                await self._beat(leaving=False)
            except Exception:
                # Silent peers count this worker gone: a beat's failure never ends the beating.
                log.exception("presence_beat_failed", stage=self._stage)
            await pause(self._interval)

    async def _beat(self, leaving: bool) -> None:
        if self._exchange is None:
            return
        body = json.dumps({"worker": self.worker_id, "leaving": leaving}).encode()
        try:
            # A lost heartbeat costs nothing: the next one follows; no confirm, not durable.
            await self._exchange.publish(
                aio_pika.Message(body, expiration=self._horizon), routing_key=""
            )
        except CONNECTION_ERRORS as error:
            log.debug("presence_beat_failed", error=str(error))

    async def stop(self) -> None:
        """Say goodbye, so the others take over at once rather than after a timeout."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._beat(leaving=True)
        if self._channel is not None and not self._channel.is_closed:
            with contextlib.suppress(*BROKER_ERRORS):
                await self._channel.close()
        self._task, self._channel, self._exchange = None, None, None
