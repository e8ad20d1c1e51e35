"""`GET /queues`: every relay queue of every partition count in use, as `relay queues`;
`GET /queues/paced`: the paced integrations and how many of their responses wait."""

from __future__ import annotations

import time
from collections.abc import Mapping

from aiohttp import web

from relay.admin.pacing import paced_integrations
from relay.broker import queues
from relay.broker.presence import QueueAges
from relay.broker.queues import QueueStat
from relay.errors import Unavailable
from relay.ingress.admin.common import SETTINGS_KEY, AdminKeys, json_answer
from relay.wire.admin import PacedView, Page, QueueView


def _age(
    stat: QueueStat, kept: Mapping[str, tuple[int, int | None]], ages: QueueAges
) -> float | None:
    """Partition queues: their workers' word; dead letters: since the oldest kept died."""
    if stat.kind == "dead":
        oldest = kept.get(stat.stage, (0, None))[1]
        if oldest is not None:
            return max(0.0, round(time.time() - oldest, 1))
    reported = ages.age(stat.name)
    if reported is None and stat.ready == 0 and not stat.unacked:
        return 0.0  # empty: nothing waits
    return reported


def add_routes(app: web.Application, keys: AdminKeys) -> None:
    """The routes; the broker connection is the ingress's own."""

    async def look(request: web.Request) -> web.Response:
        broker = request.config_dict[keys.broker]
        settings = request.app[SETTINGS_KEY]
        connection = broker.connection
        if connection is None or connection.is_closed:
            raise Unavailable("not connected to the broker", headers={"Retry-After": "1"})
        counts = await request.config_dict[keys.store].partition_counts()
        # Without the management API: the counts, with no unacked, leaders or members.
        stats, _ = await queues.survey(
            connection, broker.topology, list(counts), settings.management_url
        )
        ages = request.config_dict[keys.ages]
        summary = await request.config_dict[keys.store].dead_letter_summary()
        kept = {str(stage): found for stage, found in summary.items()}
        items = [
            QueueView.model_validate(stat, from_attributes=True).model_copy(
                update={"oldestAgeSeconds": _age(stat, kept, ages)}
            )
            for stat in stats
        ]
        return json_answer(Page[QueueView](items=items, nextCursor=None))

    async def paced(request: web.Request) -> web.Response:
        max_age = request.app[SETTINGS_KEY].delivery_max_age
        items = await paced_integrations(request.config_dict[keys.store], max_age)
        return json_answer(Page[PacedView](items=items, nextCursor=None))

    app.router.add_get("/queues", look)
    app.router.add_get("/queues/paced", paced)
