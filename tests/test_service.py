"""Service routes (health, readiness, metrics, OpenAPI), rate limits and token revocation."""

from __future__ import annotations

from relay.auth import hash_token
from relay.ingress.openapi import openapi_document
from relay.settings import Settings
from relay.store import SqlStore
from tests.helpers import Ingress, Queues, make_integration, message, start_ingress


async def get(ingress: Ingress, path: str) -> tuple[int, str, str]:
    async with ingress.http.get(f"{ingress.url}{path}") as response:
        return response.status, response.headers["Content-Type"], await response.text()


async def test_health_and_readiness(ingress: Ingress):
    assert (await get(ingress, "/healthz"))[0] == 200
    status, _, body = await get(ingress, "/readyz")
    assert status == 200
    assert '"ok"' in body


async def test_metrics_count_requests_by_route_and_status_and_time_publishes(
    ingress: Ingress, store: SqlStore, settings: Settings, queues: Queues
):
    integration_id, token = await make_integration(store, settings)
    await ingress.post(integration_id, token, message(1))
    await ingress.post(integration_id, token, message(1))
    await ingress.post(integration_id, "wrong", message(2))
    status, content_type, text = await get(ingress, "/metrics")
    assert status == 200
    assert content_type.startswith("text/plain")
    route = 'route="/webhooks/{integrationId}"'
    assert f'relay_http_requests_total{{method="POST",{route},status="200"}}' in text
    assert f'relay_http_requests_total{{method="POST",{route},status="401"}}' in text
    assert 'relay_publish_seconds_count{stage="inbound"}' in text
    assert 'relay_inbound_messages_total{outcome="accepted"}' in text
    assert 'relay_inbound_messages_total{outcome="duplicate"}' in text
    # one series per route, never per integration id
    assert integration_id not in text
    assert len(await queues.take("inbound")) == 1


async def test_responses_carry_a_request_id(ingress: Ingress):
    async with ingress.http.get(
        f"{ingress.url}/healthz", headers={"X-Request-Id": "trace-me"}
    ) as response:
        assert response.headers["X-Request-Id"] == "trace-me"
    async with ingress.http.get(f"{ingress.url}/healthz") as response:
        assert len(response.headers["X-Request-Id"]) == 32


async def test_openapi_describes_the_endpoint_and_every_error(ingress: Ingress):
    async with ingress.http.get(f"{ingress.url}/openapi.json") as response:
        document = await response.json()
    assert document == openapi_document()
    operation = document["paths"]["/webhooks/{integrationId}"]["post"]
    assert set(operation["responses"]) == {
        *("200", "400", "401", "404", "408", "409", "413", "429", "503")
    }
    schemas = document["components"]["schemas"]
    request = schemas["InboundRequest"]
    assert set(request["required"]) == {"userId", "messageId", "conversationId", "type", "text"}
    assert request["properties"]["userId"]["maxLength"] == 256
    assert {"MessageBundle", "ErrorBody", "User", "Conversation", "Message"} <= set(schemas)


async def test_over_the_rate_limit_is_429_with_retry_after(
    settings: Settings, store: SqlStore, queues: Queues
):
    limited = settings.model_copy(update={"rate_limit_per_second": 0.5, "rate_limit_burst": 2})
    integration_id, token = await make_integration(store, settings)
    other_id, other_token = await make_integration(store, settings)
    async with start_ingress(limited) as ingress:
        answers = [await ingress.post(integration_id, token, message(n)) for n in range(3)]
        assert [status for status, _ in answers] == [200, 200, 429]
        assert answers[2][1]["error"]["code"] == "rate_limited"
        async with ingress.http.post(
            f"{ingress.url}/webhooks/{integration_id}",
            json=message(9),
            headers={"Authorization": f"Bearer {token}"},
        ) as response:
            assert response.status == 429
            assert int(response.headers["Retry-After"]) >= 1
        # another integration has its own budget
        assert (await ingress.post(other_id, other_token, message(1)))[0] == 200
    assert await store.find_incoming(integration_id, "msg-2") is None
    assert len(await queues.take("inbound")) == 3


async def test_a_revoked_token_is_refused(
    ingress: Ingress, store: SqlStore, settings: Settings, queues: Queues
):
    integration_id, token = await make_integration(store, settings)
    assert (await ingress.post(integration_id, token, message(1)))[0] == 200
    [record] = await store.list_tokens(integration_id)
    assert record.prefix == token[:8]
    assert await store.active_token_hashes(integration_id, "integration") == [hash_token(token)]
    await store.revoke_token(record.id)
    assert (await ingress.post(integration_id, token, message(2)))[0] == 401
    assert len(await queues.take("inbound")) == 1


async def test_a_bot_token_is_not_an_integration_token(
    ingress: Ingress, store: SqlStore, settings: Settings, queues: Queues
):
    integration_id, _ = await make_integration(store, settings)
    bot_token = "rly_bot-token-for-the-push-api"
    await store.create_token(integration_id, "bot", hash_token(bot_token), bot_token[:8])
    assert (await ingress.post(integration_id, bot_token, message(1)))[0] == 401
    assert await queues.take("inbound") == []
