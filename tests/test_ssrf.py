"""The SSRF guard sees the host as the HTTP client connects (issue 20): `check_url` judges
the host yarl (aiohttp's parser) will connect to, refusing non-ASCII and non-canonical
numeric hosts; every connection's peer is judged as the socket is made (`PeerGuard`); a
`Sender` refuses every hostile form at once, without retrying and without reaching an
internal listener. The admin API, the CLI and the delivery worker: test_ssrf_entry_points."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from relay import ssrf
from relay.auth import new_signing_secret
from tests.receivers import serve_receiver, serving
from tests.ssrf_forms import EMBEDDED, INTERNAL, NON_ASCII, Listener, listening
from workers.delivery.sender import Sender, Sent

LOOPBACK = [ipaddress.ip_network("127.0.0.0/8")]
# Refused whatever the allowlist: by how the host is written, or by what it carries.
NETWORKS = [pytest.param([], id="no-allowlist"), pytest.param(LOOPBACK, id="loopback-allowed")]
# Refused by their text alone (aiohttp would not connect to them either, or not as written).
MALFORMED = [
    pytest.param("http://evil.example\\@127.0.0.1:8080/", id="backslash-userinfo"),
    pytest.param("http://127.0.0.1:8080\\@evil.example/", id="backslash-host"),
    pytest.param("http://%31%32%37.0.0.1/", id="percent-encoded"),
    pytest.param("http://bücher.example/", id="unicode-name"),
    pytest.param("http://exa\u00admple.com/", id="soft-hyphen"),
    pytest.param("http://foo.0x10/", id="ends-in-hex"),
    pytest.param("http://1.2.3.4.5/", id="five-parts"),
    pytest.param("http://127.000.0.1/", id="padded-octet"),
    pytest.param("http://256.0.0.1/", id="octet-over-255"),
    pytest.param("http://[::1]@/", id="empty-host"),
]
PUBLIC = [
    "http://example.com/hook",
    "https://example.com./hook",
    "https://xn--bcher-kva.example/hook",  # an internationalized name in punycode
    "https://user:p%40ss@example.com/hook",
    "http://1e1.example/hook",  # looks numeric, is a name
    "http://8.8.8.8:8080/hook",
    "http://[2606:4700:4700::1111]/hook",
    "http://[::ffff:8.8.8.8]/hook",
]


@pytest.fixture
async def internal() -> AsyncIterator[Listener]:
    async with listening() as listener:
        yield listener


@pytest.mark.parametrize("networks", NETWORKS)
@pytest.mark.parametrize("form", INTERNAL + MALFORMED)
def test_check_url_refuses_every_form_of_an_internal_address(
    form: str, networks: list[ssrf.Network]
) -> None:
    with pytest.raises(ssrf.EndpointRefused) as refused:
        ssrf.check_url(form.format(port=8080), networks, https_only=False)
    assert str(refused.value)


@pytest.mark.parametrize(
    ("form", "says"),
    [
        (  # fullwidth digits
            "http://\uff11\uff12\uff17.0.0.1/",
            "'\uff11\uff12\uff17.0.0.1' is not ASCII (the HTTP client reads it as '127.0.0.1')",
        ),
        ("http://2130706433/", "numeric IPv4 form other than a dotted quad"),
        (
            "http://[::ffff:127.0.0.1]/",
            # The address itself reads ::ffff:7f00:1 before Python 3.13, ::ffff:127.0.0.1 after.
            "is not a public address (it carries 127.0.0.1)",
        ),
        ("http://[64:ff9b::a9fe:a9fe]/", "it carries 169.254.169.254"),
        ("http://bücher.example/", "write an internationalized name in punycode"),
    ],
)
def test_a_refusal_says_why(form: str, says: str) -> None:
    with pytest.raises(ssrf.EndpointRefused) as refused:
        ssrf.check_url(form, [], https_only=False)
    assert says in str(refused.value)


def test_a_refusal_never_shows_the_password_of_the_url() -> None:
    with pytest.raises(ssrf.EndpointRefused) as refused:
        ssrf.check_url("http://user:hunter2@ex\u00e4mple.com\uff0f@x/", [], https_only=False)
    assert "hunter2" not in str(refused.value)


@pytest.mark.parametrize("url", PUBLIC)
def test_check_url_lets_public_hosts_through(url: str) -> None:
    ssrf.check_url(url, [], https_only=False)


def test_check_url_lets_an_allowlisted_address_through() -> None:
    ssrf.check_url("http://127.0.0.1:8090/r", LOOPBACK, https_only=False)
    with pytest.raises(ssrf.EndpointRefused):
        ssrf.check_url("http://127.0.0.1:8090/r", [], https_only=False)


@pytest.mark.parametrize(
    ("family", "peer"),
    [
        (socket.AF_INET, ("127.0.0.1", 80)),
        (socket.AF_INET, ("169.254.169.254", 80)),
        (socket.AF_INET6, ("::ffff:127.0.0.1", 80, 0, 0)),
        (socket.AF_INET6, ("64:ff9b::7f00:1", 80, 0, 0)),
        (socket.AF_INET6, ("2002:7f00:1::", 80, 0, 0)),
        (socket.AF_INET6, ("fd00:ec2::254", 80, 0, 0)),
        (socket.AF_INET6, ("::1", 80, 0, 0)),
    ],
)
def test_the_peer_guard_makes_no_socket_for_an_internal_peer(
    family: socket.AddressFamily, peer: tuple[object, ...]
) -> None:
    guard = ssrf.PeerGuard([])
    with pytest.raises(ssrf.EndpointRefused, match="not a public address"):
        guard((family, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", peer))


def test_the_peer_guard_makes_sockets_for_public_and_allowlisted_peers() -> None:
    stream = (socket.SOCK_STREAM, socket.IPPROTO_TCP, "")
    made = [
        ssrf.PeerGuard([])((socket.AF_INET, *stream, ("8.8.8.8", 80))),
        ssrf.PeerGuard([])((socket.AF_INET6, *stream, ("2606:4700:4700::1111", 80, 0, 0))),
        ssrf.PeerGuard(LOOPBACK)((socket.AF_INET, *stream, ("127.0.0.1", 80))),
    ]
    assert [s.family for s in made] == [socket.AF_INET, socket.AF_INET6, socket.AF_INET]
    for made_socket in made:
        made_socket.close()


# The forms aiohttp connects to as literal addresses, without a resolver (it refuses the
# numeric ones itself since 3.14.1): with `check_url` skipped, only the connection's own
# check stands between them and the peer.
@pytest.mark.parametrize("form", NON_ASCII + EMBEDDED)
async def test_a_guarded_session_refuses_the_connection_itself(
    form: str, internal: Listener
) -> None:
    timeout = aiohttp.ClientTimeout(total=2, sock_connect=1)
    async with ssrf.guarded_session([], timeout) as http:
        with pytest.raises(aiohttp.ClientConnectorError) as failed:
            await http.post(internal.url(form), data=b"{}", allow_redirects=False)
    assert isinstance(failed.value.os_error, ssrf.EndpointRefused), failed.value
    assert internal.connections == 0


async def test_a_guarded_session_reaches_an_allowlisted_listener(internal: Listener) -> None:
    """The listener counts what reaches it: the tests above would see a connection."""
    timeout = aiohttp.ClientTimeout(total=2, sock_connect=1)
    async with ssrf.guarded_session(LOOPBACK, timeout) as http:
        with pytest.raises(aiohttp.ClientError):  # the listener hangs up at once
            await http.post(f"http://127.0.0.1:{internal.port}/", data=b"{}")
    assert internal.connections == 1


@pytest.fixture
async def sender(request: pytest.FixtureRequest) -> AsyncIterator[Sender]:
    """A delivery `Sender` (no allowlist, unless the test passes networks)."""
    opened = Sender(getattr(request, "param", []), https_only=False, connect=1.0, total=2.0)
    yield opened
    await opened.close()


async def send(sender: Sender, url: str) -> Sent:
    return await sender.send(url, b'{"type":"text"}', "msg_ssrf", [new_signing_secret()])


@pytest.mark.parametrize("sender", NETWORKS, indirect=True)
@pytest.mark.parametrize("form", INTERNAL)
async def test_a_delivery_to_any_form_is_refused_at_once_and_reaches_nothing(
    form: str, sender: Sender, internal: Listener
) -> None:
    sent = await send(sender, internal.url(form))
    assert sent.refused, sent  # refused: the worker dead-letters it on this first attempt
    assert sent.status is None
    assert internal.connections == 0


@pytest.mark.parametrize("sender", [LOOPBACK], indirect=True)
async def test_an_allowlisted_network_still_gets_deliveries(sender: Sender) -> None:
    async with serve_receiver() as receiver:
        sent = await send(sender, receiver.on("allowed"))
        assert (sent.status, sent.refused) == (200, False)
        assert len(receiver.at("allowed")) == 1


# The internal listener is allowlisted below: only the sender's own rule keeps it out.
@pytest.mark.parametrize("sender", [LOOPBACK], indirect=True)
async def test_a_redirect_is_not_followed(sender: Sender, internal: Listener) -> None:
    async def moved(_: web.Request) -> web.Response:
        raise web.HTTPFound(f"http://127.0.0.1:{internal.port}/")

    app = web.Application()
    app.router.add_post("/hook", moved)
    async with serving(app) as base:
        sent = await send(sender, f"{base}/hook")
    assert (sent.status, sent.ok) == (302, False)
    assert internal.connections == 0


@pytest.mark.parametrize("sender", [LOOPBACK], indirect=True)
async def test_proxies_from_the_environment_are_never_used(
    sender: Sender, internal: Listener, monkeypatch: pytest.MonkeyPatch
) -> None:
    for scheme in ("http", "https", "all"):
        for name in (f"{scheme}_proxy", f"{scheme.upper()}_PROXY"):
            monkeypatch.setenv(name, f"http://127.0.0.1:{internal.port}")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    async with serve_receiver() as receiver:
        sent = await send(sender, receiver.on("direct"))
        assert sent.status == 200
        assert len(receiver.at("direct")) == 1
    assert internal.connections == 0
