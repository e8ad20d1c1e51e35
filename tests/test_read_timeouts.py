"""Slow clients hold no connection for long: a real `relay ingress` (as run from the command
line, with 1 s read timeouts) against raw sockets. Half a request's headers, then nothing
(slowloris): the connection is closed within the timeout. A body that stops half way: a
JSON 408. A kept-alive connection between requests is left to the keep-alive timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from relay.settings import Settings
from relay.store import open_store
from tests.conftest import BOT_RETRY_DELAYS, DELIVERY_DELAY_QUEUES, PARTITIONS
from tests.helpers import eventually, make_integration
from tests.test_bad_input import Service, answers_health, start_service

TIMEOUT = 1.0
KEEPALIVE = 3.0  # more than twice TIMEOUT: a kept-alive connection outlives a header timeout


def sqlite_settings(amqp_url: str, queue_prefix: str, folder: Path) -> Settings:
    """The module's settings on one store: for what is tested below the store."""
    return Settings(
        _env_file=None,  # type: ignore[call-arg]
        amqp_url=amqp_url,
        database_url=f"sqlite:///{folder / 'relay.db'}",
        queue_prefix=queue_prefix,
        partitions=PARTITIONS,
        bot_retry_delays=list(BOT_RETRY_DELAYS),
        delivery_delay_queues=list(DELIVERY_DELAY_QUEUES),
    )


@pytest.fixture(scope="module")
def quick(amqp_url: str, queue_prefix: str, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return sqlite_settings(amqp_url, queue_prefix, tmp_path_factory.mktemp("db"))


@pytest.fixture(scope="module")
async def integration(quick: Settings) -> tuple[str, str]:
    store = await open_store(quick.database_url)
    try:
        return await make_integration(store, quick)
    finally:
        await store.close()


@pytest.fixture(scope="module")
async def service(quick: Settings, integration: tuple[str, str]) -> AsyncIterator[Service]:
    env = {
        "RELAY_HEADER_READ_TIMEOUT": str(TIMEOUT),
        "RELAY_BODY_READ_TIMEOUT": str(TIMEOUT),
        "RELAY_KEEPALIVE_TIMEOUT": str(KEEPALIVE),
    }
    async with start_service(quick, "ingress", env) as running:
        await eventually(lambda: answers_health(running.port), timeout=30, interval=0.1)
        yield running


@contextlib.asynccontextmanager
async def connection(port: int) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        yield reader, writer
    finally:
        writer.close()


async def closed_within(reader: asyncio.StreamReader, seconds: float) -> bytes:
    """What the server sends until it closes the connection (fails if it does not)."""
    async with asyncio.timeout(seconds):
        return await reader.read()


async def test_half_the_headers_then_nothing_is_disconnected_within_the_timeout(
    service: Service,
):
    loop = asyncio.get_running_loop()
    async with connection(service.port) as (reader, writer):
        writer.write(b"POST /webhooks/x HTTP/1.1\r\nHost: relay\r\nContent-Type: appl")
        await writer.drain()
        started = loop.time()
        assert await closed_within(reader, TIMEOUT + 2) == b""
        assert TIMEOUT - 0.2 <= loop.time() - started <= TIMEOUT + 2


async def test_headers_a_byte_at_a_time_do_not_reset_the_timeout(service: Service):
    loop = asyncio.get_running_loop()
    async with connection(service.port) as (reader, writer):
        started = loop.time()
        closed = asyncio.create_task(closed_within(reader, TIMEOUT + 3))
        for byte in b"GET /healthz HTTP/1.1\r\nHost: relay\r\nX-Slow: " + b"a" * 100:
            if closed.done():
                break
            writer.write(bytes([byte]))
            await asyncio.sleep(0.05)  # the slow client's pace, not a wait for the server
        assert await closed == b""
        assert loop.time() - started <= TIMEOUT + 2


async def test_a_connection_that_sends_nothing_is_closed(service: Service):
    async with connection(service.port) as (reader, _):
        assert await closed_within(reader, TIMEOUT + 2) == b""


async def test_a_body_that_stops_half_way_is_answered_408(
    service: Service, integration: tuple[str, str]
):
    loop = asyncio.get_running_loop()
    integration_id, token = integration
    async with connection(service.port) as (reader, writer):
        writer.write(
            f"POST /webhooks/{integration_id} HTTP/1.1\r\nHost: relay\r\n"
            f"Authorization: Bearer {token}\r\nContent-Type: application/json\r\n"
            'Content-Length: 100\r\n\r\n{"userId": '.encode()
        )
        await writer.drain()
        started = loop.time()
        data = await closed_within(reader, TIMEOUT + 3)
        assert loop.time() - started <= TIMEOUT + 2
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), data
    assert b"application/json" in head
    error = json.loads(body)["error"]
    assert error["code"] == "request_timeout"
    assert set(error) == {"code", "message", "details"}


async def test_a_body_that_keeps_coming_slowly_is_not_cut(
    service: Service, integration: tuple[str, str]
):
    """The body's bound is on its pauses: a large body on a slow link takes as long as it
    takes, as long as it keeps coming."""
    integration_id, token = integration
    body = json.dumps(
        {
            "userId": "u",
            "messageId": "slow-1",
            "conversationId": "c",
            "type": "text",
            "text": "sent slowly, in pieces",
        }
    ).encode()
    pieces = [body[i : i + 20] for i in range(0, len(body), 20)]
    assert len(pieces) * TIMEOUT / 2 > TIMEOUT * 2  # longer in all than the bound
    async with connection(service.port) as (reader, writer):
        writer.write(
            f"POST /webhooks/{integration_id} HTTP/1.1\r\nHost: relay\r\n"
            f"Authorization: Bearer {token}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
        )
        for piece in pieces:
            await asyncio.sleep(TIMEOUT / 2)
            writer.write(piece)
            await writer.drain()
        answer = await closed_within(reader, 10)
    assert answer.startswith(b"HTTP/1.1 200"), answer


async def test_a_partial_head_behind_a_whole_request_is_bounded_by_the_keep_alive(
    service: Service,
):
    """A request and the first byte of the next in one packet: no head timer can see that
    byte, and the keep-alive bound closes the connection."""
    loop = asyncio.get_running_loop()
    async with connection(service.port) as (reader, writer):
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: relay\r\n\r\nG")
        started = loop.time()
        data = await closed_within(reader, KEEPALIVE + 3)
        assert loop.time() - started <= KEEPALIVE + 2
    assert data.startswith(b"HTTP/1.1 200")


async def test_a_kept_alive_connection_waits_for_its_next_request(service: Service):
    """Between requests the silence is the keep-alive's to bound, not the header timeout's."""
    request = b"GET /healthz HTTP/1.1\r\nHost: relay\r\n\r\n"
    async with connection(service.port) as (reader, writer):
        writer.write(request)
        assert (await reader.readuntil(b'"ok"}')).startswith(b"HTTP/1.1 200")
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(TIMEOUT * 2):
                await reader.read(1)  # nothing comes, and the connection stays open
        writer.write(request)
        assert (await reader.readuntil(b'"ok"}')).startswith(b"HTTP/1.1 200")


async def test_timeouts_are_counted(service: Service):
    async with connection(service.port) as (reader, writer):
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: relay\r\nConnection: close\r\n\r\n")
        text = (await closed_within(reader, 10)).decode()
    assert 'relay_http_read_timeouts_total{phase="headers"}' in text
    assert 'relay_http_read_timeouts_total{phase="body"} 1.0' in text


async def test_no_timeout_is_logged_as_an_error(service: Service):
    """Slow clients are an everyday thing: counted, never an error line or a traceback."""
    output = "".join(service.lines)
    assert "Traceback" not in output
    logged = [json.loads(line) for line in service.lines if line.startswith("{")]
    assert [line for line in logged if line["level"] not in ("debug", "info", "warning")] == []
