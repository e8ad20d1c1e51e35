"""Bots built with the Bot Framework SDK (`RELAY_BOT=botframework`, `RELAY_BOT_URL`).

The relay acts as a Bot Framework channel (channel id `relay`): each user message is POSTed
to the bot's messaging endpoint (`RELAY_BOT_URL`, e.g. `http://127.0.0.1:3978/api/messages`)
as a `message` Activity. The bot answers the way it answers any channel: by calling the
Connector API at the Activity's `serviceUrl`, which is the relay's own
`{RELAY_PUBLIC_URL}/botframework/{replyToken}/` (`relay.ingress.connector`). Those calls store
and queue the replies one by one, during the turn or later (proactive messages through a
saved conversation reference), so `RELAY_PUBLIC_URL` must be reachable from the bot.

The Activity carries `from` `{id: relay user id, name: the caller's user id}`, `recipient`
`{id: "bot"}`, `conversation` `{id: relay conversation id}`, the message's `text` (its
summary for other types) and `channelData` `{integrationId, messageId, conversationId,
userId, type, payload}` (relay message id; the caller's conversation and user ids; the
message type and payload as the back end sent them).

The bot's answer: 2xx is done; a timeout, connection error, 408, 429 or 5xx is retried
(`BotFailure`); any other status is not (`BotFailure(permanent=True)`: dead letter).

Authentication. A bot in no-auth mode (empty `MicrosoftAppId`/`MicrosoftAppPassword`, as in
local development) needs nothing. For a bot with credentials, set
`RELAY_BOTFRAMEWORK_APP_ID` and `RELAY_BOTFRAMEWORK_APP_PASSWORD` to the bot's app id and
password: the relay then obtains a token by client credentials from
`https://login.microsoftonline.com/botframework.com/oauth2/v2.0/token` (scope
`https://api.botframework.com/.default`; multi-tenant app registrations), caches it until
five minutes before it expires, and sends it as `Authorization: Bearer` to the bot, which
accepts it as it accepts the Bot Framework Emulator's. This path needs Internet access and
is not exercised by the test suite beyond the token request it makes.

Limits:
- The bot's calls to the connector are not checked for a Bot Framework JWT: the reply token
  in the `serviceUrl` path authenticates them (and scopes them to one conversation). Treat a
  `serviceUrl` like a password; it expires 24 hours after the message it came with, so a
  proactive message later than that is refused (401) — use the reference of a newer message.
- The bot's replies arrive on separate calls, not in the answer to the turn, so the relay
  cannot tell which replies a turn already made: a message whose turn did not complete (the
  bot timed out or answered 5xx after replying, or the worker stopped mid-turn and the broker
  redelivered the message) is shown to the bot again, and what the bot sends again is
  delivered again. (A message whose turn completed is not shown again.)
- Only what Relay message types can express is kept (see `relay.ingress.connector`); other
  attachments (adaptive cards...) and activity types are dropped, with a log line.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import aiohttp
from pydantic import BaseModel, Field, ValidationError

from relay.settings import Settings
from relay.store import BotChoice
from relay.wire import InboundEnvelope, utcnow
from relay.wire.botframework import Activity, ChannelAccount, ConversationAccount
from workers.bot.adapters.base import BotContext, BotFailure, post_to_bot

CHANNEL_ID = "relay"
TOKEN_URL = "https://login.microsoftonline.com/botframework.com/oauth2/v2.0/token"
TOKEN_SCOPE = "https://api.botframework.com/.default"
# A cached token is renewed this long before it expires.
TOKEN_MARGIN = 300.0


def service_url(public_base_url: str, reply_token: str) -> str:
    """The `serviceUrl` the bot calls back: the connector routes, with the reply token."""
    return f"{public_base_url}/botframework/{reply_token}/"


def activity_for(envelope: InboundEnvelope, context: BotContext, public_base_url: str) -> Activity:
    """The `message` Activity that hands one user message to the bot."""
    bundle = envelope.bundle
    return Activity(
        type="message",
        id=uuid.uuid4().hex,
        timestamp=utcnow(),
        channelId=CHANNEL_ID,
        serviceUrl=service_url(public_base_url, context.reply_token),
        from_=ChannelAccount(id=bundle.user.id, name=bundle.user.tags.id),
        recipient=ChannelAccount(id="bot"),
        conversation=ConversationAccount(id=bundle.conversation.id),
        text=envelope.text,
        channelData={
            "integrationId": envelope.integrationId,
            "messageId": bundle.message.id,
            "conversationId": bundle.conversation.tags.id,
            "userId": bundle.user.tags.id,
            "type": bundle.message.type,
            "payload": bundle.message.payload,
        },
    )


class TokenAnswer(BaseModel):
    """The OAuth token endpoint's answer (the fields used)."""

    access_token: str = Field(min_length=1)
    expires_in: float = Field(gt=0)


class TokenSource:
    """Bot Framework tokens by client credentials, cached until shortly before expiry."""

    def __init__(
        self, http: aiohttp.ClientSession, app_id: str, password: str, url: str = TOKEN_URL
    ) -> None:
        self._http = http
        self._url = url
        self._form = {
            "grant_type": "client_credentials",
            "client_id": app_id,
            "client_secret": password,
            "scope": TOKEN_SCOPE,
        }
        self._token = ""
        self._renew_at = 0.0
        self._lock = asyncio.Lock()

    async def token(self) -> str:
        """A valid access token (fetched when none is cached or it is about to expire)."""
        async with self._lock:
            if not self._token or time.monotonic() >= self._renew_at:
                answer = await self._fetch()
                margin = min(TOKEN_MARGIN, answer.expires_in / 2)
                self._token = answer.access_token
                self._renew_at = time.monotonic() + answer.expires_in - margin
            return self._token

    async def _fetch(self) -> TokenAnswer:
        try:
            async with self._http.post(self._url, data=self._form) as response:
                raw, status = await response.read(), response.status
        except (aiohttp.ClientError, TimeoutError) as error:
            raise BotFailure(f"no Bot Framework token: {error!r}") from error
        if status != 200:
            # 400/401: wrong app id or password, which a retry does not fix.
            permanent = status in (400, 401)
            raise BotFailure(f"no Bot Framework token: answer {status}", permanent=permanent)
        try:
            return TokenAnswer.model_validate_json(raw)
        except ValidationError as error:
            raise BotFailure(f"no Bot Framework token: unexpected answer: {error}") from error


class BotFrameworkBot:
    """POSTs each message as an Activity to a Bot Framework bot; replies come via the connector."""

    def __init__(
        self, settings: Settings, token_url: str = TOKEN_URL, bot: BotChoice | None = None
    ) -> None:
        """`bot`: an integration's Bot Framework bot (None: the deployment's, RELAY_BOT_URL
        with RELAY_BOTFRAMEWORK_APP_ID and _PASSWORD)."""
        url = bot.url if bot is not None else settings.bot_url
        app_id = bot.app_id if bot is not None else settings.botframework_app_id
        password = bot.app_password if bot is not None else settings.botframework_app_password
        if not url or not url.startswith(("http://", "https://")):
            raise ValueError("a Bot Framework bot needs an http(s) URL (RELAY_BOT_URL, or its url)")
        self._url = url
        self._public_base_url = settings.public_base_url
        self._http = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=settings.bot_timeout)
        )
        self._tokens: TokenSource | None = None
        if app_id and password:
            self._tokens = TokenSource(self._http, app_id, password, token_url)

    async def handle(self, envelope: InboundEnvelope, context: BotContext) -> None:
        """Hand the message to the bot; BotFailure if it did not take it."""
        activity = activity_for(envelope, context, self._public_base_url)
        headers = {}
        if self._tokens is not None:
            headers["Authorization"] = f"Bearer {await self._tokens.token()}"
        await post_to_bot(self._http, self._url, activity.wire(), headers)

    async def close(self) -> None:
        """Close the connection pool."""
        await self._http.close()
