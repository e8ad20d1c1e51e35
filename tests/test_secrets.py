"""No log line and no error body ever holds a token or a signing secret.

A real `relay run` (ingress, bot worker and delivery worker in one process, logging JSON on
stdout) gets distinctive tokens through every failing path: wrong and malformed
`Authorization`, tokens in the query string and in the path, headers and request lines over
the limit, the bot push API and the Bot Framework connector with forged tokens, and webhook
deliveries the back end answers 500 then 400 (signed with a distinctive secret). Then every
log line, every error body and every error header is searched for them.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import aiohttp
import pytest
from aiohttp import web

from relay import admin
from relay.auth import reply_token
from relay.settings import Settings
from relay.store import SqlStore
from tests.helpers import eventually, message, until_ready
from tests.test_bad_input import Service, raw_request, start_service
from tests.test_cli import relay

MARK = "SECRETCANARY"
# base64 of 27 bytes, so it signs like any whsec_ secret
SIGNING_SECRET = f"whsec_{MARK}{MARK}{MARK}"
LOOPBACK = {"RELAY_ALLOWED_ENDPOINT_NETWORKS": "127.0.0.0/8"}


def canary(n: int | str) -> str:
    return f"tok_{MARK}_{n}"


@dataclass
class BackEnd:
    """The integration's response endpoint: 500 to the first deliveries, then 400."""

    url: str
    received: list[dict[str, str]] = field(default_factory=list)


@pytest.fixture
async def back_end() -> AsyncIterator[BackEnd]:
    got: list[dict[str, str]] = []

    async def handle(request: web.Request) -> web.Response:
        got.append(dict(request.headers))
        status = 500 if len(got) <= 2 else 400
        # an endpoint that echoes what it was sent: the relay must not log it
        return web.json_response({"echo": dict(request.headers)}, status=status)

    app = web.Application()
    app.router.add_post("/hook", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    # the back end's own credential in its URL is a secret too
    yield BackEnd(f"http://127.0.0.1:{port}/hook?token={canary('in-url')}", got)
    await runner.cleanup()


@dataclass
class Secrets:
    integration_id: str
    token: str
    bot_token: str
    conversation_id: str = ""
    bot_secret: str = ""  # signs reply tokens
    reply_token: str = ""

    def all(self) -> list[str]:
        """Everything that must never be logged or echoed."""
        found = [MARK, self.token, self.bot_token, SIGNING_SECRET.removeprefix("whsec_")]
        return found + [secret for secret in (self.bot_secret, self.reply_token) if secret]


@dataclass
class Seen:
    """What the relay answered to the failing requests."""

    answers: list[tuple[str, int, str]] = field(default_factory=list)

    def add(self, case: str, status: int, headers: dict[str, str], body: str) -> None:
        assert status >= 400, (case, status, body)
        error = json.loads(body)["error"]
        assert set(error) == {"code", "message", "details"}, case
        shown = " ".join(f"{k}: {v}" for k, v in headers.items() if k.lower() != "date")
        self.answers.append((case, status, f"{shown}\n{body}"))


async def call(
    http: aiohttp.ClientSession,
    seen: Seen,
    case: str,
    url: str,
    headers: dict[str, str] | None = None,
    body: bytes = b"{}",
    method: str = "POST",
) -> None:
    async with http.request(method, url, data=body, headers=headers or {}) as response:
        seen.add(case, response.status, dict(response.headers), await response.text())


async def failing_webhook_calls(
    http: aiohttp.ClientSession, base: str, secrets: Secrets, seen: Seen
) -> None:
    url = f"{base}/webhooks/{secrets.integration_id}"
    body = json.dumps(message("x")).encode()
    for n, header in enumerate(
        [
            f"Bearer {canary(1)}",
            f"Bearer {canary(2)} extra",
            f"Basic {canary(3)}",
            canary(4),
            f"Bearer {secrets.bot_token}",  # a real token of the wrong kind
        ]
    ):
        await call(http, seen, f"authorization {n}", url, {"Authorization": header}, body)
    await call(http, seen, "token in query", f"{url}?token={canary(5)}&access_token={canary(6)}")
    await call(http, seen, "token as integration id", f"{base}/webhooks/{canary(7)}")
    await call(http, seen, "unknown route", f"{base}/{canary(8)}/x")
    real = {"Authorization": f"Bearer {secrets.token}"}
    for case, bad in [
        ("not json", f'{{"text": "{canary(9)}", oops'.encode()),
        ("not finite", json.dumps(message("y", text=canary(10), payload={"n": "@"})).encode()),
        ("too long", json.dumps(message("z", userId=canary(11) * 30)).encode()),
        ("NUL", json.dumps(message("n", text=f"{canary(12)}\x00")).encode()),
    ]:
        await call(http, seen, case, url, real, bad.replace(b'"@"', b"1e400"))


async def failing_bot_calls(
    http: aiohttp.ClientSession, base: str, secrets: Secrets, seen: Seen
) -> None:
    push = f"{base}/bot/conversations/{secrets.conversation_id}/messages"
    body = json.dumps({"type": "text", "payload": {"text": "hi"}}).encode()
    forged_reply = f"rlyr_{MARK}.{MARK}"
    for n, token in enumerate([canary(20), secrets.token, forged_reply]):
        await call(http, seen, f"push {n}", push, {"Authorization": f"Bearer {token}"}, body)
    await call(
        http,
        seen,
        "push to an unknown conversation",
        f"{base}/bot/conversations/{canary(21)}/messages",
        {"Authorization": f"Bearer {secrets.bot_token}"},
        body,
    )
    activities = f"v3/conversations/{secrets.conversation_id}/activities"
    activity = json.dumps({"type": "message", "text": "hi"}).encode()
    for n, token in enumerate([canary(22), forged_reply]):
        url = f"{base}/botframework/{token}/{activities}"
        await call(http, seen, f"connector {n}", url, body=activity)
    # a real reply token with a bad body: the token is in the path of a 400
    url = f"{base}/botframework/{secrets.reply_token}/{activities}/a"
    await call(http, seen, "connector bad body", url, body=b'{"type": 1e400}', method="PUT")


async def over_the_limit(port: int, secrets: Secrets, seen: Seen) -> None:
    long = "x" * 9000
    for case, raw in [
        ("header", f"GET /healthz HTTP/1.1\r\nAuthorization: Bearer {canary(30)}{long}\r\n\r\n"),
        ("real token", f"GET /healthz HTTP/1.1\r\nX-A: {secrets.token}{long}\r\n\r\n"),
        ("request line", f"GET /webhooks/x?token={canary(31)}{long} HTTP/1.1\r\n\r\n"),
    ]:
        answer = await raw_request(port, raw)
        seen.add(case, answer.status, answer.headers, answer.body.decode())


async def make_secrets(store: SqlStore, settings: Settings, back_end: BackEnd) -> Secrets:
    record = await store.create_integration("secrets", back_end.url, SIGNING_SECRET)
    token, _ = await admin.create_token(store, record.id, "integration")
    bot_token, _ = await admin.create_token(store, record.id, "bot")
    return Secrets(record.id, token, bot_token)


def leaks(text: str, secrets: Secrets) -> list[str]:
    return [secret for secret in secrets.all() if secret in text]


async def deliveries_failed(service: Service) -> bool:
    logged = [json.loads(line) for line in service.lines if line.startswith("{")]
    statuses = [line.get("status") for line in logged if line["event"] == "delivery_attempt"]
    return statuses.count(500) >= 2 and statuses.count(400) >= 2


async def test_no_log_line_or_error_body_holds_a_token_or_the_signing_secret(
    settings: Settings, store: SqlStore, back_end: BackEnd
):
    secrets = await make_secrets(store, settings, back_end)
    seen = Seen()
    env = {
        **LOOPBACK,
        "RELAY_DELIVERY_RETRY_SCHEDULE": "0,0.2,0.2,0.2",
        # the most verbose level: libraries' debug lines are searched too
        "RELAY_LOG_LEVEL": "debug",
    }
    async with start_service(settings, "run", env) as service, aiohttp.ClientSession() as http:
        base = f"http://127.0.0.1:{service.port}"
        await until_ready(http, base)
        async with http.post(
            f"{base}/webhooks/{secrets.integration_id}",
            json=message(1),
            headers={"Authorization": f"Bearer {secrets.token}"},
        ) as accepted:
            assert accepted.status == 200
            secrets.conversation_id = (await accepted.json())["conversation"]["id"]
        secrets.bot_secret = await store.bot_secret(secrets.integration_id)
        secrets.reply_token = reply_token(
            secrets.bot_secret, secrets.conversation_id, int(time.time()) + 3600
        )
        await failing_webhook_calls(http, base, secrets, seen)
        await failing_bot_calls(http, base, secrets, seen)
        await over_the_limit(service.port, secrets, seen)
        # the echo bot's two replies: each answered 500, then 400 (dead-lettered)
        await eventually(lambda: deliveries_failed(service), timeout=30, interval=0.1)

    assert all("webhook-signature" in headers for headers in back_end.received)
    output = "".join(service.lines)
    assert service.process.returncode == 0, output
    logged = [json.loads(line) for line in service.lines if line.startswith("{")]
    statuses = {line.get("status") for line in logged if line["event"] == "http_request"}
    assert {400, 401, 404} <= statuses  # the failing paths did run and were logged
    assert [line for line in logged if line["event"] == "bad_http_request"]
    leaked = [line for line in service.lines if leaks(line, secrets)]
    assert leaked == [], leaked
    echoed = [(case, text) for case, _, text in seen.answers if leaks(text, secrets)]
    assert echoed == [], echoed
    assert {status for _, status, _ in seen.answers} >= {400, 401, 404, 431}


async def test_a_refused_endpoint_check_shows_neither_secrets_nor_credentials(
    settings: Settings, back_end: BackEnd
):
    url = back_end.url.replace("://", f"://user:{canary('password')}@")
    run = await relay(
        settings, "integrations", "create", "--name", "n", "--response-url", url, env=LOOPBACK
    )
    assert run.code == 1
    assert "answered 500" in run.err
    assert MARK not in run.err
    assert "whsec_" not in run.err
    assert run.out == ""
