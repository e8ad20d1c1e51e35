"""The paced integrations (`deliveryRate` set) and how many of their responses wait, as
`relay queues` and `GET /admin/v1/queues/paced` show them."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Protocol

from relay.store import IntegrationRecord
from relay.views import paced_view
from relay.wire import utcnow
from relay.wire.admin import PacedView


class PacingStore(Protocol):
    """What the view reads: the integrations, and their responses not finished with."""

    async def list_integrations(
        self, after: str | None = None, limit: int | None = None
    ) -> list[IntegrationRecord]:
        """Every integration, oldest first."""

    async def waiting_responses(
        self, integration_ids: list[str], since: datetime
    ) -> dict[str, int]:
        """How many responses of each integration no attempt has finished with."""


async def paced_integrations(store: PacingStore, max_age: float) -> list[PacedView]:
    """Each paced integration with its pace and its responses waiting (of those younger
    than `max_age` seconds: older ones are dead-lettered when next looked at)."""
    paced = [i for i in await store.list_integrations() if i.delivery.delivery_rate is not None]
    since = utcnow() - timedelta(seconds=max_age)
    waiting = await store.waiting_responses([i.id for i in paced], since) if paced else {}
    return [paced_view(integration, waiting.get(integration.id, 0)) for integration in paced]
