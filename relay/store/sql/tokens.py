"""Tokens: an integration's (integration and bot tokens) and the operator's admin tokens,
stored only as hashes (`relay.auth`)."""

from __future__ import annotations

import uuid

from relay.store.driver import Driver
from relay.store.records import TokenKind, TokenRecord
from relay.wire import utcnow


class TokensSql:
    """The tokens of `Integrations` (and `IntegrationLookup`) over a `Driver`."""

    _driver: Driver

    async def create_token(
        self, integration_id: str, kind: TokenKind, token_hash: str, prefix: str
    ) -> TokenRecord:
        record = TokenRecord(
            id="tok_" + uuid.uuid4().hex[:16],
            integration_id=integration_id,
            kind=kind,
            prefix=prefix,
            created_at=utcnow(),
        )
        async with self._driver.transaction() as conn:
            await conn.execute(
                "INSERT INTO tokens (id, integration_id, kind, token_hash, prefix, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                record.id,
                integration_id,
                kind,
                token_hash,
                prefix,
                record.created_at,
            )
        return record

    async def active_token_hashes(self, integration_id: str, kind: TokenKind) -> list[str]:
        async with self._driver.connection() as conn:
            rows = await conn.fetchall(
                "SELECT token_hash FROM tokens"
                " WHERE integration_id = ? AND kind = ? AND revoked_at IS NULL",
                integration_id,
                kind,
            )
        return [row["token_hash"] for row in rows]

    async def list_tokens(self, integration_id: str) -> list[TokenRecord]:
        async with self._driver.connection() as conn:
            rows = await conn.fetchall(
                "SELECT * FROM tokens WHERE integration_id = ? ORDER BY created_at, id",
                integration_id,
            )
        return [TokenRecord.model_validate(row) for row in rows]

    async def revoke_token(self, token_id: str) -> bool:
        changed = 0
        async with self._driver.transaction() as conn:
            for table in ("tokens", "admin_tokens"):
                changed += await conn.execute(
                    f"UPDATE {table} SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
                    utcnow(),
                    token_id,
                )
        return changed == 1

    async def create_admin_token(self, token_hash: str, prefix: str) -> TokenRecord:
        record = TokenRecord(
            id="adm_" + uuid.uuid4().hex[:16],
            integration_id=None,
            kind="admin",
            prefix=prefix,
            created_at=utcnow(),
        )
        async with self._driver.connection() as conn:
            await conn.execute(
                "INSERT INTO admin_tokens (id, token_hash, prefix, created_at) VALUES (?, ?, ?, ?)",
                record.id,
                token_hash,
                prefix,
                record.created_at,
            )
        return record

    async def admin_token_active(self, token_hash: str) -> bool:
        # One row by the unique (so indexed) hash: an admin request costs the same however
        # many admin tokens there are, and a revocation counts from the next request.
        async with self._driver.connection() as conn:
            row = await conn.fetchone(
                "SELECT id FROM admin_tokens WHERE token_hash = ? AND revoked_at IS NULL",
                token_hash,
            )
        return row is not None

    async def list_admin_tokens(self) -> list[TokenRecord]:
        async with self._driver.connection() as conn:
            rows = await conn.fetchall(
                "SELECT id, prefix, created_at, revoked_at FROM admin_tokens"
                " ORDER BY created_at, id"
            )
        return [
            TokenRecord.model_validate({**row, "integration_id": None, "kind": "admin"})
            for row in rows
        ]
