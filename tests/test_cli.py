"""The `relay` command as a user runs it: admin commands, bad configuration, SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest
from aio_pika.abc import AbstractRobustConnection
from aiohttp import web
from standardwebhooks import Webhook

from relay.admin import AdminError
from relay.broker import topology_of
from relay.broker.topology import delete
from relay.commands.integration_flags import patch_of
from relay.settings import Settings
from relay.store import DeliveryOptions, SqlStore
from relay.wire import utcnow
from tests.helpers import (
    Ingress,
    admin_call,
    eventually,
    make_integration,
    message,
    until_ready,
    with_address,
)
from tests.proxy import Proxy

RELAY = [sys.executable, "-m", "relay.commands"]


@dataclass
class Run:
    code: int
    out: str
    err: str


async def relay(
    settings: Settings, *args: str, env: dict[str, str] | None = None, stdin: str = ""
) -> Run:
    """Run one `relay` command against the module's database and broker."""
    process = await asyncio.create_subprocess_exec(
        *RELAY,
        *args,
        env=relay_env(settings, env),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(stdin.encode()), 60)
    assert process.returncode is not None
    return Run(process.returncode, out.decode(), err.decode())


def relay_env(settings: Settings, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    env.update(
        {
            "RELAY_DATABASE_URL": settings.database_url,
            "RELAY_AMQP_URL": settings.amqp_url,
            "RELAY_QUEUE_PREFIX": settings.queue_prefix,
            "RELAY_PARTITIONS": str(settings.partitions),
            "RELAY_AUTH_CACHE_SECONDS": "0",
            # the module's topology, so its teardown removes every queue the process declared
            "RELAY_BOT_RETRY_DELAYS": ",".join(map(str, settings.bot_retry_delays)),
            "RELAY_DELIVERY_DELAY_QUEUES": ",".join(map(str, settings.delivery_delay_queues)),
            # and its short waits: production's 30 s penalty and cooldown would stall a test
            "RELAY_DELIVERY_OVERLOAD_PENALTY": str(settings.delivery_overload_penalty),
            "RELAY_BREAKER_COOLDOWN": str(settings.breaker_cooldown),
            "RELAY_PRESENCE_INTERVAL": str(settings.presence_interval),
            "RELAY_MANAGEMENT_URL": settings.management_url,
        }
    )
    env.update(extra or {})
    return env


async def unverified_integration(settings: Settings, name: str) -> dict[str, str]:
    """`relay integrations create --no-verify`, parsed."""
    run = await relay(
        settings,
        "integrations",
        "create",
        "--name",
        name,
        "--response-url",
        "http://127.0.0.1:9/x",
        "--no-verify",
    )
    assert run.code == 0, run.err
    created: dict[str, str] = json.loads(run.out)
    return created


@dataclass
class Receiver:
    """A real HTTP endpoint on 127.0.0.1 that records what it is sent."""

    url: str
    status: list[int]
    received: list[tuple[dict[str, str], bytes]] = field(default_factory=list)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    statuses = [200]
    got: list[tuple[dict[str, str], bytes]] = []

    async def handle(request: web.Request) -> web.Response:
        got.append((dict(request.headers), await request.read()))
        return web.Response(status=statuses[0])

    app = web.Application()
    app.router.add_post("/responses", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield Receiver(f"http://127.0.0.1:{port}/responses", statuses, got)
    await runner.cleanup()


# The test endpoints listen on loopback, which the SSRF guard refuses unless allowed.
LOOPBACK_ALLOWED = {"RELAY_ALLOWED_ENDPOINT_NETWORKS": "127.0.0.0/8"}


async def test_integrations_create_checks_the_endpoint_with_a_signed_test_event(
    settings: Settings, receiver: Receiver
):
    run = await relay(
        settings,
        "integrations",
        "create",
        "--name",
        "shop",
        "--response-url",
        receiver.url,
        env=LOOPBACK_ALLOWED,
    )
    assert run.code == 0, run.err
    created = json.loads(run.out)
    assert set(created) == {"id", "name", "webhookUrl", "signingSecret"}
    assert created["webhookUrl"] == f"http://127.0.0.1:8080/webhooks/{created['id']}"
    [(headers, body)] = receiver.received
    lowered = {k.lower(): v for k, v in headers.items()}
    assert Webhook(created["signingSecret"]).verify(body, lowered) == {
        "type": "test",
        "payload": "test",
    }
    listed = await relay(settings, "integrations", "list", "--json")
    assert created["id"] in [item["id"] for item in json.loads(listed.out)]
    table = await relay(settings, "integrations", "list")
    assert created["id"] in table.out
    assert "responseUrl" in table.out.splitlines()[0]
    # The secret was shown once, at creation: no listing or reading shows it again.
    shown = await relay(settings, "integrations", "show", created["id"])
    assert json.loads(shown.out)["responseUrl"] == receiver.url
    secret = created["signingSecret"].removeprefix("whsec_")
    for run in (listed, table, shown):
        assert "signingSecret" not in run.out
        assert secret not in run.out + run.err
    missing = await relay(settings, "integrations", "show", "nope")
    assert (missing.code, missing.err.strip()) == (1, "error: no integration nope")


async def test_rotate_secret_shows_the_new_secret_once_with_a_bounded_grace(
    settings: Settings, store: SqlStore
):
    created = await unverified_integration(settings, "rotating")
    run = await relay(settings, "integrations", "rotate-secret", created["id"])
    assert run.code == 0, run.err
    rotated = json.loads(run.out)
    assert set(rotated) == {"id", "signingSecret", "previousSecretValidUntil"}
    record = await store.get_integration(created["id"])
    assert record is not None
    assert record.signing_secrets(utcnow()) == [
        rotated["signingSecret"],
        created["signingSecret"],
    ]
    until = datetime.fromisoformat(rotated["previousSecretValidUntil"])
    assert abs((until - utcnow() - timedelta(hours=24)).total_seconds()) < 60  # the default
    too_long = await relay(
        settings, "integrations", "rotate-secret", created["id"], "--grace", "31d"
    )
    assert (too_long.code, too_long.out) == (1, "")
    assert "0 to 30 days" in too_long.err
    assert await store.get_integration(created["id"]) == record
    listed = (await relay(settings, "integrations", "list", "--json")).out
    assert rotated["signingSecret"].removeprefix("whsec_") not in listed


async def test_integrations_create_refuses_an_endpoint_that_fails(
    settings: Settings, receiver: Receiver
):
    receiver.status[0] = 500
    run = await relay(
        settings,
        "integrations",
        "create",
        "--name",
        "broken",
        "--response-url",
        receiver.url,
        env=LOOPBACK_ALLOWED,
    )
    assert run.code == 1
    assert "answered 500" in run.err
    assert run.out == ""
    listed = json.loads((await relay(settings, "integrations", "list", "--json")).out)
    assert "broken" not in [item["name"] for item in listed]


async def test_integrations_name_their_bot_and_delivery_options_by_flags(
    settings: Settings, store: SqlStore
):
    made = await relay(
        settings,
        "integrations",
        "create",
        "--name",
        "flagged",
        "--response-url",
        "http://127.0.0.1:9/responses",
        "--no-verify",
        "--bot",
        "botframework",
        "--bot-url",
        "http://127.0.0.1:9/api/messages",
        "--bot-app-id",
        "-",
        "--bot-app-password",
        "-",
        "--operations-url",
        "http://127.0.0.1:9/ops",
        "--delivery-rate",
        "20",
        "--delivery-burst",
        "5",
        "--expiring",
        "typing=10",
        "--expiring",
        "custom=60",
        stdin="app-id-CANARY\napp-password-CANARY\n",
    )
    assert made.code == 0, made.err
    integration_id = json.loads(made.out)["id"]
    record = await store.get_integration(integration_id)
    assert record is not None
    assert record.bot is not None
    assert (record.bot.app_id, record.bot.app_password) == ("app-id-CANARY", "app-password-CANARY")
    assert record.delivery.delivery_rate == 20
    assert record.delivery.expiring_types == {"typing": 10, "custom": 60}
    shown = await relay(settings, "integrations", "show", integration_id)
    assert "CANARY" not in shown.out
    assert json.loads(shown.out)["bot"]["credentials"] == ["appId", "appPassword"]
    changed = await relay(
        settings,
        "integrations",
        "update",
        integration_id,
        "--bot",
        "default",
        "--delivery-rate",
        "none",
        "--expiring",
        "none",
        "--operations-url",
        "none",
    )
    assert changed.code == 0, changed.err
    view = json.loads(changed.out)
    assert (view["bot"], view["deliveryRate"], view["deliveryBurst"]) == (None, None, None)
    assert (view["expiringTypes"], view["operationsUrl"]) == ({}, None)
    refused = await relay(settings, "integrations", "update", integration_id, "--bot", "http")
    assert refused.code == 1
    assert "needs its url" in refused.err


def test_the_bot_and_delivery_flags_say_what_is_wrong_before_any_connection():
    from relay.commands.main import build_parser

    parser = build_parser()
    for flags, says in [
        (["--bot", "not an adapter!"], "bot.adapter"),
        (["--delivery-rate", "0"], "deliveryRate"),
        (["--delivery-rate", "fast"], "not a number"),
        (["--expiring", "typing"], "TYPE=SECONDS"),
        (["--bot-url", "http://127.0.0.1:9/"], "go with --bot"),
        (["--bot", "http", "--bot-secret", "secret-CANARY", "--bot-url", "x"], "bot.url"),
    ]:
        args = parser.parse_args(["integrations", "update", "some-id", *flags])
        with pytest.raises(AdminError) as refused:
            patch_of(args)
        assert says in str(refused.value), (flags, refused.value)
        assert "CANARY" not in str(refused.value)


async def test_integrations_create_refuses_an_unreachable_endpoint_unless_told(settings: Settings):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens here once closed
    url = f"http://127.0.0.1:{port}/nothing"
    run = await relay(
        settings,
        "integrations",
        "create",
        "--name",
        "n",
        "--response-url",
        url,
        env=LOOPBACK_ALLOWED,
    )
    assert run.code == 1
    assert "did not answer" in run.err
    run = await relay(
        settings,
        "integrations",
        "create",
        "--name",
        "n",
        "--response-url",
        url,
        "--no-verify",
        env={"RELAY_PUBLIC_URL": "https://relay.example.com/"},
    )
    assert run.code == 0
    assert json.loads(run.out)["webhookUrl"].startswith("https://relay.example.com/webhooks/")
    bad = await relay(
        settings,
        "integrations",
        "create",
        "--name",
        "n",
        "--response-url",
        "ftp://x",
        "--no-verify",
    )
    assert bad.code == 1
    assert "http://" in bad.err


@pytest.mark.parametrize(
    "url",
    [
        "{receiver}",  # a loopback address, not in RELAY_ALLOWED_ENDPOINT_NETWORKS
        "{receiver_by_name}",  # a name that resolves to one: checked at connect time
        "http://10.1.2.3/hook",  # a private address
        "http://[::ffff:127.0.0.1]/hook",  # loopback inside IPv6
    ],
)
async def test_integrations_create_refuses_what_deliveries_may_not_reach(
    settings: Settings, receiver: Receiver, url: str
):
    url = url.format(
        receiver=receiver.url, receiver_by_name=receiver.url.replace("127.0.0.1", "localhost")
    )
    run = await relay(settings, "integrations", "create", "--name", "ssrf", "--response-url", url)
    assert run.code == 1, run.out
    assert "is refused" in run.err
    assert "public" in run.err
    assert "Traceback" not in run.err
    assert receiver.received == []  # the guard refused before any request was sent
    listed = json.loads((await relay(settings, "integrations", "list", "--json")).out)
    assert "ssrf" not in [item["name"] for item in listed]


async def test_integrations_create_refuses_plain_http_when_https_is_required(
    settings: Settings, receiver: Receiver
):
    https_only = {**LOOPBACK_ALLOWED, "RELAY_HTTPS_ONLY": "true"}
    for verify in ([], ["--no-verify"]):
        run = await relay(
            settings,
            "integrations",
            "create",
            "--name",
            "plain",
            "--response-url",
            receiver.url,
            *verify,
            env=https_only,
        )
        assert run.code == 1, run.out
        assert "https://" in run.err
    assert receiver.received == []


async def test_tokens_create_list_and_revoke(settings: Settings, store: SqlStore):
    created = await unverified_integration(settings, "t")
    run = await relay(settings, "tokens", "create", "--integration", created["id"])
    assert run.code == 0
    token = run.out.strip()
    assert token.startswith("rly_")
    assert "shown once" in run.err
    as_json = await relay(
        settings, "tokens", "create", "--integration", created["id"], "--kind", "bot", "--json"
    )
    bot = json.loads(as_json.out)
    assert bot["kind"] == "bot"
    assert bot["token"].startswith("rly_")
    listed = json.loads(
        (await relay(settings, "tokens", "list", "--integration", created["id"], "--json")).out
    )
    assert {item["kind"] for item in listed} == {"integration", "bot"}
    assert token not in json.dumps(listed)
    assert token[:8] in [item["prefix"] for item in listed]

    revoke = await relay(settings, "tokens", "revoke", bot["id"])
    assert revoke.code == 0
    assert await store.active_token_hashes(created["id"], "bot") == []
    again = await relay(settings, "tokens", "revoke", bot["id"])
    assert again.code == 1
    missing = await relay(settings, "tokens", "create", "--integration", "nope")
    assert missing.code == 1
    assert "no integration" in missing.err


async def test_integrations_disable_does_what_the_admin_api_s_disable_does(
    settings: Settings,
    store: SqlStore,
    ingress: Ingress,
    admin_token: str,
    amqp: AbstractRobustConnection,
):
    by_cli, cli_token = await make_integration(store, settings, "off-by-cli")
    by_api, api_token = await make_integration(store, settings, "off-by-api")
    operations = DeliveryOptions(operations_url="http://127.0.0.1:9/ops")
    assert await store.set_delivery(by_cli, operations)
    # A prefix of the test's own: its operations queue holds only what the command queues.
    own = settings.model_copy(update={"queue_prefix": f"{settings.queue_prefix}-off"})
    topology = topology_of(own)
    try:
        said = []
        for _ in range(2):  # the second finds it disabled already: nothing to tell
            run = await relay(own, "integrations", "disable", by_cli)
            assert run.code == 0, run.err
            said.append(run.out.strip())
        assert said == [f"disabled {by_cli}", f"{by_cli} was disabled already: nothing told"]
        status, _ = await admin_call(
            ingress, "PATCH", f"/integrations/{by_api}", admin_token, {"enabled": False}
        )
        assert status == 200

        # Told once, as the operator's disable: one event in the operations queue.
        listed = await relay(own, "queues", "--json")
        depth = {q["name"]: q["ready"] for q in json.loads(listed.out)["queues"]}
        assert depth[topology.operations_exchange] == 1
        event = await _take_one(amqp, topology.operations_exchange)
        assert (event["integrationId"], event["event"]["type"]) == (
            by_cli,
            "relay.integration.disabled",
        )
        assert event["event"]["data"]["reason"] == "operator"
    finally:
        async with amqp.channel() as channel:
            await delete(channel, topology)

    # Disabled alike: the same view, and the ingress answers their messages alike.
    views = [
        await admin_call(ingress, "GET", f"/integrations/{i}", admin_token)
        for i in (by_cli, by_api)
    ]
    assert [(status, view["enabled"]) for status, view in views] == [(200, False)] * 2
    assert all(view["disabledAt"] is not None for _, view in views)
    cli_answer, _ = await ingress.post(by_cli, cli_token, message(1, conversationId="off-cli"))
    api_answer, _ = await ingress.post(by_api, api_token, message(1, conversationId="off-api"))
    assert cli_answer == api_answer

    missing = await relay(settings, "integrations", "disable", "nope")
    assert (missing.code, missing.err.strip()) == (1, "error: no integration nope")


async def _take_one(amqp: AbstractRobustConnection, queue: str) -> dict[str, Any]:
    """The first message in `queue`, taken."""
    async with amqp.channel() as channel:
        declared = await channel.get_queue(queue, ensure=False)
        got = await declared.get(no_ack=True, fail=True)
        assert got is not None
        taken: dict[str, Any] = json.loads(got.body)
        return taken


async def test_bad_configuration_is_refused_with_a_clear_message(settings: Settings):
    run = await relay(settings, "ingress", env={"RELAY_HTTP_PORT": "eighty"})
    assert run.code == 2
    assert "invalid configuration" in run.err
    assert "RELAY_HTTP_PORT" in run.err
    assert "Traceback" not in run.err


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_ingress_finishes_in_flight_requests_on_sigterm_and_exits_zero(
    settings: Settings, amqp_url: str
):
    # The broker link goes through a proxy we can stall, so a request is surely in flight.
    target = urlsplit(amqp_url)
    proxy = Proxy(target.hostname or "127.0.0.1", target.port or 5672)
    await proxy.start()
    port = free_port()
    env = {
        "RELAY_HTTP_PORT": str(port),
        "RELAY_PUBLISH_TIMEOUT": "2",
        "RELAY_AMQP_URL": with_address(amqp_url, proxy.url_host),
    }
    created = await unverified_integration(settings, "s")
    token = (await relay(settings, "tokens", "create", "--integration", created["id"])).out
    process = await asyncio.create_subprocess_exec(
        *RELAY,
        "ingress",
        env=relay_env(settings, env),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as http:
            await until_ready(http, base, interval=0.02)
            async with http.post(
                f"{base}/webhooks/{created['id']}",
                json=message("logged"),
                headers={
                    "Authorization": f"Bearer {token.strip()}",
                    "X-Request-Id": "req-followed",
                },
            ) as accepted:
                assert accepted.status == 200
                bundle = await accepted.json()
            proxy.blackhole = True
            request = asyncio.create_task(
                http.post(
                    f"{base}/webhooks/{created['id']}",
                    json=message(1),
                    headers={"Authorization": f"Bearer {token.strip()}"},
                )
            )

            async def publishing() -> bool:  # the handler is waiting on the broker
                return proxy.swallowed > 0

            await eventually(publishing)
            process.send_signal(signal.SIGTERM)
            response = await asyncio.wait_for(request, 10)
            # the handler ran to its end: a clean 503 (publish timed out), not a reset
            assert response.status == 503
            assert (await response.json())["error"]["code"] == "unavailable"
        code = await asyncio.wait_for(process.wait(), 20)
    finally:
        if process.returncode is None:
            process.kill()
        await proxy.stop()
    output = (await process.stdout.read()).decode()  # type: ignore[union-attr]
    assert code == 0, output
    lines = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    assert "stopped" in [line["event"] for line in lines]
    [logged] = [line for line in lines if line.get("request_id") == "req-followed"]
    assert logged["event"] == "http_request"
    assert logged["status"] == 200
    assert logged["integration_id"] == created["id"]
    assert logged["message_id"] == bundle["message"]["id"]
    assert logged["conversation_id"] == bundle["conversation"]["id"]
    assert logged["external_message_id"] == "msg-logged"


@contextlib.asynccontextmanager
async def relay_processes(
    settings: Settings, role: str, count: int, env: dict[str, str]
) -> AsyncIterator[list[asyncio.subprocess.Process]]:
    """`count` `relay <role>` processes; SIGTERM (unless killed) and exit 0 at the end."""
    processes = []
    for _ in range(count):
        # Port 0: the OS picks a free one at bind time. A port found free beforehand can be
        # taken meanwhile, as the source port of any outgoing connection on this machine.
        port = {"RELAY_BOT_WORKER_PORT": "0", "RELAY_DELIVERY_WORKER_PORT": "0"}
        processes.append(
            await asyncio.create_subprocess_exec(
                *RELAY, role, env=relay_env(settings, {**env, **port}), cwd=os.getcwd()
            )
        )
    try:
        yield processes
    finally:
        for process in processes:
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
        codes = [await asyncio.wait_for(p.wait(), 30) for p in processes]
        assert all(code in (0, -signal.SIGKILL) for code in codes), codes


def test_every_option_of_every_command_says_what_it_does():
    from relay.commands.main import build_parser
    from relay.commands.settings_help import SERVICE_SETTINGS

    def walk(parser: argparse.ArgumentParser, path: str) -> list[str]:
        missing = []
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    missing += walk(sub, f"{path} {name}")
            elif not action.help and action.dest != "help":
                missing.append(f"{path} {action.option_strings or action.dest}")
        return missing

    assert walk(build_parser(), "relay") == []
    # The settings each service's help lists are real settings.
    names = {f"RELAY_{field.upper()}" for field in Settings.model_fields}
    for role, listed in SERVICE_SETTINGS.items():
        assert {name for name, _ in listed} <= names, role


# Nothing here reads a store: one is enough.
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_version_service_help_and_quiet_interactive_commands(settings: Settings):
    version = await relay(settings, "--version")
    assert (version.code, version.out.split()[0]) == (0, "relay")
    for role, port in [
        ("ingress", "RELAY_HTTP_PORT"),
        ("bot-worker", "RELAY_BOT_WORKER_PORT"),
        ("delivery-worker", "RELAY_DELIVERY_WORKER_PORT"),
        ("run", "RELAY_HTTP_PORT"),
    ]:
        shown = await relay(settings, role, "--help")
        assert shown.code == 0
        assert port in shown.out
        assert "RELAY_AMQP_URL" in shown.out
        assert "SIGTERM" in shown.out
    # An interactive command prints its output, and no log lines unless asked.
    quiet = await relay(settings, "dlq", "list")
    assert quiet.code == 0
    assert quiet.err == ""
    assert not any(line.startswith("{") for line in quiet.out.splitlines())
    verbose = await relay(settings, "--verbose", "dlq", "replay", "--all", "--stage", "inbound")
    assert any(json.loads(line)["event"] == "broker_connected" for line in verbose.err.splitlines())
    assert verbose.out.strip() == "replayed 0"
    # Purging needs a filter or --all, as replaying does.
    for nothing_chosen in (["dlq", "purge"], ["dlq", "purge", "--stage", "inbound"]):
        refused = await relay(settings, *nothing_chosen)
        assert refused.code == 1
        assert "--all" in refused.err
    purged = await relay(settings, "dlq", "purge", "--all", "--stage", "inbound")
    assert (purged.code, purged.out.strip()) == (0, "purged 0")


async def test_admin_tokens_are_made_listed_and_revoked(settings: Settings):
    made = await relay(settings, "tokens", "create", "--kind", "admin", "--json")
    assert made.code == 0, made.err
    created = json.loads(made.out)
    assert created["token"].startswith("rly_")
    assert (created["kind"], created["integrationId"]) == ("admin", None)
    listed = json.loads((await relay(settings, "tokens", "list", "--admin", "--json")).out)
    assert created["id"] in {token["id"] for token in listed}
    assert all("token" not in token for token in listed)
    refused = await relay(
        settings, "tokens", "create", "--kind", "admin", "--integration", "some-id"
    )
    assert refused.code == 1
    assert "no integration" in refused.err
    revoked = await relay(settings, "tokens", "revoke", created["id"])
    assert (revoked.code, revoked.out.strip()) == (0, f"revoked {created['id']}")
