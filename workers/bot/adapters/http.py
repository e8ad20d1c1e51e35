"""Bots behind a URL (`RELAY_BOT=http`, `RELAY_BOT_URL`, or an integration's `http` bot,
whose `secret`, if given, is sent as `Authorization: Bearer`).

Each message is POSTed as JSON: `{integrationId, user, conversation, message, text,
replyUrl, botToken}`. A JSON list in the answer becomes the replies at once; an empty answer
means the bot answers later through `replyUrl` (the bot push API) with `botToken`. Each item
is either Botpress-shaped (`{"type", "payload"}`) or Rasa REST-shaped (`{"text"}`,
`{"image"}`, `{"buttons"}`, `{"custom"}`, `{"attachment"}`), mapped to Botpress types.
Timeouts, connection errors and 5xx are retried; another 4xx is not.
"""

from __future__ import annotations

import json
from typing import Any

import aiohttp

from relay.wire import InboundEnvelope
from workers.bot.adapters.base import BotContext, BotFailure, keep_valid, post_to_bot


def rasa_item(item: dict[str, Any]) -> list[tuple[str, Any]]:
    """The Botpress messages of one Rasa REST answer item."""
    messages: list[tuple[str, Any]] = []
    buttons = item.get("buttons")
    if buttons:
        options = [{"label": b.get("title", ""), "value": b.get("payload", "")} for b in buttons]
        messages.append(("choice", {"text": item.get("text", ""), "options": options}))
    elif "text" in item:
        messages.append(("text", {"text": item["text"]}))
    if "image" in item:
        messages.append(("image", {"imageUrl": item["image"]}))
    if "attachment" in item:
        messages.append(("file", {"fileUrl": item["attachment"]}))
    custom = item.get("custom")
    if isinstance(custom, dict):
        if isinstance(custom.get("type"), str) and isinstance(custom.get("payload"), dict):
            messages.append((custom["type"], custom["payload"]))
        else:
            messages.append(("custom", custom))
    return messages


def replies_of(answer: Any) -> list[tuple[str, Any]]:
    """The replies in a bot's JSON answer (a list; anything else holds none)."""
    if not isinstance(answer, list):
        return []
    replies: list[tuple[str, Any]] = []
    for item in answer:
        if not isinstance(item, dict):
            continue
        if isinstance(item.get("type"), str) and "payload" in item:
            replies.append((item["type"], item["payload"]))
        else:
            replies += rasa_item(item)
    return replies


class HttpBot:
    """POSTs each message to the bot's URL over a shared connection pool."""

    def __init__(self, url: str, timeout: float, secret: str | None = None) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError("an http bot needs an http(s) URL (RELAY_BOT_URL, or its bot's url)")
        self._url = url
        # The bot's secret, when it has one, is its proof that the POST comes from Relay.
        self._headers = {} if secret is None else {"Authorization": f"Bearer {secret}"}
        self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout))

    async def handle(self, envelope: InboundEnvelope, context: BotContext) -> None:
        """POST the message; reply with what the answer holds."""
        body = {
            "integrationId": envelope.integrationId,
            **envelope.bundle.model_dump(mode="json"),
            "text": envelope.text,
            "replyUrl": context.reply_url,
            "botToken": context.reply_token,
        }
        raw = await post_to_bot(self._http, self._url, body, self._headers)
        try:
            answer = json.loads(raw) if raw.strip() else None
        except ValueError as error:
            raise BotFailure(f"the bot answered with invalid JSON: {error}") from error
        for type_, payload in keep_valid(replies_of(answer)):
            await context.reply(type_, payload)

    async def close(self) -> None:
        """Close the connection pool."""
        await self._http.close()
