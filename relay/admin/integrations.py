"""Integrations and their tokens: creating one (after its endpoint check), rotating its
signing secret, making tokens. What they return is shown through `relay.views`."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

import structlog

from relay.admin.bots import check_bot
from relay.admin.changes import check_delivery
from relay.admin.endpoints import check_endpoint
from relay.admin.errors import AdminError
from relay.auth import hash_token, new_signing_secret, new_token
from relay.broker import BrokerUnavailable
from relay.broker.operations import OperationsEvents
from relay.settings import Settings
from relay.store import (
    AnyTokenKind,
    Attempts,
    BotChoice,
    DeliveryOptions,
    IntegrationRecord,
    Integrations,
    TokenRecord,
)
from relay.wire import utcnow
from relay.wire.admin import MAX_ROTATION_GRACE_SECONDS
from relay.wire.operations import integration_disabled

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Rotated:
    """A rotation: the new signing secret (shown this once), and until when the previous
    one signs deliveries too."""

    integration_id: str
    secret: str
    previous_until: datetime


async def create_integration(
    store: Integrations,
    settings: Settings,
    name: str,
    response_url: str,
    verify: bool,
    bot: BotChoice | None = None,
    delivery: DeliveryOptions | None = None,
) -> IntegrationRecord:
    """Create an integration after checking its response endpoint answers (unless not
    `verify`); its scheme must be one deliveries use (https:// only with RELAY_HTTPS_ONLY).
    Its bot (None: RELAY_BOT) and delivery options are checked first."""
    if bot is not None:
        check_bot(bot, settings.bot_modules)
    delivery = delivery or DeliveryOptions()
    check_delivery(settings, delivery)
    secret = new_signing_secret()
    await check_endpoint(settings, response_url, secret, verify)
    return await store.create_integration(name, response_url, secret, bot, delivery)


async def disable_integration(
    store: Attempts, events: OperationsEvents, integration_id: str
) -> bool:
    """Disable the integration's endpoint (its responses dead-lettered, not sent) and
    tell its operations URL, once: only the request that disabled it tells (True; False if
    it was disabled already, or is gone). The event is queued with the broker's confirm; a
    broker away loses it (logged), never the disable."""
    at = utcnow()
    if not await store.disable(integration_id, at):
        return False  # disabled already (or deleted)
    try:
        await events.publish(integration_disabled(integration_id, "operator", at))
    except BrokerUnavailable as error:
        log.warning("operations_event_not_queued", integration_id=integration_id, error=str(error))
    return True


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
