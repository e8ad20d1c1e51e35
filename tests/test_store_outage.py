"""The database going away under a running ingress (PostgreSQL: a server can vanish)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import pytest

from relay.settings import Settings
from relay.store import SqlStore
from relay.store.postgres import drop_schema
from tests.helpers import Queues, make_integration, message, start_ingress, with_address
from tests.proxy import Proxy
from tests.test_broker_failures import post_until_accepted


@pytest.fixture(scope="module")
async def database_url(postgres_server: str) -> AsyncIterator[str]:
    """PostgreSQL only here: a SQLite file cannot be taken away from a running process."""
    schema = "t_" + uuid.uuid4().hex[:12]
    yield f"{postgres_server}?schema={schema}"
    await drop_schema(postgres_server, schema)


async def test_store_down_is_503_and_not_ready(
    settings: Settings, store: SqlStore, postgres_server: str, queues: Queues
):
    integration_id, token = await make_integration(store, settings)
    target = urlsplit(postgres_server)
    db_proxy = Proxy(target.hostname or "127.0.0.1", target.port or 5432)
    await db_proxy.start()
    via_proxy = with_address(settings.database_url, db_proxy.url_host)
    try:
        async with start_ingress(
            settings.model_copy(update={"database_url": via_proxy})
        ) as ingress:
            assert (await ingress.post(integration_id, token, message(1)))[0] == 200
            await db_proxy.stop()
            status, body = await ingress.post(integration_id, token, message(2))
            assert status == 503, body
            assert body["error"]["code"] == "unavailable"
            async with ingress.http.get(f"{ingress.url}/readyz") as response:
                assert response.status == 503
                assert "store" in (await response.json())["failures"]
            await db_proxy.start()
            _, answer = await post_until_accepted(ingress, integration_id, token, message(2))
    finally:
        await db_proxy.stop()
    assert len(await queues.take("inbound")) == 2
    assert answer["message"]["tags"] == {"id": "msg-2"}
