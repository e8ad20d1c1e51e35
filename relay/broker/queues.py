"""What is in the relay's queues: for `relay queues` and for every service's `/metrics`
(`relay.service.gauges` keeps those fresh).

AMQP tells, per queue, the messages ready and the active consumers (a passive declare);
it does not tell the unacknowledged ones, nor where a quorum queue lives. Those come from
the management API when `RELAY_MANAGEMENT_URL` names it (several nodes of a cluster,
comma-separated: the first that answers): unacked messages, and for each quorum queue its
leader, its members and how many of them are online. Without it they are unknown.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import aiohttp
from aio_pika.abc import AbstractChannel, AbstractConnection

from relay.broker.channels import close_channel
from relay.broker.errors import BROKER_ERRORS
from relay.broker.topology import QueueKind, QueueStage, Topology
from relay.metrics import Metrics

LOOK_TIMEOUT = 5.0  # seconds for one queue's answer


@dataclass(frozen=True)
class QueueStat:
    """One relay queue as the broker sees it now."""

    name: str
    stage: QueueStage  # `operations` for the operations events' queues (no pipeline stage)
    kind: QueueKind
    ready: int | None  # None: the queue does not exist (yet)
    consumers: int | None
    unacked: int | None = None  # None: unknown without the management API
    leader: str | None = None  # the quorum queue's leader node (management API)
    members: tuple[str, ...] = ()  # its member nodes (management API)
    online: tuple[str, ...] = ()  # the members that are up (management API)

    @property
    def quorum_lost(self) -> bool:
        """A quorum queue with fewer than a majority of its members up: it takes and gives
        no messages until enough come back."""
        return bool(self.members) and len(self.online) <= len(self.members) // 2


async def look(
    connection: AbstractConnection, topology: Topology, other_counts: Sequence[int] = ()
) -> list[QueueStat]:
    """Ready messages and active consumers of every relay queue, and of the partition queues
    of `other_counts` (other partition counts in use) after them (passive declares; a queue
    that does not answer within LOOK_TIMEOUT, e.g. a quorum queue without its quorum, is
    shown as unknown)."""
    stats = []
    queues = topology.queues()
    for count in sorted(set(other_counts) - {topology.partitions}):
        others = topology.with_partitions(count).queues()
        queues += [queue for queue in others if queue[2] == "partition"]
    channel = await connection.channel()
    try:
        for name, stage, kind in queues:
            if channel.is_closed:  # a missing queue closes the channel: take a new one
                channel = await connection.channel()
            try:
                async with asyncio.timeout(LOOK_TIMEOUT):
                    queue = await channel.declare_queue(name, passive=True)
            except BROKER_ERRORS as error:
                if isinstance(error, TimeoutError):  # its late answer must not meet the next
                    await _close_quietly(channel)
                stats.append(QueueStat(name, stage, kind, None, None))
                continue
            result = queue.declaration_result
            stats.append(
                QueueStat(name, stage, kind, result.message_count or 0, result.consumer_count or 0)
            )
    finally:
        await _close_quietly(channel)
    return stats


async def _close_quietly(channel: AbstractChannel) -> None:
    if not channel.is_closed:
        with contextlib.suppress(*BROKER_ERRORS):
            async with asyncio.timeout(LOOK_TIMEOUT):
                # Shielded: the gauges are cancelled at stop, and a cancelled close would
                # break the connection (`close_channel`).
                await close_channel(channel)


MANAGEMENT_COLUMNS = "name,messages_unacknowledged,consumers,leader,members,online"


async def with_management(stats: list[QueueStat], urls: str) -> list[QueueStat]:
    """The stats with unacked counts and quorum membership from the management API at the
    first of `urls` that answers (http://user:password@host:15672/vhost, comma-separated;
    no vhost means /)."""
    error: Exception | None = None
    for url in (u.strip() for u in urls.split(",") if u.strip()):
        try:
            rows = await _management_rows(url)
        except (aiohttp.ClientError, TimeoutError) as failed:
            error = failed
            continue
        return [_with_row(stat, rows[stat.name]) if stat.name in rows else stat for stat in stats]
    raise error or aiohttp.ClientError("no management URL")


async def _management_rows(url: str) -> dict[str, dict[str, Any]]:
    parts = urlsplit(url)
    auth = aiohttp.BasicAuth(parts.username or "guest", parts.password or "guest")
    vhost = parts.path.strip("/") or quote("/", safe="")
    netloc = f"{parts.hostname}:{parts.port}" if parts.port else str(parts.hostname)
    base = urlunsplit((parts.scheme, netloc, "", "", ""))
    endpoint = f"{base}/api/queues/{vhost}?columns={MANAGEMENT_COLUMNS}"
    async with (
        aiohttp.ClientSession(auth=auth, timeout=aiohttp.ClientTimeout(total=5)) as http,
        http.get(endpoint) as answer,
    ):
        answer.raise_for_status()
        return {row["name"]: row for row in await answer.json()}


async def survey(
    connection: AbstractConnection,
    topology: Topology,
    other_counts: Sequence[int],
    management_url: str | None,
) -> tuple[list[QueueStat], Exception | None]:
    """`look`, then `with_management` if a management URL is set: the stats, and the
    management API's error if it did not answer (the AMQP figures stand without it)."""
    stats = await look(connection, topology, other_counts)
    if not management_url:
        return stats, None
    try:
        return await with_management(stats, management_url), None
    except (aiohttp.ClientError, TimeoutError) as error:
        return stats, error


def _with_row(stat: QueueStat, row: dict[str, Any]) -> QueueStat:
    return replace(
        stat,
        unacked=row.get("messages_unacknowledged", 0),
        leader=row.get("leader"),
        members=tuple(row.get("members") or ()),
        online=tuple(row.get("online") or ()),
    )


def render_table(stats: list[QueueStat]) -> str:
    """A fixed-width table, one queue per line; with the management API, each quorum
    queue's leader and members (`-` after a member that is down)."""
    header = ("QUEUE", "STAGE", "KIND", "READY", "UNACKED", "CONSUMERS", "LEADER", "MEMBERS")
    rows = [header] + [
        (
            s.name,
            s.stage,
            s.kind,
            _shown(s.ready, "missing"),
            _shown(s.unacked, "?"),
            _shown(s.consumers, "-"),
            s.leader or "?",
            _members(s),
        )
        for s in stats
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]
    if any(s.unacked is None and s.ready is not None for s in stats):
        lines.append("(UNACKED, LEADER, MEMBERS need the management API: set RELAY_MANAGEMENT_URL)")
    lost = [s.name for s in stats if s.quorum_lost]
    if lost:
        lines.append(f"QUORUM LOST (no messages in or out until members return): {', '.join(lost)}")
    return "\n".join(lines)


def _members(stat: QueueStat) -> str:
    if not stat.members:
        return "?"
    return ",".join(m if m in stat.online else f"{m}-" for m in stat.members)


def render_json(stats: list[QueueStat]) -> str:
    """The stats as one JSON document."""
    rows = [{**asdict(s), "quorum_lost": s.quorum_lost} for s in stats]
    return json.dumps({"queues": rows}, indent=2)


def _shown(value: int | None, unknown: str) -> str:
    return unknown if value is None else str(value)


def export(stats: list[QueueStat], metrics: Metrics) -> None:
    """Put the stats into the service's gauges."""
    for stat in stats:
        if stat.ready is None:
            continue
        metrics.queue_messages.labels(stat.stage, stat.name).set(stat.ready)
        metrics.queue_consumers.labels(stat.stage, stat.name).set(stat.consumers or 0)
        if stat.members:
            metrics.queue_members.labels(stat.stage, stat.name).set(len(stat.members))
            metrics.queue_members_online.labels(stat.stage, stat.name).set(len(stat.online))
            metrics.queue_quorum_lost.labels(stat.stage, stat.name).set(int(stat.quorum_lost))
