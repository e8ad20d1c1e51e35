"""Persistent state: one `Store` interface, SQLite and PostgreSQL behind it."""

from __future__ import annotations

from relay.store.base import (
    Accepted,
    AttemptRecord,
    ConversationRecord,
    InboundState,
    IntegrationRecord,
    OutgoingRecord,
    PendingMessage,
    Store,
    TokenKind,
    TokenRecord,
)
from relay.store.driver import Driver, IntegrityViolation, StoreError, StoreUnavailable
from relay.store.postgres import PostgresDriver
from relay.store.schema import apply_migrations
from relay.store.sql import SqlStore
from relay.store.sqlite import SqliteDriver

__all__ = [
    "Accepted",
    "AttemptRecord",
    "ConversationRecord",
    "InboundState",
    "IntegrationRecord",
    "IntegrityViolation",
    "OutgoingRecord",
    "PendingMessage",
    "SqlStore",
    "Store",
    "StoreError",
    "StoreUnavailable",
    "TokenKind",
    "TokenRecord",
    "open_store",
]


async def open_store(url: str) -> SqlStore:
    """Connect to the database of `url` (sqlite:// or postgresql://) and migrate it."""
    driver: Driver
    if url.startswith("sqlite://"):
        driver = await SqliteDriver.open(url)
    else:
        driver = await PostgresDriver.open(url)
    try:
        await apply_migrations(driver)
    except BaseException:
        await driver.close()
        raise
    return SqlStore(driver)
