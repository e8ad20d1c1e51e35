"""Sealing every stored secret again with the first key (`relay secrets reencrypt`)."""

from __future__ import annotations

from relay.store.driver import Driver, Row
from relay.store.records import Resealed
from relay.store.secrets import SecretBox, SecretUnreadable

# The columns holding secrets, and what each is (for an error naming it).
_SECRET_COLUMNS = (
    ("signing_secret", "the signing secret"),
    ("previous_secret", "the previous signing secret"),
    ("bot_secret", "the bot secret"),
    ("bot_credentials", "the bot credentials"),
)
_RESEAL_PAGE = 500


class ResealSql:
    """`reseal_secrets` of `Integrations` over a `Driver`."""

    _driver: Driver
    _secrets: SecretBox

    async def reseal_secrets(self) -> Resealed:
        replaced: list[bool] = []  # per secret: sealed again, or changed meanwhile
        unreadable: list[str] = []
        after = ""
        while rows := await self._secret_rows(after):
            for row in rows:
                for column, whose, stored in _secrets_of(row):
                    try:
                        sealed = self._secrets.reseal(stored, whose)
                    except SecretUnreadable as error:
                        unreadable.append(str(error))
                        continue
                    replaced.append(await self._replace_secret(row["id"], column, stored, sealed))
            after = rows[-1]["id"]
        return Resealed(replaced.count(True), unreadable, replaced.count(False))

    async def _secret_rows(self, after: str) -> list[Row]:
        async with self._driver.connection() as conn:
            return await conn.fetchall(
                "SELECT id, signing_secret, previous_secret, bot_secret, bot_credentials"
                " FROM integrations"
                " WHERE id > ? ORDER BY id LIMIT ?",
                after,
                _RESEAL_PAGE,
            )

    async def _replace_secret(self, integration_id: str, column: str, old: str, new: str) -> bool:
        """Whether the column still held `old` and now holds `new` (if not, it changed
        meanwhile: a rotation, which seals with the first key already)."""
        async with self._driver.connection() as conn:
            changed = await conn.execute(
                f"UPDATE integrations SET {column} = ? WHERE id = ? AND {column} = ?",
                new,
                integration_id,
                old,
            )
        return changed == 1


def _secrets_of(row: Row) -> list[tuple[str, str, str]]:
    """The secrets an integration's row holds: (column, whose it is, stored value)."""
    return [
        (column, f"{what} of integration {row['id']}", row[column])
        for column, what in _SECRET_COLUMNS
        if row[column] is not None
    ]
