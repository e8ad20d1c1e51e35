"""Persistent state: narrow protocols per role (`Store` is all of them), SQLite and
PostgreSQL behind them."""

from __future__ import annotations

import asyncio
import time

import asyncpg
import structlog

from relay.retry import pauses
from relay.store.driver import Driver, IntegrityViolation, StoreError, StoreUnavailable
from relay.store.postgres import PostgresDriver
from relay.store.protocols import (
    Attempts,
    Conversations,
    ConversationTokens,
    DeadLetterStore,
    Generations,
    History,
    Inbound,
    IntegrationLookup,
    Integrations,
    Outgoing,
    ParkingQueries,
    Queued,
    RateBuckets,
    Retention,
    Store,
    StoreHandle,
    Turns,
)
from relay.store.records import (
    Accepted,
    AnyTokenKind,
    AttemptQuery,
    AttemptRecord,
    BotChoice,
    ConversationGrant,
    ConversationRecord,
    ConversationTokenRecord,
    DeadLetter,
    DeadLetterFilter,
    DeadPosition,
    DeliveryOptions,
    FoundAttempt,
    HistoryPage,
    HistoryRow,
    InboundState,
    IntegrationRecord,
    OutgoingRecord,
    PendingMessage,
    Pruned,
    PruneKind,
    Resealed,
    SentResponse,
    Taken,
    TokenKind,
    TokenRecord,
    TurnRecord,
    TurnReplies,
    Unfinished,
    Vanished,
    Watermark,
)
from relay.store.schema import apply_migrations
from relay.store.secrets import SecretBox, SecretUnreadable
from relay.store.sql import SqlStore
from relay.store.sqlite import SqliteDriver

__all__ = [
    "Accepted",
    "AnyTokenKind",
    "AttemptQuery",
    "AttemptRecord",
    "Attempts",
    "BotChoice",
    "ConversationGrant",
    "ConversationRecord",
    "ConversationTokenRecord",
    "ConversationTokens",
    "Conversations",
    "DeadLetter",
    "DeadLetterFilter",
    "DeadLetterStore",
    "DeadPosition",
    "DeliveryOptions",
    "FoundAttempt",
    "Generations",
    "History",
    "HistoryPage",
    "HistoryRow",
    "Inbound",
    "InboundState",
    "IntegrationLookup",
    "IntegrationRecord",
    "Integrations",
    "IntegrityViolation",
    "Outgoing",
    "OutgoingRecord",
    "ParkingQueries",
    "PendingMessage",
    "PruneKind",
    "Pruned",
    "Queued",
    "RateBuckets",
    "Resealed",
    "Retention",
    "SecretBox",
    "SecretUnreadable",
    "SentResponse",
    "SqlStore",
    "Store",
    "StoreError",
    "StoreHandle",
    "StoreUnavailable",
    "Taken",
    "TokenKind",
    "TokenRecord",
    "TurnRecord",
    "TurnReplies",
    "Turns",
    "Unfinished",
    "Vanished",
    "Watermark",
    "open_store",
    "open_store_patiently",
]

log = structlog.get_logger(__name__)


async def open_store(url: str, pool_size: int = 10, secrets: SecretBox | None = None) -> SqlStore:
    """Connect to the database of `url` (sqlite:// or postgresql://) and migrate it; the
    secrets it keeps are sealed with `secrets` (`SecretBox.of(settings.secret_keys)`;
    None: plain text)."""
    driver: Driver
    if url.startswith("sqlite://"):
        driver = await SqliteDriver.open(url)
    else:
        driver = await PostgresDriver.open(url, max_size=pool_size)
    try:
        await apply_migrations(driver)
    except BaseException:
        await driver.close()
        raise
    store = SqlStore(driver)
    store.keep_secrets_with(secrets or SecretBox())
    return store


async def open_store_patiently(
    url: str, pool_size: int, wait: float, secrets: SecretBox | None = None
) -> SqlStore:
    """`open_store`, tried again with backoff for up to `wait` seconds while the database
    is away or full: a service starting next to its database must not just exit."""
    deadline = time.monotonic() + wait
    for delay in pauses(0.5, 5.0):
        try:
            return await open_store(url, pool_size, secrets)
        except (OSError, asyncpg.PostgresError, StoreUnavailable) as error:
            if time.monotonic() + delay > deadline:
                raise
            log.warning("store_connect_failed", error=str(error), retry_in=delay)
            await asyncio.sleep(delay)
    raise AssertionError("unreachable: pauses() never ends")
