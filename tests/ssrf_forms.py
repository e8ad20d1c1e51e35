"""Hostile spellings of internal addresses, and an internal service that counts connections.

Every URL in `INTERNAL` names, for the HTTP client, an address the SSRF guard must refuse:
loopback (where `{port}` is filled with the port of a `Listener` on 127.0.0.1), the cloud
metadata address, or an IPv6 form carrying one of those. The guard must refuse each one
before any connection is made, so the listener's count stays at zero.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

# Non-ASCII digits and dots, which yarl (aiohttp's URL parser) reads as ASCII ones:
# fullwidth 127, ideographic full stops, circled 1 2 7, fullwidth 169.
NON_ASCII = [
    pytest.param("http://\uff11\uff12\uff17.0.0.1:{port}/hook", id="fullwidth-digits"),
    pytest.param("http://127\u30020\u30020\u30021:{port}/hook", id="ideographic-full-stops"),
    pytest.param("http://\u2460\u2461\u2466.0.0.1:{port}/hook", id="circled-digits"),
    pytest.param(
        "http://\uff11\uff16\uff19.254.169.254/latest/meta-data/", id="fullwidth-metadata"
    ),
]
# Numeric IPv4 forms other than the dotted quad (a WHATWG parser reads them as 127.0.0.1).
NUMERIC = [
    pytest.param("http://2130706433:{port}/hook", id="decimal"),
    pytest.param("http://0177.0.0.1:{port}/hook", id="octal"),
    pytest.param("http://0x7f.1:{port}/hook", id="hex"),
    pytest.param("http://0x7f000001:{port}/hook", id="hex-whole"),
    pytest.param("http://127.1:{port}/hook", id="two-parts"),
    pytest.param("http://127.0.0.1.:{port}/hook", id="trailing-dot"),
]
# IPv6 forms carrying 127.0.0.1, and the metadata service.
EMBEDDED = [
    pytest.param("http://[::ffff:127.0.0.1]:{port}/hook", id="ipv4-mapped"),
    pytest.param("http://[::ffff:7f00:1]:{port}/hook", id="ipv4-mapped-hex"),
    pytest.param("http://[64:ff9b::7f00:1]:{port}/hook", id="nat64"),
    pytest.param("http://[2002:7f00:1::]:{port}/hook", id="6to4"),
    pytest.param("http://169.254.169.254/latest/meta-data/", id="metadata"),
    pytest.param("http://[fd00:ec2::254]/latest/meta-data/", id="metadata-ipv6"),
    pytest.param("http://[64:ff9b::a9fe:a9fe]/latest/meta-data/", id="metadata-nat64"),
    # A site's own translators (Python 3.11 counts these as global).
    pytest.param("http://[64:ff9b:1::a9fe:a9fe]/latest/meta-data/", id="local-nat64-metadata"),
    pytest.param("http://[::ffff:0:7f00:1]:{port}/hook", id="ipv4-translated"),
]
INTERNAL = NON_ASCII + NUMERIC + EMBEDDED


@dataclass
class Listener:
    """A TCP service on 127.0.0.1 that counts the connections it accepts (and drops them)."""

    port: int = 0
    connections: int = 0

    def url(self, form: str) -> str:
        return form.format(port=self.port)


@contextlib.asynccontextmanager
async def listening() -> AsyncIterator[Listener]:
    """A `Listener` until the block ends."""
    listener = Listener()

    def accepted(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        listener.connections += 1
        writer.close()

    server = await asyncio.start_server(accepted, "127.0.0.1", 0)
    listener.port = server.sockets[0].getsockname()[1]
    async with server:
        yield listener
