"""The conversation API with several processes (both stores): 2 ingresses, 2 bot workers
and a delivery worker as separate `relay` processes. POSTs with `?wait` go to either
ingress while the bot workers share the partitions; an integration stream on one ingress
sees every item, whichever ingress took the message; a conversation stream dropped on one
ingress resumes on the other with no gap and no repeat."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import aiohttp
import pytest

from relay.settings import Settings
from relay.store import SqlStore
from tests.fleet import fleet
from tests.helpers import eventually, make_integration, message
from tests.receivers import Receiver
from tests.sse import Event, open_stream

CONVERSATIONS = 10
PER_CONVERSATION = 5


@pytest.mark.timeout(300)
async def test_waits_streams_and_history_across_processes(
    settings: Settings, store: SqlStore, receiver: Receiver
):
    integration_id, token = await make_integration(
        store, settings, response_url=receiver.url("fleet")
    )
    auth = {"Authorization": f"Bearer {token}"}
    run = uuid.uuid4().hex[:6]
    conversations = [f"fleet-{run}-{c}" for c in range(CONVERSATIONS)]
    async with fleet(settings) as services, aiohttp.ClientSession() as http:
        ingresses = [await services.start("ingress") for _ in range(2)]
        for _ in range(2):
            await services.start("bot-worker")
        await services.start("delivery-worker")
        a, b = ingresses
        everything = f"{b.url}/webhooks/{integration_id}/events"
        first = f"{a.url}/webhooks/{integration_id}/conversations/{conversations[0]}/events"

        async def conversation(c: int) -> None:
            for n in range(PER_CONVERSATION):
                ingress = ingresses[(c + n) % 2]
                body = message(f"{run}-{c}-{n}", conversationId=conversations[c], text=f"{c}:{n}")
                async with http.post(
                    f"{ingress.url}/webhooks/{integration_id}?wait=15", json=body, headers=auth
                ) as answer:
                    assert answer.status == 200, await answer.text()
                    waited = await answer.json()
                assert waited["complete"] is True
                assert [r["payload"] for r in waited["responses"]][1] == {"text": f"echo: {c}:{n}"}

        async with open_stream(http, everything, auth) as stream:
            await conversation(0)  # the first conversation exists: its stream can open
            async with open_stream(http, first, auth) as dropped:
                seen = await dropped.take(3)
            await asyncio.gather(*(conversation(c) for c in range(1, CONVERSATIONS)))
            total = CONVERSATIONS * PER_CONVERSATION * 3
            streamed = await stream.take(total, timeout=30)
        resume = {**auth, "Last-Event-ID": seen[-1].id}
        again = f"{b.url}/webhooks/{integration_id}/conversations/{conversations[0]}/events"
        async with open_stream(http, again, resume) as resumed:
            rest = await resumed.take(PER_CONVERSATION * 3 - 3)

        histories = {
            conv: await _history(http, b.url, integration_id, conv, auth) for conv in conversations
        }

        async def delivered() -> bool:
            conv = conversations[-1]
            items = await _history(http, a.url, integration_id, conv, auth)
            return all(i["delivery"]["state"] == "delivered" for i in items if "delivery" in i)

        await eventually(delivered, timeout=30, interval=0.2)

    # The conversation's stream, dropped and resumed on another ingress: its history exactly.
    assert [e.id for e in seen + rest] == [i["id"] for i in histories[conversations[0]]]
    # The integration's stream: every item once, each conversation's in its history's order.
    assert len({e.id for e in streamed}) == total
    for conv, items in histories.items():
        assert len(items) == PER_CONVERSATION * 3
        assert [e.id for e in _of(streamed, conv)] == [i["id"] for i in items]
        directions = [i["direction"] for i in items]
        assert directions == ["incoming", "outgoing", "outgoing"] * PER_CONVERSATION


def _of(events: list[Event], conversation: str) -> list[Event]:
    return [e for e in events if e.item["conversationId"] == conversation]


async def _history(
    http: aiohttp.ClientSession, base: str, integration_id: str, conv: str, auth: dict[str, str]
) -> list[dict[str, Any]]:
    url = f"{base}/webhooks/{integration_id}/conversations/{conv}/messages"
    async with http.get(url, headers=auth) as answer:
        assert answer.status == 200, await answer.text()
        items: list[dict[str, Any]] = (await answer.json())["messages"]
        return items
