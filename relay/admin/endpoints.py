"""The check of a back end's response endpoint, before an integration uses it: a scheme and
host deliveries may use, and (unless told not to) a signed test event answered with a 2xx.

Through the same guard as deliveries (`relay.ssrf`), so the check cannot be used to reach
what deliveries may not.
"""

from __future__ import annotations

import json
import uuid
from urllib.parse import urlsplit, urlunsplit

import aiohttp

from relay.admin.errors import AdminError
from relay.settings import Settings
from relay.signing import signature_headers
from relay.ssrf import EndpointRefused, check_scheme, check_url, client_host, guarded_session
from relay.wire import utcnow

TEST_EVENT = {"type": "test", "payload": "test"}


async def check_endpoint(settings: Settings, response_url: str, secret: str, verify: bool) -> None:
    """AdminError unless `response_url` is one deliveries may use and (if `verify`) answers
    a signed test event with a 2xx."""
    check_shape(settings, response_url, "response")
    if verify:
        await verify_endpoint(response_url, secret, settings)


def check_shape(settings: Settings, url: str, role: str) -> None:
    """AdminError unless `url` has a scheme deliveries use and a host the HTTP client reads
    as written (checked always, even unverified: deliveries would refuse it on every
    attempt). `role`: which endpoint, for the message (`response`, `operations`)."""
    try:
        check_scheme(url, settings.https_only)
    except EndpointRefused as error:
        raise AdminError(f"the {role} URL {_shown(url)}: {error}") from error
    try:
        client_host(url)
    except EndpointRefused as error:
        raise _refused(_shown(url), error, role) from error


async def verify_endpoint(url: str, secret: str, settings: Settings, seconds: float = 10.0) -> None:
    """POST a signed test event to `url`; AdminError unless it answers 2xx.

    The URL's scheme and a literal address are checked, and a name is resolved only to
    addresses the guard allows.
    """
    networks = settings.allowed_endpoint_networks
    body = json.dumps(TEST_EVENT).encode()
    headers = signature_headers([secret], "msg_" + uuid.uuid4().hex, body, utcnow())
    headers["Content-Type"] = "application/json"
    shown = _shown(url)
    try:
        check_url(url, networks, settings.https_only)
        async with (
            guarded_session(networks, aiohttp.ClientTimeout(total=seconds)) as http,
            http.post(url, data=body, headers=headers, allow_redirects=False) as response,
        ):
            status = response.status
    except EndpointRefused as error:
        raise _refused(shown, error) from error
    except aiohttp.ClientConnectorError as error:
        if isinstance(error.os_error, EndpointRefused):
            raise _refused(shown, error.os_error) from error
        raise _no_answer(shown, error) from error
    except (aiohttp.ClientError, TimeoutError) as error:
        raise _no_answer(shown, error) from error
    if not 200 <= status < 300:
        raise AdminError(f"the response endpoint {shown} answered {status} to a test event")


def _refused(shown: str, error: EndpointRefused, role: str = "response") -> AdminError:
    return AdminError(
        f"the {role} endpoint {shown} is refused: {error} "
        "(RELAY_ALLOWED_ENDPOINT_NETWORKS lists networks deliveries may reach)"
    )


def _no_answer(shown: str, error: Exception) -> AdminError:
    reason = str(error) or type(error).__name__  # a timeout has no text
    return AdminError(f"the response endpoint {shown} did not answer: {reason}")


def _shown(url: str) -> str:
    """The URL for a message: without user info, query or fragment, which may hold secrets."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "(not a valid URL)"
    return urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, "", ""))
