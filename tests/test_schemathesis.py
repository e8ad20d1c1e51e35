"""Schemathesis against the served `/openapi.json`: the document describes what the server does.

A real ingress on 127.0.0.1 (the production runner, so even aiohttp's own error answers are
the ones a client gets), a real integration, integration token, bot token, conversation and
reply token, so generated requests reach the handlers instead of stopping at 401/404. Every
check runs — not a server error, status codes, content types, response schemas and headers,
valid data accepted, invalid data refused, 405 with `Allow`, auth enforced — in every phase
(examples, coverage, fuzzing, stateful), with a bounded number of examples and a fixed seed,
so the run is reproducible and takes seconds. The event streams, which never end, are read
for an event or a second, and each event is checked against the document's event
schema. `st` runs as its own process: its HTTP client is blocking, and the ingress runs in
this test's event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from relay import admin
from relay.auth import reply_token
from relay.ingress.app import BROKER_KEY, create_app
from relay.service.app import ServiceRunner
from relay.settings import Settings
from relay.store import SqlStore
from tests.helpers import make_integration, message

# Enough for every phase to reach every operation and status; small enough for < 60 s.
MAX_EXAMPLES = 10
SEED = 20261202
# An event stream is read until it has sent this many events, or for this long (the whole
# stream: a stream of a conversation with nothing new, or of an integration, sends none).
STREAM_EVENTS = 1
STREAM_SECONDS = 1.0
# Deleting what the other operations are pinned to would leave them nothing to test:
# tests/test_admin_api.py deletes and revokes.
UNTESTED = ["adminDeleteIntegration", "adminRevokeToken"]
ROOT = Path(__file__).resolve().parent.parent


@contextlib.asynccontextmanager
async def serve_ingress(settings: Settings) -> AsyncIterator[str]:
    """The ingress as `relay ingress` serves it (ServiceRunner), on a free port."""
    app = create_app(settings)
    runner = ServiceRunner(app, access_log=None, shutdown_timeout=1)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        await asyncio.wait_for(app[BROKER_KEY].wait_connected(), 15)
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


def toml_string(value: str) -> str:
    return json.dumps(value)  # a JSON string is a TOML basic string


async def config_for(base: str, store: SqlStore, settings: Settings, path: Path) -> Path:
    """A schemathesis.toml pinning the ids and tokens of a real integration."""
    integration_id, token = await make_integration(store, settings, name="schemathesis")
    bot_token, _ = await admin.create_token(store, integration_id, "bot")
    admin_token, _ = await admin.create_token(store, None, "admin")
    # One of its own for PATCH, which may disable it, name another bot, pace it...
    patched_id, _ = await make_integration(store, settings, name="schemathesis-patched")
    async with aiohttp.ClientSession() as http:
        async with http.post(
            f"{base}/webhooks/{integration_id}",
            json=message(1),
            headers={"Authorization": f"Bearer {token}"},
        ) as answer:
            assert answer.status == 200, await answer.text()
            conversation_id = (await answer.json())["conversation"]["id"]
        async with http.post(
            f"{base}/bot/conversations/{conversation_id}/messages",
            json={"type": "text", "payload": {"text": "pinned"}},
            headers={"Authorization": f"Bearer {bot_token}"},
        ) as pushed:
            assert pushed.status == 201, await pushed.text()
            webhook_id = f"msg_{(await pushed.json())['message']['id']}"
    secret = await store.bot_secret(integration_id)
    reply = reply_token(secret, conversation_id, int(time.time()) + 3600)
    await asyncio.to_thread(
        path.write_text,
        f"""
hooks = "tests.schemathesis_hooks"

[parameters]
"path.integrationId" = {toml_string(integration_id)}
"path.conversationId" = {toml_string(conversation_id)}
"path.token" = {toml_string(reply)}

[[operations]]
include-path = "/webhooks/{{integrationId}}"
headers = {{ Authorization = {toml_string(f"Bearer {token}")} }}
# No bot runs here: every turn would wait the whole time.
parameters = {{ "query.wait" = 0.01 }}

[[operations]]
include-operation-id = [
    "conversationHistory", "createConversationToken", "revokeConversationTokens",
    "revokeConversationToken",
]
headers = {{ Authorization = {toml_string(f"Bearer {token}")} }}
parameters = {{ "path.conversationId" = "conv-1" }}

[[operations]]
include-path-regex = "^/admin/v1/"
headers = {{ Authorization = {toml_string(f"Bearer {admin_token}")} }}

# An endpoint that fails its check is refused (422) however well formed the request.
[[operations]]
include-operation-id = ["adminCreateIntegration", "adminChangeIntegration"]
headers = {{ Authorization = {toml_string(f"Bearer {admin_token}")} }}
checks = {{ positive_data_acceptance = {{ expected-statuses = ["2xx", 401, 404, 422] }} }}

[[operations]]
include-operation-id = "adminChangeIntegration"
headers = {{ Authorization = {toml_string(f"Bearer {admin_token}")} }}
parameters = {{ "path.id" = {toml_string(patched_id)} }}
checks = {{ positive_data_acceptance = {{ expected-statuses = ["2xx", 401, 404, 422] }} }}

# A cursor this API did not give out is refused; a generator cannot make a real one.
[[operations]]
include-operation-id = "adminSearchAttempts"
headers = {{ Authorization = {toml_string(f"Bearer {admin_token}")} }}
checks = {{ positive_data_acceptance = {{ expected-statuses = ["2xx", 400, 401] }} }}

# Generated ids and cursors name nothing (404, or a 400 for a cursor this API did not give
# out, a 409 for a response not delivered): the recovery routes' own tests go through them
# with real dead letters and responses (tests/test_admin_recovery.py).
[[operations]]
include-operation-id = [
    "adminListDeadLetters", "adminReplayDeadLetters", "adminPurgeDeadLetters",
    "adminResendResponse", "adminRecoverIntegration", "adminConversationTimeline",
]
headers = {{ Authorization = {toml_string(f"Bearer {admin_token}")} }}
checks = {{ positive_data_acceptance = {{ expected-statuses = ["2xx", 400, 401, 404, 409] }} }}

[[operations]]
include-operation-id = "adminConversationTimeline"
headers = {{ Authorization = {toml_string(f"Bearer {admin_token}")} }}
parameters = {{ "path.id" = {toml_string(integration_id)}, "path.conversationId" = "conv-1" }}

# Not delivered (no delivery worker runs here): 409.
[[operations]]
include-operation-id = "adminResendResponse"
headers = {{ Authorization = {toml_string(f"Bearer {admin_token}")} }}
parameters = {{ "path.webhookId" = {toml_string(webhook_id)} }}
checks = {{ positive_data_acceptance = {{ expected-statuses = ["2xx", 401, 409] }} }}

# Its endpoint check fails (422) for most generated URLs, which schemathesis warns about.
[[operations]]
include-operation-id = "adminCreateIntegration"
warnings = false

[[operations]]
include-operation-id = {json.dumps(UNTESTED)}
enabled = false

# An event stream never ends: schemathesis reads one until it has sent
# STREAM_EVENTS events or STREAM_SECONDS passed, and checks the events it got.
[[operations]]
include-operation-id = "conversationEvents"
headers = {{ Authorization = {toml_string(f"Bearer {token}")} }}
parameters = {{ "path.conversationId" = "conv-1" }}
request-timeout = {STREAM_SECONDS}
max-stream-events = {STREAM_EVENTS}

[[operations]]
include-operation-id = "integrationEvents"
headers = {{ Authorization = {toml_string(f"Bearer {token}")} }}
request-timeout = {STREAM_SECONDS}
max-stream-events = {STREAM_EVENTS}

[[operations]]
include-path = "/bot/conversations/{{conversationId}}/messages"
headers = {{ Authorization = {toml_string(f"Bearer {bot_token}")} }}
# Every valid shape of the 13 payload types, but not every way to break each (thousands of
# requests, most of the run): invalid bodies come from the fuzzing phase, and
# tests/test_payloads.py goes through the validation rules one by one.
phases = {{ coverage = {{ generation = {{ mode = "positive" }} }} }}

# The three connector routes take the same Activity: the coverage phase breaks it on the
# first one, and sends the valid shapes to all three.
[[operations]]
include-operation-id = ["replyToActivity", "updateActivity"]
phases = {{ coverage = {{ generation = {{ mode = "positive" }} }} }}
""",
    )
    return path


# The document and the answers it promises are the ingress's, the same on either store (the
# stores are held to one contract by their own tests): one store, half a minute less.
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
@pytest.mark.timeout(120)
async def test_the_openapi_document_holds_for_generated_requests(
    settings: Settings, store: SqlStore, tmp_path: Path
):
    # The production default: thousands of requests need not look the token hashes up each.
    # Schemathesis fails authentication on purpose, thousands of times: no limit on that here.
    # Streams write a keep-alive often, so a stream whose reader left soon notices it.
    cached = settings.model_copy(
        update={"auth_cache_seconds": 5.0, "auth_failure_rate": 0, "stream_keepalive": 0.2}
    )
    async with serve_ingress(cached) as base:
        config = await config_for(base, store, settings, tmp_path / "schemathesis.toml")
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "schemathesis.cli",
            "--config-file",
            str(config),
            "--no-color",
            "run",
            f"{base}/openapi.json",
            "--checks",
            "all",
            "--max-examples",
            str(MAX_EXAMPLES),
            "--seed",
            str(SEED),
            "--request-timeout",
            "10",
            # one worker: the generator is not thread-safe (Hypothesis reports it "flaky")
            "--workers",
            "1",
            cwd=tmp_path,  # its caches and reports stay out of the tree
            env={**os.environ, "PYTHONPATH": str(ROOT)},  # for tests.schemathesis_hooks
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        out, _ = await asyncio.wait_for(process.communicate(), 100)
    report = out.decode(errors="replace")
    assert process.returncode == 0, report
    assert "No issues found" in report, report
    # every operation of the document was tested, bar those left out on purpose
    found = re.search(r"Operations: +([0-9]+) selected / ([0-9]+) total", report)
    assert found is not None, report
    selected, total = int(found[1]), int(found[2])
    assert selected == total - len(UNTESTED), report
    assert f"Tested: {selected}" in report, report
