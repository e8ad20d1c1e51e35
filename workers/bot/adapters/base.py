"""What a bot adapter is, and the context a bot answers through.

A turn is one inbound message handed to the bot. Replies the bot makes during the turn are
kept and stored together when it ends (so a redelivered message never gets a second set);
replies made after it ended ("late": a delayed task, a proactive message) are stored and
published one by one as they come.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import aiohttp
import structlog

from relay.payloads import InvalidPayload, validate_outgoing
from relay.tracing import inject_current
from relay.wire import InboundEnvelope
from relay.wire.contract import MAX_PAYLOAD_BYTES

log = structlog.get_logger(__name__)

LateReply = Callable[[str, dict[str, Any]], Awaitable[None]]
# A bot's whole answer: a few replies of the largest payload one may carry.
MAX_ANSWER_BYTES = 4 * MAX_PAYLOAD_BYTES


class BotFailure(Exception):
    """The bot could not answer. Retried later unless `permanent`."""

    def __init__(self, reason: str, permanent: bool = False) -> None:
        super().__init__(reason)
        self.permanent = permanent


class BotContext:
    """Handed to the bot with each message: `reply()` as often as it likes, also later."""

    def __init__(
        self, envelope: InboundEnvelope, reply_url: str, reply_token: str, late: LateReply
    ) -> None:
        self.envelope = envelope
        # Where and with what a bot that answers later can POST (the bot push API).
        self.reply_url = reply_url
        self.reply_token = reply_token
        self._late = late
        self._replies: list[tuple[str, dict[str, Any]]] | None = []

    async def reply(self, type_: str, payload: dict[str, Any]) -> None:
        """Send one message to the user; InvalidPayload if it is not a valid message."""
        checked = validate_outgoing(type_, payload)
        if self._replies is None:
            await self._late(type_, checked)
        else:
            self._replies.append((type_, checked))

    def finish(self) -> list[tuple[str, dict[str, Any]]]:
        """End the turn: the replies made during it; later ones are sent as they come."""
        replies, self._replies = self._replies or [], None
        return replies


def keep_valid(replies: list[tuple[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """The valid replies of a bot's answer; each invalid one is logged and left out."""
    valid = []
    for type_, payload in replies:
        try:
            valid.append((type_, validate_outgoing(type_, payload)))
        except InvalidPayload as error:
            log.error("invalid_reply", type=type_, details=error.details)
    return valid


async def post_to_bot(
    http: aiohttp.ClientSession,
    url: str,
    body: dict[str, Any],
    headers: dict[str, str] | None = None,
) -> bytes:
    """POST to a bot; its answer's body. The one policy for what a bot's answer means:
    a timeout, a connection error, 408, 429 or 5xx is retried (BotFailure); another
    non-2xx is not (BotFailure, permanent). Inside a traced turn the POST carries its
    `traceparent`, so a bot that traces joins the message's trace."""
    headers = dict(headers or {})
    inject_current(headers)
    try:
        async with http.post(url, json=body, headers=headers, allow_redirects=False) as response:
            # Bounded: an answer larger than any reply may be is refused, not held in memory.
            raw = await response.content.read(MAX_ANSWER_BYTES + 1)
            status = response.status
    except (aiohttp.ClientError, TimeoutError) as error:
        raise BotFailure(f"the bot did not answer: {error!r}") from error
    if status >= 500 or status in (408, 429):
        raise BotFailure(f"the bot answered {status}")
    if not 200 <= status < 300:
        raise BotFailure(f"the bot refused the message with {status}", permanent=True)
    if len(raw) > MAX_ANSWER_BYTES:
        raise BotFailure(f"the bot's answer is over {MAX_ANSWER_BYTES} bytes", permanent=True)
    return raw


class BotAdapter(Protocol):
    """How the bot worker talks to one kind of bot."""

    async def handle(self, envelope: InboundEnvelope, context: BotContext) -> None:
        """Hand one message to the bot; raise BotFailure if it cannot answer now."""

    async def close(self) -> None:
        """Release what the adapter holds (HTTP sessions)."""
