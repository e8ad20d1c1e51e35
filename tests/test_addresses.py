"""Several broker addresses in RELAY_AMQP_URL: parsing, and moving to the next node.

The failover runs on the shared broker behind two TCP proxies, each standing for a node:
stopping a proxy is that node going away. (The three-node cluster with real nodes stopped
and started is `tests/test_cluster.py`.)
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import aio_pika
import pytest
from pydantic import ValidationError
from yarl import URL

from relay.broker import Broker, BrokerUnavailable, Topology
from relay.broker.addresses import Addresses, parse_addresses
from relay.settings import Settings, describe_error
from tests.helpers import conversation_in, eventually, with_address
from tests.proxy import Proxy
from tests.test_cli import free_port


def test_an_address_list_takes_whole_urls_or_host_port_like_the_first():
    urls = parse_addresses(
        "amqps://relay:s3cret@rabbit-0:5671/prod?heartbeat=10, rabbit-1:5672 ,"
        "amqp://other:pw@rabbit-2/,rabbit-3"
    )
    assert [str(url) for url in urls] == [
        "amqps://relay:s3cret@rabbit-0:5671/prod?heartbeat=10",
        "amqps://relay:s3cret@rabbit-1:5672/prod?heartbeat=10",
        "amqp://other:pw@rabbit-2/",
        "amqps://relay:s3cret@rabbit-3:5671/prod?heartbeat=10",
    ]


@pytest.mark.parametrize(
    "value",
    [
        " , ",
        "rabbit-0:5672",  # the first must be a whole URL
        "http://relay:topsecret@rabbit-0/",
        "amqp://relay:topsecret@rabbit-0/,rabbit-1:port",
        "amqp://relay:topsecret@rabbit-0/,http://rabbit-1/",
    ],
)
def test_a_bad_address_list_is_refused_without_showing_the_password(value: str):
    with pytest.raises(ValidationError) as raised:
        Settings(_env_file=None, amqp_url=value)  # type: ignore[call-arg]
    text = describe_error(raised.value)
    assert "RELAY_AMQP_URL" in text
    assert "topsecret" not in text


@pytest.fixture
async def two_nodes(amqp_url: str) -> AsyncIterator[tuple[Proxy, Proxy]]:
    """Two proxies to the shared broker, standing for two nodes of a cluster."""
    target = urlsplit(amqp_url)
    proxies = (
        Proxy(target.hostname or "127.0.0.1", target.port or 5672),
        Proxy(target.hostname or "127.0.0.1", target.port or 5672),
    )
    for proxy in proxies:
        await proxy.start()
    try:
        yield proxies
    finally:
        for proxy in proxies:
            await proxy.stop()


async def test_a_connection_starts_at_a_node_that_answers(amqp_url: str):
    dead = with_address(amqp_url, f"127.0.0.1:{free_port()}")
    addresses = Addresses(f"{dead},{URL(amqp_url).host}:{URL(amqp_url).port or 5672}")
    for _ in range(2):  # whichever entry it starts with
        connection = await addresses.connect(attempt_seconds=5)
        await connection.close()


async def test_a_service_moves_to_the_next_node_when_its_node_goes_away(
    amqp_url: str, queue_prefix: str, two_nodes: tuple[Proxy, Proxy]
):
    first, second = two_nodes
    listed = ",".join(with_address(amqp_url, proxy.url_host) for proxy in two_nodes)
    topology = Topology(prefix=queue_prefix + "-addr", partitions=2)
    broker = Broker(listed, topology, publish_timeout=5)
    broker.start()
    try:
        await asyncio.wait_for(broker.wait_connected(), 30)
        on, other = (first, second) if broker.node == first.url_host else (second, first)
        assert broker.node == on.url_host
        await broker.publish("inbound", conversation_in(0, 2), b"{}", message_id="before")

        await on.stop()  # the node goes away, and stays away

        async def moved() -> bool:
            return broker.ready and broker.node == other.url_host

        await eventually(moved, timeout=30, interval=0.2)

        async def published() -> bool:
            try:
                await broker.publish("inbound", conversation_in(1, 2), b"{}", message_id="after")
            except BrokerUnavailable:
                return False
            return True

        await eventually(published, timeout=30, interval=0.2)
        # Both are in the cluster's queues: the one published before and the one after.
        assert await _ready(amqp_url, topology) == [1, 1]
    finally:
        await broker.close()
        await _delete(amqp_url, topology)


async def _ready(amqp_url: str, topology: Topology) -> list[int]:
    """Messages ready in the topology's inbound partitions."""
    connection = await aio_pika.connect(amqp_url)
    async with connection, connection.channel() as channel:
        names = [topology.queue("inbound", p) for p in range(topology.partitions)]
        declared = [await channel.declare_queue(name, passive=True) for name in names]
        return [queue.declaration_result.message_count or 0 for queue in declared]


async def _delete(amqp_url: str, topology: Topology) -> None:
    connection = await aio_pika.connect(amqp_url)
    async with connection, connection.channel() as channel:
        for name in topology.queue_names():
            await channel.queue_delete(name)
