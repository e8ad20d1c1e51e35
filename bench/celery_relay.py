"""The second yardstick of `bench.e2e`: the Celery relay a user writes in an afternoon.

An aiohttp ingress takes the back end's `POST /webhooks/{integrationId}` (Relay's body:
userId, messageId, conversationId, type, text), checks the bearer token and publishes a
Celery task with a publisher confirm on a durable quorum queue; a Celery prefork worker
(8 processes, late acks) runs the bot on it and POSTs each reply with `requests` to the
back end's response URL, in the body Relay's webhooks have, retrying with Celery's
autoretry (exponential back-off) while the POST fails. One hop, nothing stored: no dedupe
of a message posted twice, no order within a conversation (8 processes take its messages
in parallel), no `sequence` in the replies, a reply's `webhook-id` is its task's id (the
same on every retry). The bot is the bench's `one-reply` (`bench.bots.one_reply`: one
response per message echoing the text) as a plain function.

Settings come from the environment (read at import, as the worker imports this module):

    BENCH_CELERY_AMQP_URL      the broker (default amqp://guest:guest@127.0.0.1:5672//)
    BENCH_CELERY_QUEUE         the queue, also its exchange and routing key (fresh per run)
    BENCH_CELERY_TOKEN         the bearer token the ingress accepts (ingress)
    BENCH_CELERY_RESPONSE_URL  where the worker POSTs the replies (worker)
    BENCH_CELERY_PREFETCH      the worker's prefetch multiplier (default 4, Celery's)

    python -m bench.celery_relay ingress --port 8080
    celery --quiet -A bench.celery_relay worker --pool prefork --concurrency 8 \\
        -Q "$BENCH_CELERY_QUEUE" --without-gossip --without-mingle --without-heartbeat \\
        -l warning

The queue's exchange is a topic exchange, as Celery's documentation asks of quorum queues:
the worker then sets up RabbitMQ-native delayed delivery (the shared `celery_delayed_*`
queues and exchanges) and a retry's countdown waits in the broker, not in the worker.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import hmac
import os
import warnings
from typing import Any

import requests
from aiohttp import web
from celery import Celery, Task
from celery.exceptions import SecurityWarning
from kombu import Exchange, Queue

AMQP_URL = os.environ.get("BENCH_CELERY_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")
QUEUE = os.environ.get("BENCH_CELERY_QUEUE", "bench-celery")
TOKEN = os.environ.get("BENCH_CELERY_TOKEN", "")
RESPONSE_URL = os.environ.get("BENCH_CELERY_RESPONSE_URL", "http://127.0.0.1:8090/hook")
PREFETCH = int(os.environ.get("BENCH_CELERY_PREFETCH", "4"))
FIELDS = ("userId", "messageId", "conversationId", "type", "text")
# The bench's machines run everything as root; the worker would say so on every start.
warnings.filterwarnings("ignore", category=SecurityWarning)

app = Celery("bench_celery_relay", broker=AMQP_URL, set_as_current=True)
app.conf.update(
    task_queues=[
        Queue(
            QUEUE,
            Exchange(QUEUE, type="topic"),
            routing_key=QUEUE,
            queue_arguments={"x-queue-type": "quorum"},
        )
    ],
    task_default_queue=QUEUE,
    task_default_exchange=QUEUE,
    task_default_exchange_type="topic",
    task_default_routing_key=QUEUE,
    # The ingress answers 200 only once the broker has the task.
    broker_transport_options={"confirm_publish": True},
    broker_connection_retry_on_startup=True,
    # At least once: a task is acked after it ran (redelivered if its process died).
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=PREFETCH,
    task_ignore_result=True,
    result_backend=None,
    # Not on the message's path: no pidbox queues left behind.
    worker_enable_remote_control=False,
)

# One per worker process, made before the fork but first used after it: each process
# keeps its own keep-alive connections.
session = requests.Session()


def one_reply(text: str) -> list[tuple[str, dict[str, Any]]]:
    """`bench.bots.one_reply` as a plain function: one text echoing the message."""
    return [("text", {"text": f"echo: {text}"})]


@app.task(
    name="bench.celery_relay.relay_message",  # not __main__'s when the ingress imports it
    bind=True,
    autoretry_for=(requests.RequestException,),
    retry_backoff=True,
    retry_kwargs={"max_retries": 10},
)
def relay_message(self: Task[Any, Any], message: dict[str, str]) -> None:
    """Run the bot on one message and POST each reply to the back end."""
    for n, (kind, payload) in enumerate(one_reply(message["text"])):
        body = {
            "type": kind,
            "payload": payload,
            "conversationId": message["conversationId"],
            "botpressUserId": message["userId"],
            "botpressMessageId": message["messageId"],
            "botpressConversationId": message["conversationId"],
        }
        response = session.post(
            RESPONSE_URL,
            json=body,
            headers={"webhook-id": f"{self.request.id}-{n}"},
            timeout=10,
        )
        response.raise_for_status()


# ---------------------------------------------------------------------------- the ingress


async def receive(request: web.Request) -> web.Response:
    """`POST /webhooks/{integrationId}`: check the token and the body, publish the task."""
    given = request.headers.get("Authorization", "").removeprefix("Bearer ")
    if not TOKEN or not hmac.compare_digest(given.encode(), TOKEN.encode()):
        return web.json_response({"error": "unauthorized"}, status=401)
    try:
        message = await request.json()
    except ValueError:
        return web.json_response({"error": "not JSON"}, status=400)
    if not isinstance(message, dict) or not all(
        isinstance(message.get(name), str) for name in FIELDS
    ):
        return web.json_response({"error": f"expected strings {', '.join(FIELDS)}"}, status=400)
    chosen = {name: message[name] for name in FIELDS}
    # kombu's publish blocks until the broker confirms: in a thread, off the event loop.
    publish = functools.partial(relay_message.apply_async, (chosen,))
    result = await asyncio.get_running_loop().run_in_executor(None, publish)
    return web.json_response({"messageId": chosen["messageId"], "taskId": result.id})


async def ready(request: web.Request) -> web.Response:
    """`GET /readyz`: serving."""
    return web.json_response({"ready": True})


def create_app() -> web.Application:
    """The ingress's routes."""
    ingress = web.Application()
    ingress.router.add_post("/webhooks/{integration_id}", receive)
    ingress.router.add_get("/readyz", ready)
    return ingress


def main(argv: list[str] | None = None) -> None:
    """`ingress --port P`: serve until SIGTERM or SIGINT (the worker runs under `celery`)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("role", choices=["ingress"])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    # No access log: Relay's services log at warning level in the bench, too.
    web.run_app(
        create_app(), host=args.host, port=args.port, access_log=None, print=None, backlog=1024
    )


if __name__ == "__main__":
    main()
