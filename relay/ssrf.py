"""The SSRF guard: the delivery worker reaches only public addresses (plus an allowlist).

The check is on the addresses the name resolves to when connecting (a resolver that aiohttp
connects through), not on the URL text, so a name that resolves to 127.0.0.1 or changes its
answer between checks (DNS rebinding) is refused too. IPv6 forms that embed an IPv4 address
(mapped, 6to4, NAT64) are judged by that address.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Sequence
from urllib.parse import SplitResult, urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")  # deprecated, but still routed by some
_SITE_LOCAL = ipaddress.ip_network("fec0::/10")
_SHARED = ipaddress.ip_network("100.64.0.0/10")  # carrier-grade NAT


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
    if isinstance(address, ipaddress.IPv6Address) and address in _SITE_LOCAL:
        return False
    return address.is_global


def allowed(address: Address, networks: Sequence[Network]) -> bool:
    """True if the delivery worker may connect to `address`."""
    return is_public(address) or any(address in network for network in networks)


def _split(url: str) -> SplitResult:
    try:
        return urlsplit(url)
    except ValueError as error:  # e.g. a malformed IPv6 host
        raise EndpointRefused(f"not a valid URL: {error}") from error


def check_scheme(url: str, https_only: bool) -> None:
    """Refuse a URL whose scheme endpoints may not use (only https:// if `https_only`)."""
    allowed_schemes = ("https",) if https_only else ("http", "https")
    scheme = _split(url).scheme
    if scheme not in allowed_schemes:
        wanted = " or ".join(f"{name}://" for name in allowed_schemes)
        raise EndpointRefused(f"scheme {scheme!r} is not allowed for endpoints (use {wanted})")


def check_url(url: str, networks: Sequence[Network], https_only: bool) -> None:
    """Refuse a URL by its text: scheme, and a literal address (names are checked later)."""
    check_scheme(url, https_only)
    host = (_split(url).hostname or "").strip("[]")
    try:
        literal = ipaddress.ip_address(host)
    except ValueError:
        return
    if not allowed(literal, networks):
        raise EndpointRefused(f"{literal} is not a public address")


def guarded_session(
    networks: Sequence[Network], timeout: aiohttp.ClientTimeout
) -> aiohttp.ClientSession:
    """A client session that connects only to addresses the guard allows (names resolved
    through `GuardedResolver`; literal addresses are for `check_url`)."""
    connector = aiohttp.TCPConnector(resolver=GuardedResolver(networks), limit=0)
    return aiohttp.ClientSession(connector=connector, timeout=timeout)


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
