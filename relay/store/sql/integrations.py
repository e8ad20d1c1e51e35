"""Integrations and their tokens."""

from __future__ import annotations

import uuid
from datetime import datetime

from relay.store.driver import Driver
from relay.store.records import IntegrationRecord, TokenKind, TokenRecord
from relay.store.sql.common import new_id
from relay.wire import utcnow


class IntegrationsSql:
    """`Integrations` (and `IntegrationLookup`) over a `Driver`."""

    _driver: Driver

    async def create_integration(
        self, name: str, response_url: str, signing_secret: str
    ) -> IntegrationRecord:
        record = IntegrationRecord(
            id=new_id(),
            name=name,
            response_url=response_url,
            signing_secret=signing_secret,
            created_at=utcnow(),
        )
        async with self._driver.transaction() as conn:
            await conn.execute(
                "INSERT INTO integrations (id, name, response_url, signing_secret, created_at)"
                " VALUES (?, ?, ?, ?, ?)",
                record.id,
                record.name,
                record.response_url,
                record.signing_secret,
                record.created_at,
            )
        return record

    async def get_integration(self, integration_id: str) -> IntegrationRecord | None:
        async with self._driver.connection() as conn:
            row = await conn.fetchone("SELECT * FROM integrations WHERE id = ?", integration_id)
        return IntegrationRecord.model_validate(row) if row else None

    async def list_integrations(
        self, after: str | None = None, limit: int | None = None
    ) -> list[IntegrationRecord]:
        # Oldest first; a page starts after the integration `after` (created_at, then id).
        sql = "SELECT * FROM integrations"
        args: list[object] = []
        if after is not None:
            sql += (
                " WHERE (created_at, id) > (SELECT created_at, id FROM integrations WHERE id = ?)"
            )
            args.append(after)
        sql += " ORDER BY created_at, id"
        if limit is not None:
            sql += " LIMIT ?"
            args.append(limit)
        async with self._driver.connection() as conn:
            rows = await conn.fetchall(sql, *args)
        return [IntegrationRecord.model_validate(row) for row in rows]

    async def set_response_url(self, integration_id: str, response_url: str) -> bool:
        async with self._driver.connection() as conn:
            changed = await conn.execute(
                "UPDATE integrations SET response_url = ? WHERE id = ?",
                response_url,
                integration_id,
            )
        return changed == 1

    async def delete_integration(self, integration_id: str) -> bool:
        async with self._driver.transaction() as conn:
            # The attempt log names integrations without a foreign key; the rest cascades.
            await conn.execute(
                "DELETE FROM delivery_attempts WHERE integration_id = ?", integration_id
            )
            await conn.execute("DELETE FROM messages WHERE integration_id = ?", integration_id)
            deleted = await conn.execute("DELETE FROM integrations WHERE id = ?", integration_id)
        return deleted == 1

    async def rotate_secret(
        self, integration_id: str, secret: str, previous_until: datetime
    ) -> IntegrationRecord | None:
        async with self._driver.transaction() as conn:
            await conn.execute(
                "UPDATE integrations SET previous_secret = signing_secret,"
                " previous_secret_until = ?, signing_secret = ? WHERE id = ?",
                previous_until,
                secret,
                integration_id,
            )
            row = await conn.fetchone("SELECT * FROM integrations WHERE id = ?", integration_id)
        return IntegrationRecord.model_validate(row) if row else None

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

    async def admin_token_hashes(self) -> list[str]:
        async with self._driver.connection() as conn:
            rows = await conn.fetchall(
                "SELECT token_hash FROM admin_tokens WHERE revoked_at IS NULL"
            )
        return [row["token_hash"] for row in rows]

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
