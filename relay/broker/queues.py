"""What is in the relay's queues: for `relay queues` and for every service's `/metrics`
(`relay.service.gauges` keeps those fresh).

AMQP tells, per queue, the messages ready and the active consumers (a passive declare);
it does not tell the unacknowledged ones. Those come from the management API when
`RELAY_MANAGEMENT_URL` names it; without it they are shown as unknown.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import asdict, dataclass, replace
from urllib.parse import quote, urlsplit, urlunsplit

import aiohttp
from aio_pika.abc import AbstractConnection

from relay.broker.client import BROKER_ERRORS
from relay.broker.topology import QueueKind, Topology
from relay.metrics import Metrics


@dataclass(frozen=True)
class QueueStat:
    """One relay queue as the broker sees it now."""

    name: str
    stage: str
    kind: QueueKind
    ready: int | None  # None: the queue does not exist (yet)
    consumers: int | None
    unacked: int | None = None  # None: unknown without the management API


async def look(connection: AbstractConnection, topology: Topology) -> list[QueueStat]:
    """Ready messages and active consumers of every relay queue (passive declares)."""
    stats = []
    channel = await connection.channel()
    try:
        for name, stage, kind in topology.queues():
            if channel.is_closed:  # a missing queue closes the channel: take a new one
                channel = await connection.channel()
            try:
                queue = await channel.declare_queue(name, passive=True)
            except BROKER_ERRORS:
                stats.append(QueueStat(name, stage, kind, None, None))
                continue
            result = queue.declaration_result
            stats.append(
                QueueStat(name, stage, kind, result.message_count or 0, result.consumer_count or 0)
            )
    finally:
        if not channel.is_closed:
            with contextlib.suppress(*BROKER_ERRORS):
                await channel.close()
    return stats


async def with_management(stats: list[QueueStat], url: str) -> list[QueueStat]:
    """The stats with unacked counts from the management API at `url`
    (http://user:password@host:15672/vhost; no vhost means /)."""
    parts = urlsplit(url)
    auth = aiohttp.BasicAuth(parts.username or "guest", parts.password or "guest")
    vhost = parts.path.strip("/") or quote("/", safe="")
    netloc = f"{parts.hostname}:{parts.port}" if parts.port else str(parts.hostname)
    base = urlunsplit((parts.scheme, netloc, "", "", ""))
    endpoint = f"{base}/api/queues/{vhost}?columns=name,messages_unacknowledged,consumers"
    async with (
        aiohttp.ClientSession(auth=auth, timeout=aiohttp.ClientTimeout(total=5)) as http,
        http.get(endpoint) as answer,
    ):
        answer.raise_for_status()
        rows = {row["name"]: row for row in await answer.json()}
    return [
        replace(stat, unacked=rows[stat.name].get("messages_unacknowledged", 0))
        if stat.name in rows
        else stat
        for stat in stats
    ]


def render_table(stats: list[QueueStat]) -> str:
    """A fixed-width table, one queue per line."""
    header = ("QUEUE", "STAGE", "KIND", "READY", "UNACKED", "CONSUMERS")
    rows = [header] + [
        (
            s.name,
            s.stage,
            s.kind,
            _shown(s.ready, "missing"),
            _shown(s.unacked, "?"),
            _shown(s.consumers, "-"),
        )
        for s in stats
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]
    if any(s.unacked is None and s.ready is not None for s in stats):
        lines.append("(UNACKED needs the management API: set RELAY_MANAGEMENT_URL)")
    return "\n".join(lines)


def render_json(stats: list[QueueStat]) -> str:
    """The stats as one JSON document."""
    return json.dumps({"queues": [asdict(s) for s in stats]}, indent=2)


def _shown(value: int | None, unknown: str) -> str:
    return unknown if value is None else str(value)


def export(stats: list[QueueStat], metrics: Metrics) -> None:
    """Put the stats into the service's gauges."""
    for stat in stats:
        if stat.ready is None:
            continue
        metrics.queue_messages.labels(stat.stage, stat.name).set(stat.ready)
        metrics.queue_consumers.labels(stat.stage, stat.name).set(stat.consumers or 0)
        if stat.kind == "dead":
            metrics.dead_letters.labels(stat.stage).set(stat.ready)
