"""Where the test suite finds RabbitMQ and PostgreSQL.

The local services by default (overridable by `RELAY_TEST_AMQP_URL` and
`RELAY_TEST_POSTGRES_URL`); when nothing answers there and a Docker engine does,
testcontainers starts them, so a contributor with only Docker can run `make test` too.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from urllib.parse import urlsplit

DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
DEFAULT_POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/test"


def answers(url: str, default_port: int) -> bool:
    """True if something accepts TCP connections at the URL's host and port."""
    parts = urlsplit(url)
    try:
        with socket.create_connection(
            (parts.hostname or "127.0.0.1", parts.port or default_port), timeout=1
        ):
            return True
    except OSError:
        return False


def docker_available() -> bool:
    """True if a Docker engine answers."""
    try:
        import docker

        docker.from_env().ping()
    except Exception:
        return False
    return True


def _unreachable(what: str, url: str) -> RuntimeError:
    return RuntimeError(
        f"{what} does not answer at {url} and no Docker engine is available for "
        f"testcontainers; start it (see .ci/run) or set RELAY_TEST_*_URL"
    )


@contextlib.contextmanager
def rabbitmq_url() -> Iterator[str]:
    """An AMQP URL of a running RabbitMQ, local or in a container."""
    url = os.environ.get("RELAY_TEST_AMQP_URL", DEFAULT_AMQP_URL)
    if answers(url, 5672):
        yield url
        return
    if not docker_available():
        raise _unreachable("RabbitMQ", url)
    from testcontainers.rabbitmq import RabbitMqContainer

    with RabbitMqContainer("rabbitmq:3.12") as container:
        host = container.get_container_host_ip()
        yield f"amqp://guest:guest@{host}:{container.get_exposed_port(5672)}/"


@contextlib.contextmanager
def postgres_url() -> Iterator[str]:
    """A PostgreSQL URL of a running server, local or in a container."""
    url = os.environ.get("RELAY_TEST_POSTGRES_URL", DEFAULT_POSTGRES_URL)
    if answers(url, 5432):
        yield url
        return
    if not docker_available():
        raise _unreachable("PostgreSQL", url)
    from testcontainers.postgres import PostgresContainer

    with PostgresContainer("postgres:15", driver=None) as container:
        yield container.get_connection_url()
