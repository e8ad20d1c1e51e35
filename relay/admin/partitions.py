"""The partition counts in use, and retiring one nobody runs with (`relay partitions`,
`relay.commands.partitions`).

Changing RELAY_PARTITIONS is a rolling restart with the new value (see
`relay.pipeline.generations`); the old count's queues are consumed until they are retired
here. A count may be retired once no service has noted it for `RUNNING_WITHIN`, nothing
published under it is unfinished, and its partition queues hold no message: the count
is removed from the store (workers stop consuming it within `RELAY_GENERATIONS_INTERVAL`)
and then its partition queues are deleted, if they are still empty.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import datetime

from aio_pika.abc import AbstractConnection

from relay.broker import Topology
from relay.broker.queues import look
from relay.pipeline.generations import RUNNING_WITHIN
from relay.store import Generations
from relay.wire import utcnow


class CannotRetire(Exception):
    """The count is still in use; the message says how."""


@dataclass(frozen=True)
class CountView:
    """One partition count as `relay partitions` shows it."""

    partitions: int
    last_noted: datetime
    running: bool  # a service noted it within RUNNING_WITHIN
    unfinished_inbound: int
    unfinished_outbound: int
    ready: int | None  # messages ready in its partition queues (None: not known)


async def counts(
    store: Generations, connection: AbstractConnection, topology: Topology
) -> list[CountView]:
    """Every count noted in the store, with what is left under it."""
    noted = await store.partition_counts()
    return [
        await _view(store, connection, topology, count, seen)
        for count, seen in sorted(noted.items())
    ]


async def _view(
    store: Generations,
    connection: AbstractConnection,
    topology: Topology,
    count: int,
    seen: datetime,
) -> CountView:
    """One count noted (last at `seen`), with what is left under it."""
    unfinished = await store.unfinished_under(count)
    stats = await look(connection, topology.with_partitions(count))
    partitions = [s.ready for s in stats if s.kind == "partition"]
    return CountView(
        partitions=count,
        last_noted=seen,
        running=(utcnow() - seen).total_seconds() < RUNNING_WITHIN,
        unfinished_inbound=unfinished["inbound"],
        unfinished_outbound=unfinished["outbound"],
        ready=None if None in partitions else sum(r or 0 for r in partitions),
    )


async def retire(
    store: Generations,
    connection: AbstractConnection,
    topology: Topology,
    count: int,
    let_go: float,
) -> list[str]:
    """Retire `count` (CannotRetire if it is in use); the queues deleted. `let_go`: seconds
    the workers take to stop consuming it once it is removed from the store."""
    seen = (await store.partition_counts()).get(count)
    if seen is None:
        raise CannotRetire(f"no service noted {count} partitions")
    view = await _view(store, connection, topology, count, seen)
    if view.running or count == topology.partitions:
        raise CannotRetire(f"a service runs with {count} partitions (noted {view.last_noted})")
    if view.unfinished_inbound or view.unfinished_outbound:
        raise CannotRetire(
            f"{view.unfinished_inbound} inbound and {view.unfinished_outbound} outbound"
            f" messages under {count} partitions are not finished with yet"
        )
    if view.ready != 0:
        raise CannotRetire(f"the queues of {count} partitions hold messages ({view.ready})")
    await store.forget_partitions(count)
    await asyncio.sleep(let_go)
    # Looked at again now that no worker consumes them (quorum queues cannot be deleted
    # "if empty"): nobody publishes under the count any more, and nothing under it waits
    # in a delay queue (nothing is unfinished).
    stats = await look(connection, topology.with_partitions(count))
    names = [stat.name for stat in stats if stat.kind == "partition" and stat.ready is not None]
    if any(stat.ready for stat in stats if stat.kind == "partition"):
        raise CannotRetire(f"the queues of {count} partitions hold messages")
    async with connection.channel() as channel:
        for name in names:
            await channel.queue_delete(name)
    return names
