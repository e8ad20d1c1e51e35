"""Administration commands: integrations and tokens. Each returns what the CLI prints."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp

from relay.auth import hash_token, new_signing_secret, new_token
from relay.settings import Settings
from relay.signing import signature_headers
from relay.ssrf import EndpointRefused, check_scheme, check_url, client_host, guarded_session
from relay.store import AnyTokenKind, IntegrationRecord, Integrations, TokenRecord
from relay.wire import utcnow
from relay.wire.admin import MAX_ROTATION_GRACE_SECONDS

TEST_EVENT = {"type": "test", "payload": "test"}


class AdminError(Exception):
    """A command that cannot be carried out; the message is shown to the user."""


async def verify_endpoint(url: str, secret: str, settings: Settings, seconds: float = 10.0) -> None:
    """POST a signed test event to `url`; AdminError unless it answers 2xx.

    Through the same guard as deliveries (`relay.ssrf`): the URL's scheme and a literal
    address are checked, and a name is resolved only to addresses the guard allows, so the
    check cannot be used to reach what deliveries may not.
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


def _refused(shown: str, error: EndpointRefused) -> AdminError:
    return AdminError(
        f"the response endpoint {shown} is refused: {error} "
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


def integration_view(record: IntegrationRecord, settings: Settings) -> dict[str, Any]:
    """The JSON shown for an integration: never its signing secret, which only its creation
    and a rotation show."""
    return {
        "id": record.id,
        "name": record.name,
        "webhookUrl": f"{settings.public_base_url}/webhooks/{record.id}",
        "responseUrl": record.response_url,
        "enabled": record.disabled_at is None,
        "createdAt": record.created_at.isoformat(),
        "disabledAt": record.disabled_at.isoformat() if record.disabled_at else None,
    }


@dataclass(frozen=True)
class Rotated:
    """A rotation: the new signing secret (shown this once), and until when the previous
    one signs deliveries too."""

    integration_id: str
    secret: str
    previous_until: datetime

    def view(self) -> dict[str, str]:
        """The JSON shown for it (as the admin API answers it)."""
        return {
            "id": self.integration_id,
            "signingSecret": self.secret,
            "previousSecretValidUntil": self.previous_until.isoformat(),
        }


async def rotate_secret(store: Integrations, integration_id: str, grace: float) -> Rotated:
    """A new signing secret for the integration; the old one still signs, alongside it,
    for `grace` seconds (at most 30 days), so the back end can switch without a gap."""
    if not 0 <= grace <= MAX_ROTATION_GRACE_SECONDS:
        raise AdminError(f"the grace period is 0 to {MAX_ROTATION_GRACE_SECONDS // 86400} days")
    secret = new_signing_secret()
    until = utcnow() + timedelta(seconds=grace)
    if await store.rotate_secret(integration_id, secret, until) is None:
        raise AdminError(f"no integration {integration_id}")
    return Rotated(integration_id, secret, until)


async def create_integration(
    store: Integrations, settings: Settings, name: str, response_url: str, verify: bool
) -> IntegrationRecord:
    """Create an integration after checking its response endpoint answers (unless not
    `verify`); its scheme must be one deliveries use (https:// only with RELAY_HTTPS_ONLY)."""
    secret = new_signing_secret()
    await check_endpoint(settings, response_url, secret, verify)
    return await store.create_integration(name, response_url, secret)


async def check_endpoint(settings: Settings, response_url: str, secret: str, verify: bool) -> None:
    """AdminError unless `response_url` is one deliveries may use and (if `verify`) answers
    a signed test event with a 2xx."""
    try:
        # Always, even unverified: deliveries would refuse this scheme on every attempt.
        check_scheme(response_url, settings.https_only)
    except EndpointRefused as error:
        raise AdminError(f"the response URL {_shown(response_url)}: {error}") from error
    try:
        # And a host written so that the HTTP client would read another.
        client_host(response_url)
    except EndpointRefused as error:
        raise _refused(_shown(response_url), error) from error
    if verify:
        await verify_endpoint(response_url, secret, settings)


async def create_token(
    store: Integrations, integration_id: str | None, kind: AnyTokenKind
) -> tuple[str, TokenRecord]:
    """A new token: the token (shown once) and its record. An admin token belongs to no
    integration; the others to one."""
    token = new_token()
    if kind == "admin":
        if integration_id is not None:
            raise AdminError("an admin token belongs to no integration")
        return token, await store.create_admin_token(hash_token(token), token[:8])
    if integration_id is None or await store.get_integration(integration_id) is None:
        raise AdminError(f"no integration {integration_id}")
    record = await store.create_token(integration_id, kind, hash_token(token), token[:8])
    return token, record


def token_view(record: TokenRecord) -> dict[str, Any]:
    """The JSON shown for a token's metadata."""
    return {
        "id": record.id,
        "integrationId": record.integration_id,
        "kind": record.kind,
        "prefix": record.prefix,
        "createdAt": record.created_at.isoformat(),
        "revokedAt": record.revoked_at.isoformat() if record.revoked_at else None,
    }


def table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """A plain aligned text table."""
    cells = [
        [str(row.get(col) if row.get(col) is not None else "-") for col in columns] for row in rows
    ]
    widths = [max([len(col)] + [len(r[i]) for r in cells]) for i, col in enumerate(columns)]
    lines = ["  ".join(col.ljust(w) for col, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(lines)


def parse_duration(text: str) -> float:
    """Seconds of `90`, `90s`, `15m`, `24h` or `7d`."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    number, unit = (text[:-1], text[-1]) if text[-1:] in units else (text, "s")
    try:
        seconds = float(number) * units[unit]
    except ValueError as error:
        raise AdminError(f"not a duration: {text!r} (try 90s, 15m, 24h, 7d)") from error
    if seconds < 0:
        raise AdminError("a duration cannot be negative")
    return seconds
