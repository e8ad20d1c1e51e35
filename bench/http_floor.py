"""The HTTP floor: what aiohttp alone spends to relay a message, no broker, no store.

A client posts N messages on `concurrency` keep-alive connections to a `forward` process
(aiohttp server, uvloop, as the ingress) that POSTs each body on to the benchmark's
receiver (aiohttp client, as the delivery worker) before answering. Together with the raw
two-hop chain (`bench.raw`, the broker's least per message) it bounds from below what any
aiohttp relay keeping at-least-once spends per message on this machine: the HTTP in, the
two hops through the broker, the HTTP out. Reported: forwarded msgs/s and CPU milliseconds
per message of the client, the forwarder and the receiver.

    python -m bench.http_floor [--messages 5000] [--concurrency 32]
    python -m bench.http_floor forward --port P --target URL     (the forwarder itself)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field

import aiohttp
import uvloop
from aiohttp import web

from bench.common import Service, free_port, process_cpu_seconds, spawn
from bench.receiver import serve_until_stopped

# The size of an inbound message as a back end posts it (the e2e benchmark's messages).
BODY = json.dumps(
    {
        "userId": "u" * 36,
        "messageId": "m" * 36,
        "conversationId": "c" * 36,
        "type": "text",
        "text": "hello there",
        "payload": {"type": "text", "text": "hello there"},
    }
).encode()


@dataclass
class FloorResult:
    """Forwarded msgs/s and CPU ms per message of each process."""

    messages: int
    concurrency: int
    per_second: float
    cpu_ms_per_message: dict[str, float] = field(default_factory=dict)


async def forward(port: int, target: str) -> None:
    """Serve POST /m: send the body on to `target`, then answer 200."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64)) as http:

        async def handle(request: web.Request) -> web.Response:
            body = await request.read()
            headers = {"Content-Type": "application/json"}
            async with http.post(target, data=body, headers=headers) as response:
                await response.read()
            return web.json_response({"status": "accepted"})

        app = web.Application()
        app.router.add_post("/m", handle)
        app.router.add_get("/readyz", lambda _: _ok())
        await serve_until_stopped(app, port)


async def _ok() -> web.Response:
    return web.Response()


@contextlib.asynccontextmanager
async def _processes() -> AsyncIterator[tuple[Service, Service]]:
    receiver_port, forward_port = free_port(), free_port()
    receiver_argv = [sys.executable, "-m", "bench.receiver", f"--port={receiver_port}"]
    target = f"http://127.0.0.1:{receiver_port}/hook"
    forward_argv = [sys.executable, "-m", "bench.http_floor", "forward"]
    forward_argv += [f"--port={forward_port}", f"--target={target}"]
    async with (
        spawn("receiver", receiver_argv, receiver_port, ready="/_count") as receiver,
        spawn("forward", forward_argv, forward_port) as forwarder,
    ):
        yield forwarder, receiver


async def http_floor(messages: int, concurrency: int) -> FloorResult:
    """Relay `messages` through the forwarder; the rate at the receiver and the CPU used."""
    async with (
        _processes() as (forwarder, receiver),
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as http,
    ):
        url = f"{forwarder.base_url}/m"
        numbers = iter(range(messages))

        async def sender() -> None:
            for _ in numbers:
                async with http.post(url, data=BODY) as response:
                    await response.read()
                    response.raise_for_status()

        pids = {"client": os.getpid(), "forward": forwarder.pid, "receiver": receiver.pid}
        before = {name: process_cpu_seconds(pid) for name, pid in pids.items()}
        started = time.monotonic()
        await asyncio.gather(*[sender() for _ in range(concurrency)])
        async with http.get(f"{receiver.base_url}/_count") as response:
            received = (await response.json())["received"]
        seconds = time.monotonic() - started
        used = {name: process_cpu_seconds(pid) - before[name] for name, pid in pids.items()}
    if received != messages:
        raise RuntimeError(f"the receiver got {received} of {messages}")
    return FloorResult(
        messages,
        concurrency,
        round(messages / seconds, 1),
        {name: round(s * 1000 / messages, 3) for name, s in used.items()},
    )


def main() -> None:
    """Measure, or be the forwarder."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("role", nargs="?", choices=["measure", "forward"], default="measure")
    parser.add_argument("--messages", type=int, default=5_000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--port", type=int)
    parser.add_argument("--target")
    parser.add_argument("--json", action="store_true")
    options = parser.parse_args()
    if options.role == "forward":
        uvloop.run(forward(options.port, options.target))
        return
    result = asyncio.run(http_floor(options.messages, options.concurrency))
    if options.json:
        print(json.dumps(asdict(result)))
        return
    cpu = ", ".join(f"{name} {ms}" for name, ms in result.cpu_ms_per_message.items())
    print(
        f"HTTP floor: {result.per_second} msgs/s (client -> aiohttp forwarder -> receiver,"
        f" {result.concurrency} connections, {result.messages} messages); CPU ms/msg: {cpu}"
    )


if __name__ == "__main__":
    main()
