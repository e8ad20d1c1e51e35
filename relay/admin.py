"""Administration commands: integrations and tokens. Each returns what the CLI prints."""

from __future__ import annotations

import json
import uuid
from typing import Any

import aiohttp

from relay.auth import hash_token, new_signing_secret, new_token
from relay.models import utcnow
from relay.settings import Settings
from relay.signing import signature_headers
from relay.store import IntegrationRecord, Store, TokenKind, TokenRecord

TEST_EVENT = {"type": "test", "payload": "test"}


class AdminError(Exception):
    """A command that cannot be carried out; the message is shown to the user."""


async def verify_endpoint(url: str, secret: str, seconds: float = 10.0) -> None:
    """POST a signed test event to `url`; AdminError unless it answers 2xx."""
    body = json.dumps(TEST_EVENT).encode()
    headers = signature_headers([secret], "msg_" + uuid.uuid4().hex, body, utcnow())
    headers["Content-Type"] = "application/json"
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=seconds)) as http,
            http.post(url, data=body, headers=headers, allow_redirects=False) as response,
        ):
            status = response.status
    except (aiohttp.ClientError, TimeoutError) as error:
        raise AdminError(f"the response endpoint {url} did not answer: {error!r}") from error
    if not 200 <= status < 300:
        raise AdminError(f"the response endpoint {url} answered {status} to a test event")


def integration_view(record: IntegrationRecord, settings: Settings) -> dict[str, Any]:
    """The JSON shown for an integration (`signingSecret` included: admins need it)."""
    return {
        "id": record.id,
        "name": record.name,
        "webhookUrl": f"{settings.public_base_url}/webhooks/{record.id}",
        "responseUrl": record.response_url,
        "signingSecret": record.signing_secret,
        "createdAt": record.created_at.isoformat(),
    }


async def create_integration(
    store: Store, settings: Settings, name: str, response_url: str, verify: bool
) -> dict[str, Any]:
    """Create an integration after checking its response endpoint answers."""
    if not response_url.startswith(("http://", "https://")):
        raise AdminError("--response-url must be an http:// or https:// URL")
    secret = new_signing_secret()
    if verify:
        await verify_endpoint(response_url, secret)
    record = await store.create_integration(name, response_url, secret)
    return integration_view(record, settings)


async def create_token(
    store: Store, integration_id: str, kind: TokenKind
) -> tuple[str, TokenRecord]:
    """A new token for an integration: the token (shown once) and its record."""
    if await store.get_integration(integration_id) is None:
        raise AdminError(f"no integration {integration_id}")
    token = new_token()
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
