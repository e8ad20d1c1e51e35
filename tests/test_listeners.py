"""What each listener serves: `/metrics` behind `RELAY_METRICS_TOKEN` and on
`RELAY_METRICS_PORT` (then not on the service's own port) for every service, run as
`relay <role>`; the admin API and console turned off (`RELAY_ADMIN_ENABLED=false`) or on a
listener of their own (`RELAY_ADMIN_PORT`)."""

from __future__ import annotations

import json

import aiohttp
import pytest
from pydantic import SecretStr

from relay.settings import Settings
from tests.helpers import Ingress, eventually, start_ingress
from tests.test_bad_input import SERVICES, answers_health, start_service
from tests.test_cli import free_port
from tests.test_read_timeouts import sqlite_settings

METRICS_TOKEN = "metrics-secret-" + "7" * 20


async def fetch(url: str, token: str | None = None) -> tuple[int, str, str]:
    """GET: status, content type, body."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession() as http, http.get(url, headers=headers) as answer:
        return answer.status, answer.headers.get("Content-Type", ""), await answer.text()


def error_code(status_type_body: tuple[int, str, str]) -> tuple[int, str]:
    status, content_type, body = status_type_body
    assert content_type.startswith("application/json"), body
    return status, json.loads(body)["error"]["code"]


@pytest.mark.parametrize("role", list(SERVICES))
async def test_every_service_serves_metrics_on_its_own_port_behind_a_token(
    amqp_url: str, queue_prefix: str, tmp_path_factory: pytest.TempPathFactory, role: str
):
    settings = sqlite_settings(amqp_url, queue_prefix, tmp_path_factory.mktemp("db"))
    port = free_port()
    env = {"RELAY_METRICS_PORT": str(port), "RELAY_METRICS_TOKEN": METRICS_TOKEN}
    async with start_service(settings, role, env) as service:
        await eventually(lambda: answers_health(service.port), timeout=30, interval=0.1)
        main = f"http://127.0.0.1:{service.port}/metrics"
        assert error_code(await fetch(main, METRICS_TOKEN)) == (404, "not_found")
        own = f"http://127.0.0.1:{port}/metrics"
        assert error_code(await fetch(own)) == (401, "unauthorized")
        assert error_code(await fetch(own, "wrong")) == (401, "unauthorized")
        status, content_type, text = await fetch(own, METRICS_TOKEN)
        assert (status, content_type.split(";")[0]) == (200, "text/plain")
        assert "relay_http_requests_total" in text
        # The service's own port still answers the rest.
        assert (await fetch(f"http://127.0.0.1:{service.port}/healthz"))[0] == 200
    output = "".join(service.lines)
    assert service.process.returncode == 0, output
    assert METRICS_TOKEN not in output


async def test_metrics_on_the_service_port_need_the_token_when_one_is_set(settings: Settings):
    guarded = settings.model_copy(update={"metrics_token": SecretStr(METRICS_TOKEN)})
    async with start_ingress(guarded) as ingress:
        url = f"{ingress.url}/metrics"
        assert error_code(await fetch(url)) == (401, "unauthorized")
        status, _, text = await fetch(url, METRICS_TOKEN)
        assert status == 200
        assert "relay_http_requests_total" in text
        assert METRICS_TOKEN not in text


async def admin_list(base: str, token: str | None) -> int:
    return (await fetch(f"{base}/admin/v1/integrations", token))[0]


async def test_the_admin_api_and_console_can_be_turned_off(settings: Settings, admin_token: str):
    off = settings.model_copy(update={"admin_enabled": False})
    async with start_ingress(off) as ingress:
        assert error_code(await fetch(f"{ingress.url}/admin/v1/integrations", admin_token)) == (
            404,
            "not_found",
        )
        assert error_code(await fetch(f"{ingress.url}/console")) == (404, "not_found")
        assert (await fetch(f"{ingress.url}/healthz"))[0] == 200


async def test_the_admin_api_and_console_can_have_a_listener_of_their_own(
    settings: Settings, admin_token: str
):
    port = free_port()
    apart = settings.model_copy(update={"admin_port": port})
    async with start_ingress(apart) as ingress:
        admin = f"http://127.0.0.1:{port}"
        await eventually(lambda: answered(admin))
        assert await admin_list(admin, admin_token) == 200
        assert error_code(await fetch(f"{admin}/admin/v1/integrations")) == (401, "unauthorized")
        status, content_type, _ = await fetch(f"{admin}/console")
        assert (status, content_type.split(";")[0]) == (200, "text/html")
        # Only those there; and none of them on the ingress's own port.
        assert (await fetch(f"{admin}/webhooks/x"))[0] == 404
        await not_served(ingress, admin_token)


async def answered(base: str) -> bool:
    try:
        await fetch(f"{base}/console")
    except aiohttp.ClientError:
        return False
    return True


async def not_served(ingress: Ingress, admin_token: str) -> None:
    for path in ("/admin/v1/integrations", "/console"):
        assert error_code(await fetch(f"{ingress.url}{path}", admin_token)) == (404, "not_found")
