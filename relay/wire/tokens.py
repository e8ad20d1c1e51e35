"""Conversation tokens (Direct Line's model): what a back end asks for, with its integration
token, so that a browser may act in one conversation as one user, and what it is answered
(`POST /webhooks/{integrationId}/conversations/{conversationId}/tokens`).

A `read` token reads the conversation's history and event stream; a `converse` token does
that and posts that user's messages to it (`POST /webhooks/{integrationId}`, a body with that
conversationId and userId). Nothing else accepts either.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from relay.wire import CallerId, Timestamp
from relay.wire.contract import whole

ConversationScope = Literal["read", "converse"]

# A token's lifetime, in seconds, at least and at most. At least a minute: a shorter one
# could expire before the page holding it has loaded and sent a first message, and would
# have a back end mint (a store write) again and again. At most a day: a token held by a
# browser can leak (a shared machine, an extension, an address pasted somewhere) and is
# listed nowhere, so what a leak gives is bounded to a day even if nobody revokes it.
MIN_TOKEN_SECONDS = 60
MAX_TOKEN_SECONDS = 24 * 3600


Seconds = Annotated[int, Field(ge=MIN_TOKEN_SECONDS, le=MAX_TOKEN_SECONDS), BeforeValidator(whole)]


class ConversationTokenRequest(BaseModel):
    """The body of `POST …/conversations/{conversationId}/tokens`."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    userId: CallerId = Field(
        description="The user the token acts as: a `converse` token posts only this user's "
        "messages (the caller's id, as in a message's `userId`)."
    )
    scope: ConversationScope = Field(
        default="read",
        description="`read`: the conversation's history and events; `converse`: those, and "
        "posting this user's messages to it (the conversation may not exist yet: the first "
        "message starts it).",
    )
    expiresIn: Seconds | None = Field(
        default=None,
        description="Seconds the token is valid, from a minute to a day; absent or null: "
        "RELAY_READ_TOKEN_SECONDS (an hour, unless the operator changed it).",
    )


class ConversationTokenAnswer(BaseModel):
    """The answer of `POST …/conversations/{conversationId}/tokens`: the token (shown this
    once; only its hash is kept), its id (to revoke it alone) and when it expires."""

    id: str
    token: str
    expiresAt: Timestamp
