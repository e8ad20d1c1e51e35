"""Integrations, with the secrets they keep (signing and bot secrets), sealed as they are
written and opened as they are read (`relay.store.secrets`). Their tokens:
`relay.store.sql.tokens`; sealing the stored secrets again: `relay.store.sql.reseal`."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from relay.store.driver import Driver, Row
from relay.store.records import BotChoice, DeliveryOptions, IntegrationRecord
from relay.store.secrets import SecretBox, SecretUnreadable
from relay.store.sql.common import new_id
from relay.wire import utcnow

# Every column of an integration but its bot secret, which only `bot_secret` reads.
_INTEGRATION = (
    "SELECT id, name, response_url, signing_secret, created_at, disabled_at,"
    " previous_secret, previous_secret_until, bot_adapter, bot_url, bot_credentials,"
    " operations_url, delivery_rate, delivery_burst, expiring_types"
    " FROM integrations"
)


class IntegrationsSql:
    """The integrations of `Integrations` (and `IntegrationLookup`) over a `Driver`."""

    _driver: Driver
    # Seals the secrets written and opens those read; plain text (a box without keys)
    # unless `open_store` was given keys.
    _secrets: SecretBox = SecretBox()

    def keep_secrets_with(self, box: SecretBox) -> None:
        """Seal and open stored secrets with `box` (`open_store` calls it once, before the
        store is handed out)."""
        self._secrets = box

    async def create_integration(
        self,
        name: str,
        response_url: str,
        signing_secret: str,
        bot: BotChoice | None = None,
        delivery: DeliveryOptions | None = None,
    ) -> IntegrationRecord:
        record = IntegrationRecord(
            id=new_id(),
            name=name,
            response_url=response_url,
            signing_secret=signing_secret,
            created_at=utcnow(),
            bot=bot,
            delivery=delivery or DeliveryOptions(),
        )
        async with self._driver.transaction() as conn:
            await conn.execute(
                "INSERT INTO integrations (id, name, response_url, signing_secret, created_at,"
                " bot_adapter, bot_url, bot_credentials, operations_url, delivery_rate,"
                " delivery_burst, expiring_types)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                record.id,
                record.name,
                record.response_url,
                self._secrets.seal(signing_secret),
                record.created_at,
                *self._bot_columns(bot),
                *_delivery_columns(record.delivery),
            )
        return record

    async def set_delivery(self, integration_id: str, delivery: DeliveryOptions) -> bool:
        async with self._driver.connection() as conn:
            changed = await conn.execute(
                "UPDATE integrations SET operations_url = ?, delivery_rate = ?,"
                " delivery_burst = ?, expiring_types = ? WHERE id = ?",
                *_delivery_columns(delivery),
                integration_id,
            )
        return changed == 1

    async def set_bot(self, integration_id: str, bot: BotChoice | None) -> bool:
        async with self._driver.connection() as conn:
            changed = await conn.execute(
                "UPDATE integrations SET bot_adapter = ?, bot_url = ?, bot_credentials = ?"
                " WHERE id = ?",
                *self._bot_columns(bot),
                integration_id,
            )
        return changed == 1

    def _bot_columns(self, bot: BotChoice | None) -> tuple[str | None, str | None, str | None]:
        """(adapter, URL, sealed credentials) as stored; all None for the default bot."""
        if bot is None:
            return None, None, None
        credentials = bot.credentials()
        sealed = self._secrets.seal(json.dumps(credentials)) if credentials else None
        return bot.adapter, bot.url, sealed

    async def get_integration(self, integration_id: str) -> IntegrationRecord | None:
        async with self._driver.connection() as conn:
            row = await conn.fetchone(f"{_INTEGRATION} WHERE id = ?", integration_id)
        return self._integration(row) if row else None

    def _integration(self, row: Row) -> IntegrationRecord:
        """The record of a row, its secrets opened. A signing secret no key opens marks the
        record `secret_unreadable` rather than failing the read: the integration still
        authenticates and lists, only signing with it fails (naming it)."""
        fields = {
            **row,
            "previous_secret": self._previous_secret(row),
            **self._bot(row),
            "delivery": _delivery(row),
        }
        try:
            fields["signing_secret"] = self._secrets.open(
                row["signing_secret"], f"the signing secret of integration {row['id']}"
            )
        except SecretUnreadable as error:
            fields.update(signing_secret="", secret_unreadable=str(error))
        return IntegrationRecord.model_validate(fields)

    def _bot(self, row: Row) -> dict[str, Any]:
        """The record's `bot` (and `bot_unreadable`) from its row, the credentials opened."""
        if row["bot_adapter"] is None:
            return {"bot": None}
        bot: dict[str, Any] = {"adapter": row["bot_adapter"], "url": row["bot_url"]}
        stored = row["bot_credentials"]
        if stored is None:
            return {"bot": BotChoice(**bot)}
        try:
            opened = self._secrets.open(stored, f"the bot credentials of integration {row['id']}")
        except SecretUnreadable as error:
            return {"bot": BotChoice(**bot), "bot_unreadable": str(error)}
        return {"bot": BotChoice(**bot, **json.loads(opened))}

    def _previous_secret(self, row: Row) -> str | None:
        stored: str | None = row["previous_secret"]
        if stored is None:
            return None
        whose = f"the previous signing secret of integration {row['id']}"
        try:
            return self._secrets.open(stored, whose)
        except SecretUnreadable:
            # The current secret signs on its own: the one a rotation replaced is only a
            # courtesy to receivers that have not switched yet.
            return None

    async def list_integrations(
        self, after: str | None = None, limit: int | None = None
    ) -> list[IntegrationRecord]:
        # Oldest first; a page starts after the integration `after` (created_at, then id).
        sql = _INTEGRATION
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
        return [self._integration(row) for row in rows]

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
                self._secrets.seal(secret),
                integration_id,
            )
            row = await conn.fetchone(f"{_INTEGRATION} WHERE id = ?", integration_id)
        return self._integration(row) if row else None


def _delivery_columns(
    delivery: DeliveryOptions,
) -> tuple[str | None, float | None, int | None, str | None]:
    """(operations URL, rate, burst, expiring types as JSON) as stored; the default expiring
    types are stored as NULL, so a later change of the default reaches them."""
    expiring = delivery.expiring_types
    stored = None if expiring == DeliveryOptions().expiring_types else json.dumps(expiring)
    return delivery.operations_url, delivery.delivery_rate, delivery.delivery_burst, stored


def _delivery(row: Row) -> DeliveryOptions:
    """The delivery options of an integration's row."""
    stored = row["expiring_types"]
    return DeliveryOptions(
        operations_url=row["operations_url"],
        delivery_rate=row["delivery_rate"],
        delivery_burst=row["delivery_burst"],
        **({} if stored is None else {"expiring_types": json.loads(stored)}),
    )
