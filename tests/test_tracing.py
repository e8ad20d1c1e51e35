"""One message followed through the logs: `relay run` (ingress, bot worker and delivery
worker in one process) writes JSON lines, and the ids a user greps for link them all."""

from __future__ import annotations

import asyncio
import json
import signal
from typing import Any

import aiohttp

from relay.settings import Settings
from relay.store import SqlStore
from tests.helpers import eventually, make_integration, message
from tests.receivers import Receiver
from tests.test_cli import RELAY, free_port, relay_env


async def test_one_message_can_be_followed_from_ingress_to_delivery_by_its_ids(
    settings: Settings, store: SqlStore, receiver: Receiver
):
    receiver.hits.clear()
    integration_id, token = await make_integration(
        store, settings, response_url=receiver.url("trace")
    )
    port = free_port()
    env = relay_env(
        settings,
        {
            "RELAY_HTTP_PORT": str(port),
            "RELAY_BOT_WORKER_PORT": "0",
            "RELAY_DELIVERY_WORKER_PORT": "0",
            "RELAY_LOG_LEVEL": "info",
            "RELAY_ALLOWED_ENDPOINT_NETWORKS": "127.0.0.0/8",
        },
    )
    process = await asyncio.create_subprocess_exec(
        *RELAY, "run", env=env, stdout=asyncio.subprocess.PIPE
    )
    try:
        async with aiohttp.ClientSession() as http:

            async def posted() -> dict[str, Any] | None:
                try:
                    async with http.post(
                        f"http://127.0.0.1:{port}/webhooks/{integration_id}",
                        json=message("trace", conversationId="trace"),
                        headers={"Authorization": f"Bearer {token}"},
                    ) as answer:
                        return await answer.json() if answer.status == 200 else None
                except aiohttp.ClientError:
                    return None

            answer = await eventually(posted, timeout=30, interval=0.2)

            async def both_delivered() -> bool:
                return len(receiver.at("trace")) >= 2

            await eventually(both_delivered, timeout=30)
    finally:
        process.send_signal(signal.SIGTERM)
        out, _ = await asyncio.wait_for(process.communicate(), 30)
    lines = [json.loads(line) for line in out.decode().splitlines() if line.startswith("{")]
    conversation = answer["conversation"]["id"]
    message_id = answer["message"]["id"]
    about = [line for line in lines if line.get("conversation_id") == conversation]
    events = {line["event"] for line in about}
    # grep <conversation id>: the request, the bot's turn, each response queued and delivered.
    assert {"http_request", "message_settled", "response_queued", "delivery_attempt"} <= events
    # grep <message id>: the request and the bot's turn and the responses it queued...
    turn = [line for line in about if line.get("message_id") == message_id]
    assert {"http_request", "message_settled", "response_queued"} <= {t["event"] for t in turn}
    # ...whose response ids lead to their deliveries (delivery id = msg_<response id>).
    responses = {t["response_id"] for t in turn if t["event"] == "response_queued"}
    delivered = {
        line["response_id"]
        for line in about
        if line["event"] == "delivery_attempt" and line.get("status") == 200
    }
    assert len(responses) == 2
    assert responses == delivered
