"""An integration's rate limit holds across ingresses: two `relay ingress` processes on one
store (both stores), one integration sending to both as fast as it can, are together held to
its rate (its burst, then `RELAY_RATE_LIMIT_PER_SECOND`), while another integration sending
through the same two ingresses at the same time is never refused."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field

import aiohttp
import pytest

from relay.settings import Settings
from relay.store import SqlStore
from tests.fleet import Service, fleet
from tests.helpers import make_integration, message

pytestmark = pytest.mark.slow

RATE, BURST = 10, 5
WINDOW = 2.0  # seconds of sending
SENDERS = 3  # concurrent requests per ingress for the integration over its rate
LIMITS = {"RELAY_RATE_LIMIT_PER_SECOND": str(RATE), "RELAY_RATE_LIMIT_BURST": str(BURST)}


@dataclass
class Tally:
    """The answers one integration got, per ingress."""

    statuses: Counter[tuple[str, int]] = field(default_factory=Counter)
    retry_afters: list[str] = field(default_factory=list)

    def count(self, status: int, ingress: str | None = None) -> int:
        """Answers with `status`, from one ingress (by name) or from every one."""
        return sum(
            n
            for (name, got), n in self.statuses.items()
            if got == status and ingress in (None, name)
        )


async def send(
    http: aiohttp.ClientSession, service: Service, integration: tuple[str, str], tally: Tally
) -> None:
    """POST one new message and count its answer."""
    body = message(uuid.uuid4().hex, conversationId=f"conv-{uuid.uuid4().hex[:6]}")
    async with http.post(
        f"{service.url}/webhooks/{integration[0]}",
        json=body,
        headers={"Authorization": f"Bearer {integration[1]}"},
    ) as answer:
        await answer.read()
        tally.statuses[service.name, answer.status] += 1
        if answer.status == 429:
            tally.retry_afters.append(answer.headers.get("Retry-After", ""))


async def flood(
    http: aiohttp.ClientSession, service: Service, integration: tuple[str, str], until: float
) -> Tally:
    """As many requests as `SENDERS` at a time get answered before `until`."""
    tally = Tally()

    async def sender() -> None:
        while time.monotonic() < until:
            await send(http, service, integration, tally)

    await asyncio.gather(*(sender() for _ in range(SENDERS)))
    return tally


async def trickle(
    http: aiohttp.ClientSession, services: list[Service], integration: tuple[str, str], until: float
) -> Tally:
    """Four requests a second (under the rate), to each ingress in turn, until `until`."""
    tally = Tally()
    n = 0
    while time.monotonic() < until:
        await send(http, services[n % len(services)], integration, tally)
        n += 1
        await asyncio.sleep(0.25)
    return tally


async def test_two_ingresses_together_hold_an_integration_to_its_rate(
    settings: Settings, store: SqlStore
):
    greedy = await make_integration(store, settings, name="greedy")
    modest = await make_integration(store, settings, name="modest")
    async with fleet(settings, env=LIMITS) as services, aiohttp.ClientSession() as http:
        ingresses = list(await asyncio.gather(*(services.start("ingress") for _ in range(2))))
        started = time.monotonic()
        until = started + WINDOW
        *floods, steady = await asyncio.gather(
            *(flood(http, service, greedy, until) for service in ingresses),
            trickle(http, ingresses, modest, until),
        )
        elapsed = time.monotonic() - started
    over = Tally()
    for tally in floods:
        over.statuses.update(tally.statuses)
        over.retry_afters.extend(tally.retry_afters)
    accepted, refused = over.count(200), over.count(429)
    assert accepted + refused == sum(over.statuses.values()), over.statuses
    # Never more than the bucket gives in the time (one ingress alone would reach that, two
    # unshared twice as much); and the bucket kept drained, not refusing more than it must.
    allowed = BURST + RATE * elapsed
    assert accepted <= allowed + 2, (accepted, elapsed, over.statuses)
    assert accepted >= (BURST + RATE * WINDOW) / 2, (accepted, elapsed, over.statuses)
    assert refused > accepted  # the flood was over the rate all along
    for service in ingresses:  # each ingress took its share and refused past it
        assert over.count(200, service.name) > 0, over.statuses
        assert over.count(429, service.name) > 0, over.statuses
    assert all(value == "1" for value in over.retry_afters), set(over.retry_afters)
    # The other integration, through the same ingresses at the same time: never refused.
    assert steady.count(200) == sum(steady.statuses.values()) >= 2, steady.statuses
