"""Several addresses of one RabbitMQ cluster, and a robust connection that moves along them.

`RELAY_AMQP_URL` may list the nodes of a cluster, comma-separated. An entry is a whole URL,
or just `host:port`, which takes the scheme, credentials, virtual host and query of the
first entry:

    amqp://relay:secret@rabbit-0:5672/prod?heartbeat=10,rabbit-1:5672,rabbit-2:5672

A client talks to one node at a time (AMQP has no multi-node connection); the cluster
serves every queue from any node. Each service starts at a random entry, so the
services' connections spread over the nodes, and every attempt after a lost connection or
a failed attempt goes to the next entry: a node that stays down is skipped until it is
the only one left.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import aio_pika
from aio_pika import RobustConnection
from aio_pika.abc import AbstractConnection
from aio_pika.exceptions import CONNECTION_EXCEPTIONS
from yarl import URL

CONNECT_ERRORS: tuple[type[BaseException], ...] = (*CONNECTION_EXCEPTIONS, TimeoutError)


def parse_addresses(value: str) -> list[URL]:
    """The URLs of a comma-separated address list (ValueError if one is not usable)."""
    entries = [entry.strip() for entry in value.split(",") if entry.strip()]
    if not entries:
        raise ValueError("no address given")
    first = URL(entries[0])
    if first.scheme not in ("amqp", "amqps") or not first.host:
        raise ValueError("the first address must be a whole amqp:// or amqps:// URL")
    urls = [first]
    for entry in entries[1:]:
        urls.append(URL(entry) if "://" in entry else _like(first, entry))
        if urls[-1].scheme not in ("amqp", "amqps") or not urls[-1].host:
            raise ValueError(f"address {len(urls)} is neither a URL nor host:port")
    return urls


def _like(first: URL, host_port: str) -> URL:
    """`host:port` with everything else taken from `first`."""
    host, _, port = host_port.rpartition(":") if ":" in host_port else (host_port, "", "")
    try:
        number = int(port) if port else first.port
    except ValueError as error:
        raise ValueError(f"{host_port!r}: the port is not a number") from error
    return first.with_host(host).with_port(number)


def node_of(url: URL) -> str:
    """`host:port` of an address: what logs and metrics may show (never the password)."""
    return f"{url.host}:{url.port}"


class ClusterConnection(RobustConnection):
    """aio-pika's robust connection (channels restored after a reconnect), each new attempt
    going to the next address of the cluster."""

    def __init__(self, addresses: Sequence[URL], start: int = 0, **kwargs: Any) -> None:
        self._addresses = list(addresses)
        self._index = start % len(self._addresses)
        self._attempts = 0
        super().__init__(self._addresses[self._index], **kwargs)

    @property
    def node(self) -> str:
        """The node this connection talks to (or tries next)."""
        return node_of(self.url)

    # aio-pika makes every attempt, the first and each reconnect, through this private
    # method of RobustConnection (name-mangled); it connects to `self.url`.
    async def _RobustConnection__connect_transport(self) -> None:
        if self._attempts:
            self._index = (self._index + 1) % len(self._addresses)
            self.url = self._addresses[self._index]
        self._attempts += 1
        await super()._RobustConnection__connect_transport()  # type: ignore[misc]


class Addresses:
    """The cluster's addresses, handed out in turn from a random first one: each service's
    connections spread over the nodes, and a new attempt does not return to the node that
    just failed."""

    def __init__(self, value: str) -> None:
        self.urls = parse_addresses(value)
        self._next = random.randrange(len(self.urls))

    def _take(self) -> int:
        index, self._next = self._next, (self._next + 1) % len(self.urls)
        return index

    async def connect_robust(self, attempt_seconds: float) -> ClusterConnection:
        """A robust connection to the next node (raises if that first attempt fails)."""
        connection = ClusterConnection(self.urls, start=self._take())
        try:
            await connection.connect(timeout=attempt_seconds)
        except BaseException:
            await connection.close()
            raise
        return connection

    async def connect(self, attempt_seconds: float) -> AbstractConnection:
        """A plain connection to the first node that answers, each tried in turn for at
        most `attempt_seconds`."""
        error: BaseException | None = None
        for _ in self.urls:
            try:
                return await aio_pika.connect(self.urls[self._take()], timeout=attempt_seconds)
            except CONNECT_ERRORS as failed:
                error = failed
        assert error is not None
        raise error
