"""A stage's workers over every partition count in use: RELAY_PARTITIONS changed on a
running system, without draining.

Each partition count is a generation of partition queues (`relay.broker.topology`). Every
service notes in the store the count it runs with, at start and every `REGISTER_INTERVAL`;
a worker service runs one `StageWorker` per count noted there, its own first, so whatever
was published under any count in use is consumed, whichever count the worker was started
with. Publishers keep a conversation on the count its unfinished messages went under and
move it only once nothing of it is unfinished in the stage (`relay.store.sql.generations`):
its messages are in one generation at a time, in order, and per-conversation order holds
through a rolling restart with the new count, with workers of both counts running.

A count that no service runs with any more stays consumed until `relay partitions retire`
removes it (once nothing is unfinished under it and its queues are empty).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Generic, TypeVar

import structlog
from pydantic import BaseModel

from relay.aio import cancel_and_wait, pause
from relay.broker import CONNECTION_ERRORS, Broker
from relay.broker.channels import close_channel
from relay.broker.topology import Topology, declare
from relay.pipeline.stage import StageWorker
from relay.store import Generations as GenerationStore
from relay.store import StoreError
from relay.wire import utcnow

log = structlog.get_logger(__name__)

E = TypeVar("E", bound=BaseModel)
REGISTER_INTERVAL = 30.0  # seconds between two notes of a service's count
# A count noted this recently is one a service runs with: it is not retired.
RUNNING_WITHIN = 3 * REGISTER_INTERVAL
LOOK_ERRORS: tuple[type[BaseException], ...] = (StoreError, *CONNECTION_ERRORS)


class Generations(Generic[E]):
    """The stage workers of one service, one per partition count in use."""

    def __init__(
        self,
        own: StageWorker[E],
        make: Callable[[Topology], StageWorker[E]],
        store: GenerationStore,
        broker: Broker,
        interval: float,
        grace: float,
    ) -> None:
        self.own = own
        self._grace = grace  # for a retired count's worker to finish what it holds
        self._make = make
        self._store = store
        self._broker = broker
        self._interval = interval
        self._workers: dict[int, StageWorker[E]] = {own.topology.partitions: own}
        self._wait = 60.0
        self._task: asyncio.Task[None] | None = None

    async def start(self, wait: float = 60.0) -> None:
        """Start the worker of this service's count, then look for the others."""
        self._wait = wait
        await self.own.start(wait)
        self._task = asyncio.create_task(self._watch_forever(), name="generations")

    async def _watch_forever(self) -> None:
        while True:
            try:
                await self.refresh()
            except LOOK_ERRORS as error:
                log.warning("generations_look_failed", error=f"{type(error).__name__}: {error}")
            except Exception:
                log.exception("generations_look_failed")  # never the end of the looking
            await pause(self._interval)

    async def refresh(self) -> None:
        """Start a worker for each count noted in the store and not consumed yet; stop
        those of counts removed from it (retired)."""
        noted = set(await self._store.partition_counts())
        for count in sorted(noted - set(self._workers)):
            await self._start_generation(count)
        for count in set(self._workers) - noted - {self.own.topology.partitions}:
            worker = self._workers.pop(count)
            log.info("partition_count_retired", stage=worker.stage, partitions=count)
            await worker.stop(self._grace)

    async def _start_generation(self, count: int) -> None:
        worker = self._make(self._broker.topology.with_partitions(count))
        connection = self._broker.connection
        if connection is None:
            return
        # Its queues may not exist yet (the service with that count has not declared them).
        channel = await connection.channel()
        try:
            await declare(channel, worker.topology)
        finally:
            # A stop may cancel this while the channel closes: that close must not break
            # the connection (`close_channel`).
            await close_channel(channel)
        await worker.start(self._wait)
        self._workers[count] = worker
        log.info("partition_count_consumed", stage=worker.stage, partitions=count)

    def stalled(self) -> dict[str, float]:
        """Partitions (by routing key) whose oldest unstarted message waited too long."""
        return {
            worker.topology.routing_key(partition): age
            for worker in self._workers.values()
            for partition, age in worker.stalled().items()
        }

    async def stop(self, grace: float) -> None:
        """Stop looking, then every worker (each finishes or returns what it holds)."""
        await cancel_and_wait(self._task)
        await asyncio.gather(*(worker.stop(grace) for worker in self._workers.values()))


async def register_forever(store: GenerationStore, count: int) -> None:
    """Note every `REGISTER_INTERVAL` that this service runs with `count` partitions (the
    caller noted it once already, before starting)."""
    while True:
        await pause(REGISTER_INTERVAL)
        try:
            await store.register_partitions(count, utcnow())
        except LOOK_ERRORS as error:
            log.warning("partition_count_note_failed", error=f"{type(error).__name__}: {error}")
