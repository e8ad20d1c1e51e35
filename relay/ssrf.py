"""The SSRF guard: the delivery worker reaches only public addresses (plus an allowlist).

Three checks, each at the point where the HTTP client (aiohttp) makes its own decision:
- the URL's host as aiohttp's parser (yarl) reads it: refused unless it is written in ASCII
  (yarl reads fullwidth or circled digits and ideographic full stops as ASCII ones, so a
  "name" can be 127.0.0.1), is a canonical dotted quad if it reads as an IPv4 number
  (`2130706433`, `0x7f.1`, `127.1`), and is the host `urlsplit` sees too (no user-info
  tricks); a literal address is judged here;
- a name, through `GuardedResolver`: its addresses as aiohttp resolves them, at connect
  time, so DNS rebinding between checks gains nothing;
- every connection, through `PeerGuard`: the address a socket is about to connect to,
  whatever form the URL gave it in, so nothing reaches a peer the guard has not judged.
IPv6 forms that embed an IPv4 address (mapped, 6to4, NAT64) are judged by that address.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Mapping, Sequence
from urllib.parse import SplitResult, urlsplit

import aiohttp
import yarl
from aiohappyeyeballs import AddrInfoType
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")  # deprecated, but still routed by some
_SITE_LOCAL = ipaddress.ip_network("fec0::/10")
_SHARED = ipaddress.ip_network("100.64.0.0/10")  # carrier-grade NAT
# Translators of a site's own, which may reach anything behind them (and which Python 3.11
# counts as global): the local-use NAT64 prefix (RFC 8215, where the IPv4 part sits
# wherever the site's prefix length puts it) and IPv4-translated addresses (SIIT, RFC 2765).
_NEVER_PUBLIC = (
    ipaddress.ip_network("64:ff9b:1::/48"),
    ipaddress.ip_network("::ffff:0:0:0/96"),
)

# What DNS names are made of (underscores occur in practice); no "%", space or empty label.
_NAME = re.compile(r"[a-z0-9_-]+(?:\.[a-z0-9_-]+)*\.?")
# A last label that makes a WHATWG URL parser read the whole host as an IPv4 number.
_NUMBER = re.compile(r"[0-9]+|0x[0-9a-f]*")
_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_DOTTED_QUAD = re.compile(rf"{_OCTET}(?:\.{_OCTET}){{3}}")


class EndpointRefused(OSError):
    """The endpoint's address is not one the delivery worker may reach."""


def embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address inside a mapped, 6to4 or NAT64 IPv6 address."""
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address in _NAT64 or address in _IPV4_COMPATIBLE:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def is_public(address: Address) -> bool:
    """True for a globally routable unicast address."""
    if isinstance(address, ipaddress.IPv6Address):
        inner = embedded_ipv4(address)
        if inner is not None:
            return is_public(inner)
    if address.is_multicast or address in _SHARED:
        return False
    if isinstance(address, ipaddress.IPv6Address) and (
        address in _SITE_LOCAL or any(address in network for network in _NEVER_PUBLIC)
    ):
        return False
    return address.is_global


def allowed(address: Address, networks: Sequence[Network]) -> bool:
    """True if the delivery worker may connect to `address`."""
    return is_public(address) or any(address in network for network in networks)


def _require_allowed(address: Address, networks: Sequence[Network]) -> None:
    if allowed(address, networks):
        return
    inner = embedded_ipv4(address) if isinstance(address, ipaddress.IPv6Address) else None
    shown = inner is not None and address not in _IPV4_COMPATIBLE  # ::1 carries no address
    carried = f" (it carries {inner})" if shown else ""
    raise EndpointRefused(f"{address} is not a public address{carried}")


def _split(url: str) -> SplitResult:
    try:
        return urlsplit(url)
    except ValueError as error:  # e.g. a malformed IPv6 host
        raise EndpointRefused(f"not a valid URL: {_reason(error)}") from error


def _parsed(url: str) -> yarl.URL:
    """The URL as aiohttp will read it."""
    try:
        return yarl.URL(url)
    except (ValueError, TypeError, IndexError) as error:  # IndexError: e.g. "http://[::1]@/"
        raise EndpointRefused(f"not a valid URL: {_reason(error)}") from error


def _reason(error: Exception) -> str:
    """The parser's reason, unless it quotes the authority (user info may hold a password)
    or says nothing to a reader (an IndexError)."""
    text = str(error)
    if "@" in text or isinstance(error, IndexError):
        return "its authority cannot be parsed"
    return text


def check_scheme(url: str, https_only: bool) -> None:
    """Refuse a URL whose scheme endpoints may not use (only https:// if `https_only`)."""
    allowed_schemes = ("https",) if https_only else ("http", "https")
    scheme = _split(url).scheme
    if scheme not in allowed_schemes:
        wanted = " or ".join(f"{name}://" for name in allowed_schemes)
        raise EndpointRefused(f"scheme {scheme!r} is not allowed for endpoints (use {wanted})")


def client_host(url: str) -> str:
    """The host aiohttp will connect to for `url` (a name, or an address without brackets);
    EndpointRefused for a host written so that a reader could take it for another."""
    written = _split(url).hostname or ""
    host = _parsed(url).raw_host or ""
    if not host:
        raise EndpointRefused("the URL has no host")
    if not written.isascii():
        raise EndpointRefused(
            f"the host {written!r} is not ASCII (the HTTP client reads it as {host!r}); "
            "write an internationalized name in punycode (xn--...)"
        )
    if not _same_host(written, host):
        raise EndpointRefused(
            f"the URL's host is ambiguous ({written!r} or {host!r}): "
            "percent-encode '@', '\\' and ':' in user info"
        )
    if ":" not in host:
        _check_name(host)
    return host


def _same_host(written: str, host: str) -> bool:
    try:
        return ipaddress.ip_address(written) == ipaddress.ip_address(host)
    except ValueError:
        return written == host


def _check_name(host: str) -> None:
    """Refuse a host other than a canonical dotted quad or a plain DNS name."""
    labels = host.split(".")
    last = labels[-2] if not labels[-1] and len(labels) > 1 else labels[-1]
    if _NUMBER.fullmatch(last) and not _DOTTED_QUAD.fullmatch(host):
        raise EndpointRefused(
            f"the host {host!r} is a numeric IPv4 form other than a dotted quad "
            "(write an address as four decimal numbers, like 203.0.113.10)"
        )
    if not _NAME.fullmatch(host):
        raise EndpointRefused(
            f"the host {host!r} is not a host name (letters, digits, '-', '_' and '.')"
        )


def check_url(url: str, networks: Sequence[Network], https_only: bool) -> None:
    """Refuse a URL by its text: its scheme, a host the HTTP client would read otherwise
    than it is written, and a literal address the guard does not allow (names are checked
    as they resolve, and every address as it is connected to)."""
    check_scheme(url, https_only)
    host = client_host(url)
    try:
        literal = ipaddress.ip_address(host)
    except ValueError:
        return
    _require_allowed(literal, networks)


class PeerGuard:
    """aiohttp's socket factory (`TCPConnector(socket_factory=...)`): called with each
    address the connector is about to connect to, once names are resolved and literals
    parsed, it refuses (EndpointRefused) any address the guard does not allow."""

    def __init__(self, networks: Sequence[Network]) -> None:
        self._networks = list(networks)

    def __call__(self, addr_info: AddrInfoType) -> socket.socket:
        family, kind, proto, _, peer = addr_info
        try:
            address = ipaddress.ip_address(peer[0])
        except (ValueError, TypeError, IndexError) as error:
            raise EndpointRefused(f"{peer!r} is not an IP address") from error
        _require_allowed(address, self._networks)
        return socket.socket(family=family, type=kind, proto=proto)


def guarded_connector(networks: Sequence[Network]) -> aiohttp.TCPConnector:
    """The one connector every request to an endpoint goes through: names resolved by
    `GuardedResolver`, and the address of every connection judged by `PeerGuard`."""
    return aiohttp.TCPConnector(
        resolver=GuardedResolver(networks), socket_factory=PeerGuard(networks), limit=0
    )


def guarded_session(
    networks: Sequence[Network],
    timeout: aiohttp.ClientTimeout,
    headers: Mapping[str, str] | None = None,
) -> aiohttp.ClientSession:
    """A client session that connects only to addresses the guard allows, directly: proxies
    from the environment are never used. Callers pass `allow_redirects=False`: a redirect's
    target has not been through `check_url`."""
    return aiohttp.ClientSession(
        connector=guarded_connector(networks), timeout=timeout, headers=headers, trust_env=False
    )


class GuardedResolver(AbstractResolver):
    """Resolves like aiohttp does, then drops every address the guard refuses."""

    def __init__(self, networks: Sequence[Network], inner: AbstractResolver | None = None):
        self._networks = list(networks)
        self._inner = inner or DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        """The host's addresses that may be reached; EndpointRefused if none may."""
        results = await self._inner.resolve(host, port, family)
        kept = [r for r in results if allowed(ipaddress.ip_address(r["host"]), self._networks)]
        if not kept:
            raise EndpointRefused(f"{host} resolves only to addresses that are not public")
        return kept

    async def close(self) -> None:
        """Close the inner resolver."""
        await self._inner.close()
