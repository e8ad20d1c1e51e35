"""Fixtures: real RabbitMQ and real stores, isolated per test module.

Each module gets its own queue prefix (its own exchanges and queues, deleted afterwards)
and its own database: a fresh SQLite file, or a fresh PostgreSQL schema (dropped
afterwards). Store-backed fixtures are parametrized so every such test runs on both.
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aio_pika
import pytest
from aio_pika.abc import AbstractRobustConnection
from playwright.async_api import Browser, async_playwright

from relay import admin
from relay.broker import Topology
from relay.broker.topology import delete
from relay.settings import Settings
from relay.store import SqlStore, open_store
from relay.store.postgres import drop_schema
from tests.helpers import Ingress, Queues, start_ingress
from tests.receivers import Receiver, serve_receiver
from tests.services import postgres_url, rabbitmq_url

BACKENDS = ["sqlite", "postgresql"]
PARTITIONS = 4
BOT_RETRY_DELAYS = (0.2, 0.5)
DELIVERY_DELAY_QUEUES = (0.1, 0.5)


@pytest.fixture(scope="session")
def amqp_url() -> Iterator[str]:
    with rabbitmq_url() as url:
        yield url


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    with postgres_url() as url:
        yield url


@pytest.fixture(scope="module")
async def queue_prefix(amqp_url: str) -> AsyncIterator[str]:
    """A queue prefix of the module's own; whatever was declared under it is deleted after."""
    prefix = "test-" + uuid.uuid4().hex[:10]
    yield prefix
    connection = await aio_pika.connect(amqp_url)
    async with connection, connection.channel() as channel:
        delays = (("inbound", BOT_RETRY_DELAYS), ("outbound", DELIVERY_DELAY_QUEUES))
        # And the queues of the other partition counts a module may have used.
        for count in (PARTITIONS, 8, 16):
            await delete(channel, Topology(prefix, count, delays=delays))


@pytest.fixture(scope="module", params=BACKENDS)
async def database_url(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[str]:
    if request.param == "sqlite":
        path: Path = tmp_path_factory.mktemp("db") / "relay.db"
        yield f"sqlite:///{path}"
        return
    server = request.getfixturevalue("postgres_server")
    schema = "t_" + uuid.uuid4().hex[:12]
    yield f"{server}?schema={schema}"
    await drop_schema(server, schema)


@pytest.fixture(scope="module")
async def store(database_url: str) -> AsyncIterator[SqlStore]:
    opened = await open_store(database_url)
    yield opened
    await opened.close()


@pytest.fixture(scope="module")
def settings(amqp_url: str, database_url: str, queue_prefix: str) -> Settings:
    return Settings(
        _env_file=None,  # type: ignore[call-arg]
        amqp_url=amqp_url,
        database_url=database_url,
        queue_prefix=queue_prefix,
        partitions=PARTITIONS,
        auth_cache_seconds=0,
        rate_limit_per_second=0,
        publish_timeout=1.5,
        outbox_interval=0.2,
        outbox_lease=4.0,
        bot_retry_delays=list(BOT_RETRY_DELAYS),
        delivery_delay_queues=list(DELIVERY_DELAY_QUEUES),
        delivery_retry_schedule=[0, 0.2, 0.2, 0.2],
        delivery_overload_penalty=0.3,
        delivery_timeout=2.0,
        delivery_connect_timeout=1.0,
        breaker_cooldown=1.0,
        allowed_endpoint_networks=["127.0.0.0/8"],
        bot_timeout=5.0,
        public_url="http://127.0.0.1:9",
        presence_interval=0.3,
    )


@pytest.fixture(scope="module")
async def amqp(amqp_url: str) -> AsyncIterator[AbstractRobustConnection]:
    connection = await aio_pika.connect_robust(amqp_url)
    yield connection
    await connection.close()


@pytest.fixture(scope="module")
async def ingress(settings: Settings) -> AsyncIterator[Ingress]:
    async with start_ingress(settings) as running:
        yield running


@pytest.fixture
async def queues(amqp: AbstractRobustConnection, settings: Settings) -> Queues:
    """The module's queues, emptied before the test so it sees only its own messages."""
    inspector = Queues(amqp, Topology(prefix=settings.queue_prefix, partitions=settings.partitions))
    await inspector.take("inbound")
    return inspector


@pytest.fixture(scope="module")
async def receiver() -> AsyncIterator[Receiver]:
    async with serve_receiver() as state:
        yield state


@pytest.fixture(scope="module")
async def healthy_receiver() -> AsyncIterator[Receiver]:
    """Another origin: isolation is per endpoint (scheme, host and port)."""
    async with serve_receiver() as state:
        yield state


@pytest.fixture(scope="module")
async def admin_token(store: SqlStore) -> str:
    token, _ = await admin.create_token(store, None, "admin")
    return token


CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Browser]:
    """Headless Debian Chromium, driven by Playwright (never a downloaded browser)."""
    if shutil.which("chromium") is None:
        pytest.skip("no chromium: scripts/ensure-browser installs it (make test runs it)")
    async with async_playwright() as playwright:
        # --no-sandbox: the tests run as root, where Chromium's sandbox cannot start.
        launched = await playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield launched
        await launched.close()
