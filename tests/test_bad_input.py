"""Bad input anywhere gets a clear 4xx JSON error, echoes nothing and writes nothing.

Numbers no float can hold (`1e400`, `NaN`, `Infinity`) in every JSON-accepting route; header
bytes that are not UTF-8; a 405 that says what is allowed; and what aiohttp answers by itself
(a request line or header over the limit, garbage) on every HTTP service, run as `relay`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from relay import admin
from relay.auth import reply_token
from relay.errors import InvalidBody
from relay.ingress.body import parse_json_object
from relay.settings import Settings
from relay.store import SqlStore
from tests.helpers import Ingress, Queues, eventually, make_integration, message
from tests.test_cli import RELAY, free_port, relay_env
from tests.test_ingress import rows_of

CANARY = "tok_SECRETCANARY_bad_input"
NOT_FINITE = ["1e400", "-1e400", "NaN", "Infinity", "-Infinity", "1E+999"]


@pytest.mark.parametrize("number", NOT_FINITE)
def test_a_number_no_float_can_hold_is_named_by_its_path(number: str) -> None:
    raw = '{"a": 1, "payload": {"ok": 1.5, "a": {"b": [0, 1, N]}}, "z": [N]}'.replace("N", number)
    with pytest.raises(InvalidBody) as caught:
        parse_json_object(raw.encode())
    assert caught.value.details == [
        {"field": "payload.a.b.2", "message": "must be a finite number"},
        {"field": "z.0", "message": "must be a finite number"},
    ]


def test_finite_numbers_are_kept_as_they_are() -> None:
    raw = b'{"tiny": 1e-400, "big": 1.7e308, "int": 18446744073709551615, "f": -0.5}'
    assert parse_json_object(raw) == {
        "tiny": 0.0,
        "big": 1.7e308,
        "int": 2**64 - 1,
        "f": -0.5,
    }


def test_a_number_out_of_range_under_a_repeated_key_is_gone() -> None:
    # JSON objects keep the last of repeated keys: the body as read holds no such number.
    assert parse_json_object(b'{"a": 1e400, "a": 1}') == {"a": 1}


def test_a_body_that_is_only_a_number_is_not_an_object() -> None:
    with pytest.raises(InvalidBody) as caught:
        parse_json_object(b"1e400")
    assert caught.value.message == "the body must be a JSON object"


async def outgoing_count(store: SqlStore, conversation_id: str) -> int:
    async with store.driver.connection() as conn:
        rows = await conn.fetchall(
            "SELECT id FROM messages WHERE conversation_id = ? AND direction = 'outgoing'",
            conversation_id,
        )
    return len(rows)


@dataclass
class Conversation:
    integration_id: str
    token: str
    id: str
    bot_token: str
    reply_token: str


async def conversation(ingress: Ingress, store: SqlStore, settings: Settings) -> Conversation:
    """A conversation made by a first message, with a bot token and a reply token for it."""
    integration_id, token = await make_integration(store, settings)
    status, bundle = await ingress.post(integration_id, token, message(1))
    assert status == 200, bundle
    conversation_id = bundle["conversation"]["id"]
    bot_token, _ = await admin.create_token(store, integration_id, "bot")
    secret = await store.bot_secret(integration_id)
    reply = reply_token(secret, conversation_id, int(time.time()) + 3600)
    return Conversation(integration_id, token, conversation_id, bot_token, reply)


async def post_raw(
    ingress: Ingress, path: str, raw: bytes, headers: dict[str, str], method: str = "POST"
) -> tuple[int, dict[str, Any]]:
    async with ingress.http.request(
        method, f"{ingress.url}{path}", data=raw, headers=headers
    ) as response:
        assert response.content_type == "application/json"
        return response.status, await response.json()


def bad_number_body(template: dict[str, Any], number: str, where: str = "payload") -> bytes:
    """`template` as JSON with `<where>.a.b[2]` holding `number` (json.dumps cannot)."""
    body = json.dumps({**template, where: {**template[where], "a": {"b": [0, 1, "@"]}}})
    return body.replace('"@"', number).encode()


def assert_names_the_field(status: int, answer: dict[str, Any], field_: str) -> None:
    assert status == 400, answer
    assert answer["error"]["code"] == "invalid_body"
    assert {"field": field_, "message": "must be a finite number"} in answer["error"]["details"]


@pytest.mark.parametrize("number", NOT_FINITE)
async def test_webhook_refuses_a_number_out_of_range_and_accepts_nothing(
    ingress: Ingress, store: SqlStore, settings: Settings, queues: Queues, number: str
):
    integration_id, token = await make_integration(store, settings)
    body = bad_number_body(message(1, payload={"text": "hi"}), number)
    status, answer = await post_raw(
        ingress, f"/webhooks/{integration_id}", body, {"Authorization": f"Bearer {token}"}
    )
    assert_names_the_field(status, answer, "payload.a.b.2")
    assert await rows_of(store, integration_id) == {"users": 0, "conversations": 0, "messages": 0}
    assert await queues.take("inbound") == []
    # not only at the payload: any field
    status, answer = await post_raw(
        ingress,
        f"/webhooks/{integration_id}",
        json.dumps(message(2)).replace('"user-1"', number).encode(),
        {"Authorization": f"Bearer {token}"},
    )
    assert_names_the_field(status, answer, "userId")


@pytest.mark.parametrize("number", ["1e400", "NaN", "-Infinity"])
async def test_push_api_refuses_a_number_out_of_range_and_stores_nothing(
    ingress: Ingress, store: SqlStore, settings: Settings, queues: Queues, number: str
):
    talk = await conversation(ingress, store, settings)
    body = bad_number_body({"type": "custom", "payload": {}}, number)
    status, answer = await post_raw(
        ingress,
        f"/bot/conversations/{talk.id}/messages",
        body,
        {"Authorization": f"Bearer {talk.bot_token}", "Idempotency-Key": "k1"},
    )
    assert_names_the_field(status, answer, "payload.a.b.2")
    assert await outgoing_count(store, talk.id) == 0


@pytest.mark.parametrize("method", ["POST", "PUT"])
async def test_connector_refuses_a_number_out_of_range_and_stores_nothing(
    ingress: Ingress, store: SqlStore, settings: Settings, method: str
):
    talk = await conversation(ingress, store, settings)
    activity = {"type": "message", "text": "hi", "channelData": {}}
    body = bad_number_body(activity, "1e400", where="channelData")
    path = f"/botframework/{talk.reply_token}/v3/conversations/{talk.id}/activities/a1"
    status, answer = await post_raw(ingress, path, body, {}, method=method)
    assert_names_the_field(status, answer, "channelData.a.b.2")
    assert await outgoing_count(store, talk.id) == 0


async def test_header_bytes_that_are_not_utf8_are_a_4xx_not_a_crash(
    ingress: Ingress, store: SqlStore, settings: Settings
):
    # Byte 0xE9 ("é" in Latin-1) is not UTF-8: aiohttp reads it as a lone surrogate, which
    # could not be hashed (a token) or stored (an Idempotency-Key): a 500 before.
    talk = await conversation(ingress, store, settings)
    port = ingress.server.port
    assert port is not None
    push = f"/bot/conversations/{talk.id}/messages"
    body = '{"type": "text", "payload": {"text": "x"}}'

    def post(path: str, headers: str) -> str:
        return (
            f"POST {path} HTTP/1.1\r\nHost: h\r\nConnection: close\r\n{headers}"
            f"Content-Length: {len(body)}\r\n\r\n{body}"
        )

    for path in (f"/webhooks/{talk.integration_id}", push):
        answer = await raw_request(port, post(path, "Authorization: Bearer rly_caf\xe9\r\n"))
        assert answer.status == 401, answer
        assert json.loads(answer.body)["error"]["code"] == "unauthorized"
    for key in ("caf\xe9", "a\tb", "x" * 257):
        headers = f"Authorization: Bearer {talk.bot_token}\r\nIdempotency-Key: {key}\r\n"
        answer = await raw_request(port, post(push, headers))
        assert answer.status == 400, (key, answer)
        assert json.loads(answer.body)["error"]["details"][0]["field"] == "Idempotency-Key"
    assert await outgoing_count(store, talk.id) == 0


async def test_an_unknown_id_in_the_path_is_not_echoed(ingress: Ingress):
    for path in (f"/webhooks/{CANARY}", f"/bot/conversations/{CANARY}/messages"):
        status, answer = await post_raw(ingress, path, b"{}", {})
        assert (status, answer["error"]["code"]) == (404, "not_found")
        assert CANARY not in json.dumps(answer)


async def test_a_method_not_allowed_says_which_are(ingress: Ingress):
    for method, path, allowed in (
        ("GET", "/webhooks/x", {"POST"}),
        ("DELETE", "/healthz", {"GET", "HEAD"}),
        ("PATCH", "/bot/conversations/x/messages", {"POST"}),
    ):
        async with ingress.http.request(method, f"{ingress.url}{path}") as response:
            assert response.status == 405
            assert set(response.headers["Allow"].split(",")) == allowed
            assert response.content_type == "application/json"
            assert (await response.json())["error"]["code"] == "method_not_allowed"


# What aiohttp answers by itself, before the application runs, on every HTTP service.

LONG = "x" * 9000
LOW_LEVEL_CASES = {
    "header over the limit": (
        f"GET /healthz HTTP/1.1\r\nHost: h\r\nAuthorization: Bearer {CANARY}{LONG}\r\n\r\n",
        431,
    ),
    "request line over the limit": (f"GET /healthz?token={CANARY}{LONG} HTTP/1.1\r\n\r\n", 431),
    "too many headers": (
        "GET /healthz HTTP/1.1\r\n" + "".join(f"X-{n}: {CANARY}\r\n" for n in range(200)) + "\r\n",
        431,
    ),
    "not HTTP": (f"\x16\x03\x01 {CANARY}\r\n\r\n", 400),
    "bad header line": (f"GET /healthz HTTP/1.1\r\nHost: h\r\n{CANARY}\r\n\r\n", 400),
}


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes


async def raw_request(port: int, raw: str) -> Answer:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw.encode("latin-1"))
        await writer.drain()
        async with asyncio.timeout(10):
            data = await reader.read()  # the server closes the connection after an error
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    return Answer(int(status_line.split()[1]), headers, body)


@dataclass
class Service:
    process: asyncio.subprocess.Process
    port: int
    lines: list[str] = field(default_factory=list)


# Every service that serves HTTP, and the variable that sets its port.
SERVICES = {
    "ingress": "RELAY_HTTP_PORT",
    "bot-worker": "RELAY_BOT_WORKER_PORT",
    "delivery-worker": "RELAY_DELIVERY_WORKER_PORT",
    "run": "RELAY_HTTP_PORT",
}


@contextlib.asynccontextmanager
async def start_service(
    settings: Settings, role: str, env: dict[str, str] | None = None
) -> AsyncIterator[Service]:
    """`relay <role>` on a free port, its output (logs) collected; SIGTERM at the end."""
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        *RELAY,
        role,
        env=relay_env(settings, {**(env or {}), SERVICES[role]: str(port)}),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    service = Service(process, port)

    async def collect() -> None:
        assert process.stdout is not None
        async for line in process.stdout:
            service.lines.append(line.decode(errors="replace"))

    collecting = asyncio.create_task(collect())
    try:
        yield service
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
        await asyncio.wait_for(process.wait(), 30)
        await asyncio.wait_for(collecting, 10)


async def answers_health(port: int) -> bool:
    try:
        answer = await raw_request(
            port, "GET /healthz HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n"
        )
    except OSError:
        return False
    return answer.status == 200


@pytest.mark.parametrize("role", list(SERVICES))
async def test_every_service_answers_what_aiohttp_refuses_as_json(settings: Settings, role: str):
    async with start_service(settings, role) as service:
        await eventually(lambda: answers_health(service.port), timeout=30, interval=0.1)
        for case, (raw, status) in LOW_LEVEL_CASES.items():
            answer = await raw_request(service.port, raw)
            assert answer.status == status, (case, answer)
            assert answer.headers["content-type"].startswith("application/json"), case
            error = json.loads(answer.body)["error"]
            assert set(error) == {"code", "message", "details"}, case
            assert CANARY not in answer.body.decode(errors="replace"), case
        allowed = await raw_request(
            service.port, "DELETE /healthz HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n"
        )
        assert allowed.status == 405
        assert "GET" in allowed.headers["allow"]
    output = "".join(service.lines)
    assert service.process.returncode == 0, output
    logged = [json.loads(line) for line in service.lines if line.startswith("{")]
    # refused quietly: no error-level line, no traceback, nothing of the request
    assert [line for line in logged if line["level"] not in ("debug", "info", "warning")] == []
    assert "Traceback" not in output
    assert CANARY not in output
    refused = [line for line in logged if line["event"] == "bad_http_request"]
    assert len(refused) == len(LOW_LEVEL_CASES)
