"""The secret each integration's reply tokens are made with (`relay.auth.reply_token`): made
on first use, sealed at rest like every stored secret (`relay.store.secrets`)."""

from __future__ import annotations

import secrets

from relay.store.driver import Driver, StoreError
from relay.store.secrets import SecretBox


class BotSecretsSql:
    """`bot_secret` of `Conversations` over a `Driver`."""

    _driver: Driver
    _secrets: SecretBox

    async def bot_secret(self, integration_id: str) -> str:
        select = "SELECT bot_secret FROM integrations WHERE id = ?"
        async with self._driver.connection() as conn:
            row = await conn.fetchone(select, integration_id)
            if row is not None and row["bot_secret"] is None:
                # Made on first use; whoever writes first wins, everyone reads the winner's.
                await conn.execute(
                    "UPDATE integrations SET bot_secret = ? WHERE id = ? AND bot_secret IS NULL",
                    self._secrets.seal(secrets.token_urlsafe(32)),
                    integration_id,
                )
                row = await conn.fetchone(select, integration_id)
        if row is None:
            raise StoreError(f"no integration {integration_id}")
        whose = f"the bot secret of integration {integration_id}"
        return self._secrets.open(row["bot_secret"], whose)
