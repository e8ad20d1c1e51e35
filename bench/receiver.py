"""The back end's response endpoint for the end-to-end benchmark, run as its own process.

Answers every webhook `200` at once and records its arrival time (`time.monotonic()`,
which on Linux is one system-wide clock, so the client process can subtract its own send
times) with the webhook id and the body. Signatures are not checked: that is the back
end's cost, not Relay's. The benchmark reads what arrived from two control routes:

    GET /_count               {"received": n}
    GET /_records?since=i     [[arrival, webhook_id, type, text, conversationId, sequence], ...]

    python -m bench.receiver --port 8090
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

from aiohttp import web

from relay.service.runner import wait_for_stop

RECORDS = web.AppKey("records", list[tuple[float, str, bytes]])


async def webhook(request: web.Request) -> web.Response:
    """Take one response: note when it came, keep it, answer 200."""
    arrived = time.monotonic()
    body = await request.read()
    request.app[RECORDS].append((arrived, request.headers.get("webhook-id", ""), body))
    return web.Response()


async def count(request: web.Request) -> web.Response:
    """How many webhooks arrived so far."""
    return web.json_response({"received": len(request.app[RECORDS])})


async def records(request: web.Request) -> web.Response:
    """The webhooks from the `since`-th on, parsed."""
    since = int(request.query.get("since", "0"))
    rows = [_row(*record) for record in request.app[RECORDS][since:]]
    return web.json_response(rows)


def _row(arrived: float, webhook_id: str, body: bytes) -> list[Any]:
    try:
        data = json.loads(body)
    except ValueError:
        return [arrived, webhook_id, "invalid", "", "", 0]
    payload = data.get("payload")
    text = payload.get("text", "") if isinstance(payload, dict) else ""
    return [
        arrived,
        webhook_id,
        data.get("type", ""),
        text,
        data.get("conversationId", ""),
        data.get("sequence", 0),
    ]


def create_app() -> web.Application:
    """The receiver: any POST path is a webhook; GET /_count and /_records read them."""
    app = web.Application()
    app[RECORDS] = []
    app.router.add_get("/_count", count)
    app.router.add_get("/_records", records)
    app.router.add_post("/{tail:.*}", webhook)
    return app


async def main(port: int) -> None:
    """Serve until SIGTERM or SIGINT."""
    await serve_until_stopped(create_app(), port)


async def serve_until_stopped(app: web.Application, port: int) -> None:
    """Serve `app` on 127.0.0.1:`port` until SIGTERM or SIGINT (no access log: its cost is
    not the measured path's)."""
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", port, backlog=1024).start()
        await wait_for_stop()
    finally:
        await runner.cleanup()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    asyncio.run(main(parser.parse_args().port))
