"""Who a request comes from, and the budget of failed authentications of each client.

A request that fails authentication (a 401, or a 404 for an integration that does not
exist) takes a token from its client's bucket (`RELAY_AUTH_FAILURE_RATE` per second,
bursts of `RELAY_AUTH_FAILURE_BURST`). A client whose bucket is empty is answered 429
before anything else is looked at: guessing tokens or integration ids then costs the
relay no store query. Requests that succeed take nothing, and a client over its budget is
still served when it presents a credential that succeeded here lately (its hash is kept):
an attacker behind the same address (a proxy, a carrier's NAT) does not lock out the
tenants whose tokens work.

The client is the peer address, unless the peer is a trusted proxy
(`RELAY_TRUSTED_PROXIES`): then the right-most X-Forwarded-For entry that is not one (each
proxy appends the address it saw, so entries left of it are the client's to write). IPv6
clients count by their /64, the block one host is usually given.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable, Sequence

from aiohttp import hdrs, web
from aiohttp.typedefs import Handler

from relay.auth import bearer_token, hash_token
from relay.errors import ApiError, NotFound, RateLimited, Unauthorized
from relay.ingress.ratelimit import RateLimiter, retry_after
from relay.lru import Lru
from relay.metrics import Metrics

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# Probes of the orchestrator never fail authentication, and must not be refused for
# another client's failures behind the same address.
_EXEMPT = frozenset({"/healthz", "/readyz"})


class UnknownTarget(NotFound):
    """What the path names (an integration) does not exist: answered before any token is
    checked, so it counts as a failed authentication."""


def client_address(request: web.BaseRequest, trusted: Sequence[Network]) -> str:
    """The key of the request's client: its address (IPv6: its /64)."""
    peer = _address(request.remote or "")
    if peer is None or not _within(peer, trusted):
        return _key(peer, request.remote or "unknown")
    entries = [
        entry.strip()
        for header in request.headers.getall(hdrs.X_FORWARDED_FOR, [])
        for entry in header.split(",")
        if entry.strip()
    ]
    for entry in reversed(entries):
        address = _address(entry)
        if address is None or not _within(address, trusted):
            return _key(address, entry)
    # Every hop is trusted: the first one named the client.
    return _key(_address(entries[0]), entries[0]) if entries else _key(peer, "")


def _address(text: str) -> Address | None:
    """An address as peers and proxies write it (`::1`, `[::1]:80`, `1.2.3.4:80`), or None."""
    if text.startswith("["):
        text = text[1:].partition("]")[0]
    elif text.count(":") == 1:
        text = text.partition(":")[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _within(address: Address, networks: Sequence[Network]) -> bool:
    return any(address in network for network in networks)


def _key(address: Address | None, text: str) -> str:
    if address is None:
        return text[:64]  # not an address: a proxy's own notation, kept as it is
    if isinstance(address, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


def credential_of(request: web.BaseRequest) -> str | None:
    """The hash of what the request authenticates with (bearer, or a `?token=`), if any."""
    token = bearer_token(request.headers.get(hdrs.AUTHORIZATION)) or request.query.get("token")
    return hash_token(token) if token else None


class ProvenCredentials:
    """Hashes of credentials that succeeded here lately, the least recent out first."""

    def __init__(self, limit: int = 10_000) -> None:
        self._hashes: Lru[str, bool] = Lru(limit)

    def holds(self, credential: str | None) -> bool:
        return credential is not None and self._hashes.get(credential) is not None

    def add(self, credential: str | None) -> None:
        if credential is not None:
            self._hashes.put(credential, True)

    def forget(self, credential: str | None) -> None:
        if credential is not None:
            self._hashes.pop(credential)


def failed_authentication(error: ApiError) -> bool:
    """Whether an error answer means the request failed authentication."""
    return isinstance(error, Unauthorized | UnknownTarget)


class AuthFailures:
    """The failed-authentication budget of every client (rate 0: no limit)."""

    def __init__(
        self,
        rate: float,
        burst: int,
        trusted: Sequence[Network],
        metrics: Metrics,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._buckets = RateLimiter(rate, burst, clock)
        self._trusted = list(trusted)
        self._metrics = metrics
        self._proven = ProvenCredentials()

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Refuse a client over its budget before the handler runs; charge it after a
        failed authentication."""
        if request.path in _EXEMPT:
            return await handler(request)
        client = client_address(request, self._trusted)
        credential = credential_of(request)
        if not self._proven.holds(credential):
            self._refuse_if_spent(client)
        try:
            response = await handler(request)
        except ApiError as error:
            if failed_authentication(error):
                self._failed(client, credential)
            raise
        if response.status == Unauthorized.status:
            self._failed(client, credential)
        elif response.status < 400:
            self._proven.add(credential)
        return response

    def _failed(self, client: str, credential: str | None) -> None:
        self._buckets.check(client)
        self._proven.forget(credential)

    def _refuse_if_spent(self, client: str) -> None:
        wait = self._buckets.wait(client)
        if wait:
            self._metrics.limit_refusals.labels("auth_failure_rate").inc()
            raise RateLimited(
                "too many requests from this address failed authentication; try again later",
                details={"limit": "auth_failure_rate"},
                headers={"Retry-After": retry_after(wait)},
            )
