"""Delivery paced per integration (`deliveryRate`, `deliveryBurst`): a paced endpoint
receives at its rate, in order per conversation, however many workers deliver to it (they
share one bucket in the store), from workers in the test's process and from a `relay
delivery-worker` process; an unpaced integration on the same workers is not slowed by a
paced one's backlog; `relay queues` and `GET /queues/paced` show the pace and the backlog."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import json
import time
from typing import Any

import pytest

from relay import admin
from relay.broker import partition_of
from relay.commands.queues import render_paced
from relay.metrics import Metrics
from relay.pipeline.stage import StageWorker
from relay.settings import Settings
from relay.store import DeliveryOptions, IntegrationRecord, SqlStore
from relay.wire import OutboundEnvelope, utcnow
from relay.wire.admin import PacedView
from tests.helpers import (
    Ingress,
    Queues,
    admin_call,
    eventually,
    make_integration,
    message,
    push_text,
    start_delivery_worker,
)
from tests.receivers import Hit, Receiver
from tests.test_cli import relay
from tests.test_delivery_processes import delivery_workers
from workers.delivery.pace import Pace

RATE = 6.0  # responses a second
SLACK = 0.1  # seconds an arrival may come early or late by (the POST's own time varies)


@pytest.fixture(autouse=True)
def fresh_receiver(receiver: Receiver) -> None:
    receiver.hits.clear()
    receiver.scripts.clear()


async def integration_with(
    ingress: Ingress,
    store: SqlStore,
    settings: Settings,
    url: str,
    delivery: DeliveryOptions,
    conversations: int,
    partitions: int = 1,
) -> tuple[str, list[str], str]:
    """An integration with these delivery options and `conversations` conversations of it
    (one in each of `partitions` outbound partitions at least): (its id, the relay ids of
    those conversations, a bot token)."""
    integration_id, token = await make_integration(store, settings, response_url=url)
    await store.set_delivery(integration_id, delivery)
    ids: list[str] = []
    for n in itertools.count():
        covered = {partition_of(c, settings.partitions) for c in ids}
        if len(ids) >= conversations and len(covered) >= partitions:
            break
        _, sent = await ingress.post(integration_id, token, message(n, conversationId=f"c{n}"))
        ids.append(sent["conversation"]["id"])
    bot_token, _ = await admin.create_token(store, integration_id, "bot")
    chosen = list({partition_of(c, settings.partitions): c for c in reversed(ids)}.values())
    chosen += [c for c in ids if c not in chosen][: conversations - len(chosen)]
    return integration_id, chosen, bot_token


async def push_each(
    ingress: Ingress, conversations: list[str], bot_token: str, per: int
) -> dict[str, float]:
    """`per` responses to each conversation, round robin: when each was pushed, by
    webhook-id."""
    pushed = {}
    for n in range(per):
        for conversation in conversations:
            stored = await push_text(ingress, conversation, bot_token, f"r{n}")
            pushed[f"msg_{stored['id']}"] = time.monotonic()
    return pushed


def assert_paced(hits: list[Hit], rate: float, burst: int) -> None:
    """No window holds more arrivals than the bucket allows (`burst`, then `rate` a second),
    and no conversation's responses arrive out of order."""
    at = sorted(hit.at for hit in hits)
    for i, j in itertools.combinations(range(len(at)), 2):
        assert at[j] - at[i] >= (j - i + 1 - burst) / rate - SLACK, (i, j, at[j] - at[i])
    sequences: dict[str, list[int]] = {}
    for hit in sorted(hits, key=lambda h: h.at):
        sequences.setdefault(hit.body["botpressConversationId"], []).append(hit.body["sequence"])
    for conversation, numbers in sequences.items():
        assert numbers == sorted(numbers), conversation


async def _count(receiver: Receiver, path: str, count: int) -> list[Hit] | None:
    hits = [hit for hit in receiver.at(path) if hit.status == 200]
    return hits if len(hits) >= count else None


def sample(worker: StageWorker[OutboundEnvelope], name: str, **labels: str) -> float:
    return worker.metrics.registry.get_sample_value(name, labels) or 0.0


async def share(
    ingress: Ingress,
    receiver: Receiver,
    conversations: list[str],
    bot_token: str,
    workers: tuple[StageWorker[OutboundEnvelope], ...],
) -> None:
    """Deliver to `conversations` (one in each partition at least) until each worker holds
    its fair share of the partitions (a worker holds a partition once it took messages of
    it; the first to subscribe takes them all, and hands the surplus over as it sees its
    peer)."""

    async def holding() -> bool:
        return all(sample(w, "relay_partitions_held", stage="outbound") == 2 for w in workers)

    for _ in range(20):
        count = len(receiver.at("unpaced")) + len(conversations)
        await push_each(ingress, conversations, bot_token, 1)
        await eventually(functools.partial(_count, receiver, "unpaced", count))
        with contextlib.suppress(AssertionError):
            await eventually(holding, timeout=0.5)
            return
    raise AssertionError("the workers did not share the partitions")


async def paced_view(ingress: Ingress, token: str, integration_id: str) -> dict[str, Any]:
    status, body = await admin_call(ingress, "GET", "/queues/paced", token)
    assert status == 200, body
    [view] = [item for item in body["items"] if item["integrationId"] == integration_id]
    return view


async def test_two_workers_keep_a_paced_integration_to_its_rate_and_an_unpaced_one_goes_on(
    ingress: Ingress, store: SqlStore, settings: Settings, receiver: Receiver, admin_token: str
):
    # Four lanes a worker: were the paced responses waiting in every lane for their turn,
    # the unpaced ones would wait behind them.
    narrow = settings.model_copy(update={"delivery_concurrency": 4})
    paced_url, unpaced_url = receiver.url("paced"), receiver.url("unpaced")
    async with start_delivery_worker(narrow) as one, start_delivery_worker(narrow) as two:
        _, others, other_token = await integration_with(
            ingress, store, settings, unpaced_url, DeliveryOptions(), 4, 4
        )
        await share(ingress, receiver, others, other_token, (one, two))
        paced_id, conversations, bot_token = await integration_with(
            ingress, store, settings, paced_url, DeliveryOptions(delivery_rate=RATE), 6, 4
        )
        total = 2 * len(conversations)
        await push_each(ingress, conversations, bot_token, 2)
        view = await paced_view(ingress, admin_token, paced_id)
        assert (view["deliveryRate"], view["deliveryBurst"]) == (RATE, 6)
        assert view["waiting"] > 0
        # The unpaced integration again, while the paced one's backlog waits.
        before = len(receiver.at("unpaced"))
        pushed = await push_each(ingress, others, other_token, 1)
        await eventually(lambda: _count(receiver, "unpaced", before + len(others)), timeout=10)
        unpaced = receiver.at("unpaced")[before:]
        assert len(receiver.at("paced")) < total  # the backlog was still there
        hits = await eventually(lambda: _count(receiver, "paced", total), timeout=30)
        await eventually(lambda: _none_waiting(ingress, admin_token, paced_id))
    delays = [hit.at - pushed[hit.headers["webhook-id"]] for hit in unpaced]
    assert max(delays) < 1.0, delays
    # The first six in a burst (one second's worth, the default), then at the rate.
    assert_paced(hits, RATE, 6)
    span = max(h.at for h in hits) - min(h.at for h in hits)
    assert span < (total - 6) / RATE + 5  # at its rate, not slower
    for worker in (one, two):
        assert sample(worker, "relay_messages_consumed_total", stage="outbound", outcome="done")
    assert sum(
        sample(w, "relay_delivery_paced_total", wait=where)
        for w in (one, two)
        for where in ("lane", "queue")
    )


async def _none_waiting(ingress: Ingress, token: str, integration_id: str) -> bool:
    return (await paced_view(ingress, token, integration_id))["waiting"] == 0


async def test_a_paced_endpoint_receives_at_its_rate_and_in_order_from_a_worker_process(
    ingress: Ingress, store: SqlStore, settings: Settings, queues: Queues, receiver: Receiver
):
    options = DeliveryOptions(delivery_rate=RATE, delivery_burst=1)
    paced_id, conversations, bot_token = await integration_with(
        ingress, store, settings, receiver.url("processes"), options, 4
    )
    await push_each(ingress, conversations, bot_token, 3)
    total = 3 * len(conversations)
    # The backlog, before any worker runs: `relay queues` shows it all waiting.
    shown = await relay(settings, "queues", "--json")
    assert shown.code == 0, shown.err
    [view] = [p for p in json.loads(shown.out)["paced"] if p["integrationId"] == paced_id]
    assert view == {
        "integrationId": paced_id,
        "name": "test",
        "deliveryRate": RATE,
        "deliveryBurst": 1,
        "waiting": total,
    }
    assert [line.split() for line in render_paced([PacedView(**view)]).splitlines()] == [
        ["PACED", "INTEGRATION", "NAME", "RATE/S", "BURST", "WAITING"],
        [paced_id, "test", "6", "1", str(total)],
    ]
    async with delivery_workers(settings, 1):
        hits = await eventually(lambda: _count(receiver, "processes", total), timeout=30)
    assert_paced(hits, RATE, 1)
    span = max(h.at for h in hits) - min(h.at for h in hits)
    assert (total - 1) / RATE - SLACK <= span < (total - 1) / RATE + 5


class Tokens:
    """A bucket with no token for `empty` more takes, then one each time."""

    def __init__(self, empty: int, wait: float) -> None:
        self.empty, self.wait = empty, wait
        self.asked = asyncio.Event()

    async def take(self, key: str, rate: float, burst: int) -> float:
        self.asked.set()
        if self.empty:
            self.empty -= 1
            return self.wait
        return 0.0


def paced(rate: float | None) -> IntegrationRecord:
    return IntegrationRecord(
        id="i",
        name="n",
        response_url="http://127.0.0.1:9/r",
        signing_secret="s",
        created_at=utcnow(),
        delivery=DeliveryOptions(delivery_rate=rate),
    )


async def test_few_lanes_wait_for_a_turn_and_the_rest_come_back_at_the_rate():
    metrics = Metrics()
    tokens = Tokens(empty=1, wait=0.05)
    pace = Pace(tokens, metrics, lanes=1, lane_wait=1.0, clock=lambda: 100.0)
    assert await pace.turn(paced(None)) is None  # unpaced: never waits
    in_lane = asyncio.create_task(pace.turn(paced(10.0)))
    await tokens.asked.wait()  # it found no token: it waits in its lane for the next one
    # The one lane is taken: the others wait in the queues, each a turn after the last.
    assert [await pace.turn(paced(10.0)) for _ in range(3)] == pytest.approx([0.2, 0.3, 0.4])
    assert await in_lane is None
    count = metrics.registry.get_sample_value
    assert count("relay_delivery_paced_total", {"wait": "lane"}) == 1
    assert count("relay_delivery_paced_total", {"wait": "queue"}) == 3
    # A wait longer than the lane's goes to the queues at once.
    slow = Pace(Tokens(empty=1, wait=5.0), Metrics(), lane_wait=1.0, clock=lambda: 100.0)
    assert await slow.turn(paced(10.0)) == pytest.approx(0.2)
