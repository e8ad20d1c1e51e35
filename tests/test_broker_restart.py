"""The broker goes away mid-stream (`rabbitmqctl stop_app`) and comes back (`start_app`):
the ingress answers 503 meanwhile, the workers reconnect and consume again, and every
message accepted before, during and after is answered, once and in order."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from typing import Any

import pytest

from relay.settings import Settings
from relay.store import SqlStore
from tests.helpers import Ingress, eventually, make_integration, message
from tests.receivers import Hit, Receiver
from tests.test_cli import relay_processes

CONVERSATIONS = 10
AFTER_THE_OUTAGE = 3  # messages each conversation still posts once the broker is back

pytestmark = pytest.mark.skipif(
    shutil.which("rabbitmqctl") is None, reason="needs the local broker's rabbitmqctl"
)


def rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=120)


async def broker_stopped_for_a_while(seconds: float) -> None:
    """stop_app, wait, start_app (always), then wait until the node is up."""
    await asyncio.to_thread(rabbitmqctl, "stop_app")
    try:
        await asyncio.sleep(seconds)  # the outage itself, not a wait for an outcome
    finally:
        await asyncio.to_thread(rabbitmqctl, "start_app")
        await asyncio.to_thread(rabbitmqctl, "await_startup")


async def post_until_accepted(
    ingress: Ingress, integration_id: str, token: str, body: dict[str, Any]
) -> int:
    """What a back end does with a 503: send the same message again. The 503s it got."""
    refused = 0
    while True:
        status, _ = await ingress.post(integration_id, token, body)
        if status == 200:
            return refused
        assert status == 503
        refused += 1
        await asyncio.sleep(0.2)


@pytest.mark.timeout(400)
async def test_consumption_resumes_after_a_broker_restart_and_nothing_is_lost(
    ingress: Ingress, store: SqlStore, settings: Settings, receiver: Receiver
):
    receiver.hits.clear()
    integration_id, token = await make_integration(
        store, settings, response_url=receiver.url("restart")
    )
    # The stream runs until the outage is over (and a little after), so the outage falls
    # mid-stream however long rabbitmqctl takes to act.
    posted = [0] * CONVERSATIONS
    unavailable = [0]
    outage_over = asyncio.Event()

    async def conversation(c: int) -> None:
        after = 0
        while after < AFTER_THE_OUTAGE:
            n = posted[c]
            body = message(f"{c}-{n}", conversationId=f"r{c}", text=f"{c}:{n}")
            unavailable[0] += await post_until_accepted(ingress, integration_id, token, body)
            posted[c] += 1
            after += outage_over.is_set()
            await asyncio.sleep(0.05)  # a stream, not a burst

    async def outage() -> None:
        async def some_posted() -> bool:
            return sum(posted) >= 3 * CONVERSATIONS

        await eventually(some_posted, timeout=60)
        await broker_stopped_for_a_while(3)
        outage_over.set()

    env = {
        "RELAY_LOG_LEVEL": "warning",
        "RELAY_ALLOWED_ENDPOINT_NETWORKS": "127.0.0.0/8",
        "RELAY_DELIVERY_RETRY_SCHEDULE": "0,0.5,1,2,4,8",
    }
    async with (
        relay_processes(settings, "bot-worker", 1, env),
        relay_processes(settings, "delivery-worker", 1, env),
    ):
        await asyncio.gather(outage(), *[conversation(c) for c in range(CONVERSATIONS)])

        async def all_answered() -> bool:
            texts = {h.body["payload"].get("text") for h in receiver.at("restart")}
            return len(texts - {None}) >= sum(posted)

        await eventually(all_answered, timeout=180, interval=0.5)
    assert unavailable[0] > 0, "the outage did not fall while messages were being posted"
    check_once_and_in_order(receiver.at("restart"), posted)


def check_once_and_in_order(hits: list[Hit], posted: list[int]) -> None:
    """Each conversation's responses by first arrival: every sequence, texts in order."""
    for c, count in enumerate(posted):
        first: list[int] = []
        texts: list[str] = []
        for body in (hit.body for hit in hits if hit.body["conversationId"] == f"r{c}"):
            if body["sequence"] not in first:
                first.append(body["sequence"])
                if body["type"] == "text":
                    texts.append(body["payload"]["text"])
        assert first == list(range(1, 2 * count + 1)), f"r{c}"
        assert texts == [f"echo: {c}:{n}" for n in range(count)]
