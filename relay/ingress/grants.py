"""Where a browser presents a conversation token (`relay.ingress.conversation_tokens` mints
them): `read` and `converse` on its conversation's history and events, `converse` also on
`POST /webhooks/{integrationId}` for a body of its conversation and user. Anywhere else a
conversation token is no credential (401).

Each check is one read of the store by the token's hash (unique, so indexed), with no cache:
a revoked token is refused from the next request, and an event stream it opened ends within
a keep-alive (`relay.ingress.events` asks again). The token's id, which is no secret, is
bound to the request's log lines; the token never is (the ingress logs routes, not URLs).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

import structlog

from relay.auth import hash_token
from relay.errors import Unauthorized
from relay.store import (
    ConversationGrant,
    ConversationTokenRecord,
    ConversationTokens,
    IntegrationRecord,
)
from relay.wire import InboundRequest, utcnow

REFUSED = "missing, invalid, expired or revoked token"


class Grants:
    """Checks the conversation tokens requests present."""

    def __init__(self, store: ConversationTokens, clock: Callable[[], datetime] = utcnow) -> None:
        self._store = store
        self._clock = clock

    async def reading(
        self, integration: IntegrationRecord, token: str, conversation_id: str
    ) -> ConversationGrant:
        """The grant of a live token of this integration's conversation, or a 401."""
        grant = await self._live(integration, token)
        if grant.conversation_id != conversation_id:
            raise Unauthorized(REFUSED)
        return grant

    async def conversing(self, integration: IntegrationRecord, token: str) -> ConversationGrant:
        """The grant of a live `converse` token of this integration, or a 401."""
        grant = await self._live(integration, token)
        if grant.scope != "converse":
            raise Unauthorized(REFUSED)
        return grant

    async def holds(self, integration: IntegrationRecord, token_hash: str) -> bool:
        """Whether the token with this hash is still live (an open event stream asks)."""
        return await self._record(integration, token_hash) is not None

    async def _live(self, integration: IntegrationRecord, token: str) -> ConversationGrant:
        record = await self._record(integration, hash_token(token))
        if record is None:
            raise Unauthorized(REFUSED)
        structlog.contextvars.bind_contextvars(conversation_token_id=record.id)
        return record.grant

    async def _record(
        self, integration: IntegrationRecord, token_hash: str
    ) -> ConversationTokenRecord | None:
        """The live token of this integration with this hash, or None."""
        record = await self._store.find_conversation_token(token_hash)
        if record is None or record.grant.integration_id != integration.id:
            return None
        return record if record.live(self._clock()) else None


def admit(grant: ConversationGrant, inbound: InboundRequest) -> None:
    """A 401 unless the message is the grant's user's, in the grant's conversation."""
    if (inbound.conversationId, inbound.userId) != (grant.conversation_id, grant.user_id):
        raise Unauthorized("this token posts only its own user's messages to its conversation")
