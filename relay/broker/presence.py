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

from relay.aio import cancel_and_wait, pause
from relay.broker.client import Broker, BrokerUnavailable
from relay.broker.errors import BROKER_ERRORS, CONNECTION_ERRORS
from relay.broker.topology import STAGES, StageName, Topology
from relay.retry import keep_trying

log = structlog.get_logger(__name__)


class Presence:
    """This worker's heartbeat, and the count of live peers (itself included)."""

    def __init__(
        self,
        broker: Broker,
        stage: StageName,
        interval: float,
        topology: Topology | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.worker_id = uuid.uuid4().hex[:12]
        self._broker = broker
        # Workers of each partition count share theirs among themselves.
        self._topology = topology
        self._stage = stage
        self._interval = interval
        # A busy machine delays heartbeats: a peer stays counted at least a few seconds.
        self._horizon = max(3 * interval, 5.0)
        self._clock = clock
        self._seen: dict[str, float] = {}
        # What this worker last said of its partition queues' oldest waiting message.
        self._ages: dict[str, float] = {}
        self._channel: AbstractChannel | None = None
        self._exchange: AbstractExchange | None = None
        self._task: asyncio.Task[None] | None = None

    def peers(self) -> int:
        """Workers of the stage heard from lately, this one included."""
        horizon = self._clock() - self._horizon
        self._seen = {worker: at for worker, at in self._seen.items() if at >= horizon}
        return len(self._seen.keys() | {self.worker_id})

    def report(self, ages: dict[str, float]) -> None:
        """The seconds the oldest message not yet started has waited, by queue, told to
        whoever listens with the next heartbeats (`QueueAges`: `GET /admin/v1/queues`)."""
        self._ages = ages

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
        topology = self._topology or self._broker.topology
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
        beat = {"worker": self.worker_id, "leaving": leaving, "ages": self._ages}
        body = json.dumps(beat).encode()
        try:
            # A lost heartbeat costs nothing: the next one follows; no confirm, not durable.
            await self._exchange.publish(
                aio_pika.Message(body, expiration=self._horizon), routing_key=""
            )
        except CONNECTION_ERRORS as error:
            log.debug("presence_beat_failed", error=str(error))

    async def stop(self) -> None:
        """Say goodbye, so the others take over at once rather than after a timeout."""
        await cancel_and_wait(self._task)
        await self._beat(leaving=True)
        if self._channel is not None and not self._channel.is_closed:
            with contextlib.suppress(*BROKER_ERRORS):
                await self._channel.close()
        self._task, self._channel, self._exchange = None, None, None


class QueueAges:
    """An ingress's ear on both stages' heartbeats: how long the oldest message of each
    partition queue has waited, by the word of the worker consuming it (the broker does not
    say; a queue no worker consumes has no age here)."""

    def __init__(
        self, broker: Broker, interval: float, clock: Callable[[], float] = time.monotonic
    ):
        self._broker = broker
        self._horizon = max(3 * interval, 5.0)
        self._clock = clock
        self._reports: dict[str, tuple[float, dict[str, float]]] = {}
        self._channel: AbstractChannel | None = None
        self._task: asyncio.Task[None] | None = None

    def age(self, queue: str) -> float | None:
        """The oldest wait any live worker reports for the queue (None: no report)."""
        horizon = self._clock() - self._horizon
        # A worker that died without its goodbye is forgotten here, as `Presence.peers` does.
        self._reports = {w: report for w, report in self._reports.items() if report[0] >= horizon}
        ages = [reported[queue] for _, reported in self._reports.values() if queue in reported]
        return max(ages) if ages else None

    def start(self) -> None:
        """Listen, from when the broker is connected (in the background; a robust channel
        listens again after a reconnect)."""
        self._task = asyncio.create_task(self._listen_when_connected(), name="queue-ages")

    async def _listen_when_connected(self) -> None:
        await self._broker.wait_connected()
        await keep_trying(self._listen, CONNECTION_ERRORS, "queue_ages_listen_failed")

    async def _listen(self) -> None:
        connection = self._broker.connection
        if connection is None:
            raise ConnectionError("no broker connection")
        topology = self._broker.topology
        async with asyncio.timeout(10):
            self._channel = channel = await connection.channel(publisher_confirms=False)
            queue = await channel.declare_queue(
                f"{topology.prefix}.ages.{uuid.uuid4().hex[:12]}",
                exclusive=True,
                auto_delete=True,
                arguments={"x-message-ttl": round(self._horizon * 1000)},
            )
            for stage in STAGES:
                exchange = await channel.get_exchange(
                    topology.presence_exchange(stage), ensure=False
                )
                await queue.bind(exchange)
            await queue.consume(self._on_beat, no_ack=True)

    async def _on_beat(self, message: AbstractIncomingMessage) -> None:
        try:
            beat = json.loads(message.body)
            worker, ages = str(beat["worker"]), beat.get("ages") or {}
            reported = {str(queue): float(age) for queue, age in ages.items()}
        except (ValueError, KeyError, TypeError, AttributeError):
            log.warning("presence_beat_invalid")
            return
        if beat.get("leaving"):
            self._reports.pop(worker, None)
        else:
            self._reports[worker] = (self._clock(), reported)

    async def stop(self) -> None:
        """Stop listening; the queue goes with the connection (closed next, at stop: a
        channel closed here would wait for a broker that may not answer)."""
        await cancel_and_wait(self._task)
        self._channel = None
