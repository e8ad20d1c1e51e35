"""Conversation tokens (`relay.wire.tokens`): what a browser holds for one user of one
conversation, stored only as hashes (`relay.auth`), found by the hash (unique, so indexed) at
each request that presents one: a revocation counts from the next request. Retention deletes
those expired or revoked before its cutoff (`relay.store.sql.retention`)."""

from __future__ import annotations

import uuid
from typing import Any

from relay.store.driver import Driver
from relay.store.records import ConversationGrant, ConversationTokenRecord
from relay.store.sql.common import as_datetime
from relay.wire import utcnow


class ConversationTokensSql:
    """`ConversationTokens` over a `Driver`."""

    _driver: Driver

    async def create_conversation_token(
        self, grant: ConversationGrant, token_hash: str, prefix: str
    ) -> ConversationTokenRecord:
        record = ConversationTokenRecord(
            id="ctk_" + uuid.uuid4().hex[:16], grant=grant, prefix=prefix, created_at=utcnow()
        )
        async with self._driver.connection() as conn:
            await conn.execute(
                "INSERT INTO conversation_tokens (id, integration_id, conversation_external_id,"
                " user_external_id, scope, token_hash, prefix, expires_at, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                record.id,
                grant.integration_id,
                grant.conversation_id,
                grant.user_id,
                grant.scope,
                token_hash,
                prefix,
                grant.expires_at,
                record.created_at,
            )
        return record

    async def find_conversation_token(self, token_hash: str) -> ConversationTokenRecord | None:
        async with self._driver.connection() as conn:
            row = await conn.fetchone(
                "SELECT * FROM conversation_tokens WHERE token_hash = ?", token_hash
            )
        return None if row is None else _record(row)

    async def revoke_conversation_tokens(
        self, integration_id: str, conversation_id: str, token_id: str | None = None
    ) -> int:
        one = "" if token_id is None else " AND id = ?"
        async with self._driver.connection() as conn:
            return await conn.execute(
                "UPDATE conversation_tokens SET revoked_at = ?"
                " WHERE integration_id = ? AND conversation_external_id = ?"
                f" AND revoked_at IS NULL{one}",
                utcnow(),
                integration_id,
                conversation_id,
                *([] if token_id is None else [token_id]),
            )


def _record(row: dict[str, Any]) -> ConversationTokenRecord:
    grant = ConversationGrant(
        integration_id=row["integration_id"],
        conversation_id=row["conversation_external_id"],
        user_id=row["user_external_id"],
        scope=row["scope"],
        expires_at=as_datetime(row["expires_at"]),
    )
    revoked = row["revoked_at"]
    return ConversationTokenRecord(
        id=row["id"],
        grant=grant,
        prefix=row["prefix"],
        created_at=as_datetime(row["created_at"]),
        revoked_at=None if revoked is None else as_datetime(revoked),
    )
