"""The store's logic and SQL, shared by both dialects through the `Driver` interface: one
module per role, `SqlStore` all of them over one driver."""

from __future__ import annotations

from relay.store.batching import GroupCommit
from relay.store.driver import Driver
from relay.store.sql.attempts import AttemptsSql
from relay.store.sql.bot_secrets import BotSecretsSql
from relay.store.sql.conversation_tokens import ConversationTokensSql
from relay.store.sql.dead_letters import DeadLettersSql
from relay.store.sql.generations import GenerationsSql
from relay.store.sql.history import HistorySql
from relay.store.sql.inbound import InboundSql
from relay.store.sql.integrations import IntegrationsSql
from relay.store.sql.new_messages import KnownRows
from relay.store.sql.outgoing import OutgoingSql
from relay.store.sql.parking import ParkingSql
from relay.store.sql.rate_buckets import RateBucketsSql
from relay.store.sql.recovery import RecoverySql
from relay.store.sql.reseal import ResealSql
from relay.store.sql.retention import RetentionSql
from relay.store.sql.search import SearchSql
from relay.store.sql.tokens import TokensSql

__all__ = ["SqlStore"]


class SqlStore(
    IntegrationsSql,
    BotSecretsSql,
    TokensSql,
    ResealSql,
    InboundSql,
    OutgoingSql,
    ParkingSql,
    AttemptsSql,
    GenerationsSql,
    HistorySql,
    SearchSql,
    RecoverySql,
    RetentionSql,
    DeadLettersSql,
    RateBucketsSql,
    ConversationTokensSql,
):
    """`Store` over a `Driver`; every statement here runs on SQLite and PostgreSQL."""

    def __init__(self, driver: Driver) -> None:
        self._driver = driver
        self._known = KnownRows()
        self._new_messages = GroupCommit(self._write_new_messages, "insert-inbound")

    @property
    def driver(self) -> Driver:
        """The driver, for tools and tests that inspect the tables directly."""
        return self._driver

    @property
    def dialect(self) -> str:
        """`sqlite` or `postgresql`."""
        return self._driver.dialect

    async def ping(self) -> None:
        async with self._driver.connection() as conn:
            await conn.fetchone("SELECT 1 AS ok")

    async def close(self) -> None:
        await self._driver.close()
