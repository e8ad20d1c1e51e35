"""The Bot Framework connector: the relay as a Bot Framework channel (`RELAY_BOT=botframework`).

The bot worker POSTs each user message to the bot as an Activity whose `serviceUrl` is
`{RELAY_PUBLIC_URL}/botframework/{replyToken}/` (see `workers.bot.adapters.botframework`).
A bot built with the botbuilder SDK answers by calling the Connector API under that URL:

    POST /botframework/{token}/v3/conversations/{conversationId}/activities
    POST /botframework/{token}/v3/conversations/{conversationId}/activities/{activityId}
    PUT  /botframework/{token}/v3/conversations/{conversationId}/activities/{activityId}

`{token}` is the conversation-scoped reply token (the bot's own JWT is not checked). Each
Activity becomes zero or more Relay messages, validated like every bot message and stored
and queued through the `ReplyPublisher`, in the order they appear:

| Activity | Relay message |
|---|---|
| `typing` | `typing` `{"value": true}` (as the echo bot sends it) |
| `message` text (`textFormat` plain/xml/none) | `text` `{"text"}` |
| `message` text with `textFormat: markdown` | `markdown` `{"markdown"}` |
| `message` with `suggestedActions` | `choice` `{"text", "options": [{label, value}]}` |
| attachment `image/*` with `contentUrl` | `image` `{"imageUrl"}` |
| hero card attachment | `card` `{title, subtitle?, imageUrl?, actions}` |
| any other attachment with `contentUrl` | `file` `{"fileUrl", "title"?}` |
| other attachments (adaptive cards...), other activity types | nothing (logged) |

The answer is a ResourceResponse `{"id": ...}`: the relay id of the first message stored, or
a fresh id when the activity held nothing to show. An Activity `id` on a POST is an
idempotency key (a retried call answers the messages it stored); a PUT (an update) is shown
as a new message. Errors are the relay's JSON errors: 400 (not an Activity, or a message
that is not valid: nothing is stored then), 401, 404, 503.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from typing import Any, TypeVar

import structlog
from aiohttp import web
from pydantic import BaseModel, ValidationError

from relay.auth import reply_token_valid
from relay.broker import BrokerUnavailable
from relay.errors import InvalidBody, Unauthorized, Unavailable, invalid_fields
from relay.ingress.body import parse_json_object
from relay.ingress.push import addressed_conversation
from relay.payloads import InvalidPayload, validate_outgoing
from relay.pipeline.replies import ReplyPublisher
from relay.store import ConversationRecord, Conversations, Store
from relay.wire.botframework import (
    Activity,
    Attachment,
    CardAction,
    HeroCard,
    ResourceResponse,
)

log = structlog.get_logger(__name__)

CONNECTOR_PREFIX = "/botframework/{token}/v3/conversations/{conversationId}/activities"
HERO_CARD = "application/vnd.microsoft.card.hero"

Reply = tuple[str, dict[str, Any]]
M = TypeVar("M", bound=BaseModel)


# Bot Framework button types, by the Relay card action that does the same.
_ACTION_KINDS = {
    "imBack": "say",
    "postBack": "postback",
    "messageBack": "postback",
}


def _as_text(value: Any) -> str:
    if value is None:
        return ""
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def card_action(action: CardAction) -> dict[str, Any]:
    """A Relay card button: openUrl and other link-like buttons become `url`."""
    value = action.value if action.value is not None else action.text
    return {
        "action": _ACTION_KINDS.get(action.type, "url"),
        "label": action.title or action.displayText or _as_text(value),
        "value": _as_text(value),
    }


def hero_card(card: HeroCard) -> Reply:
    """A hero card as a Relay `card`."""
    payload: dict[str, Any] = {
        "title": card.title or card.text or "",
        "actions": [card_action(button) for button in card.buttons],
    }
    if card.subtitle:
        payload["subtitle"] = card.subtitle
    if card.images:
        payload["imageUrl"] = card.images[0].url
    return "card", payload


def attachment_message(attachment: Attachment, where: str) -> Reply | None:
    """The Relay message of one attachment, or None for a kind Relay cannot show."""
    kind = attachment.contentType.lower()
    if kind == HERO_CARD:
        return hero_card(_parse(HeroCard, attachment.content, f"{where}.content"))
    if attachment.contentUrl is None:
        return None
    if kind.startswith("image/"):
        return "image", {"imageUrl": attachment.contentUrl}
    payload: dict[str, Any] = {"fileUrl": attachment.contentUrl}
    if attachment.name:
        payload["title"] = attachment.name
    return "file", payload


def body_message(activity: Activity) -> Reply | None:
    """The message's text: `text`, `markdown`, or a `choice` when it suggests actions."""
    text = activity.text or ""
    if activity.suggestedActions and activity.suggestedActions.actions:
        options = [
            {"label": option["label"], "value": option["value"]}
            for option in map(card_action, activity.suggestedActions.actions)
        ]
        return "choice", {"text": text, "options": options}
    if not text:
        return None
    if (activity.textFormat or "").lower() == "markdown":
        return "markdown", {"markdown": text}
    return "text", {"text": text}


def messages_of(activity: Activity) -> list[tuple[str, Reply]]:
    """The Relay messages an Activity holds, each with where in the Activity it came from."""
    if activity.type == "typing":
        return [("type", ("typing", {"value": True}))]
    if activity.type != "message":
        return []
    found: list[tuple[str, Reply | None]] = [("text", body_message(activity))]
    for index, attachment in enumerate(activity.attachments):
        where = f"attachments.{index}"
        reply = attachment_message(attachment, where)
        if reply is None:
            log.warning("attachment_not_shown", content_type=attachment.contentType)
        found.append((where, reply))
    return [(where, reply) for where, reply in found if reply is not None]


def checked_messages(activity: Activity) -> list[Reply]:
    """`messages_of`, each validated; InvalidBody naming every bad field if any is not valid."""
    problems: list[dict[str, str]] = []
    replies: list[Reply] = []
    for where, (type_, payload) in messages_of(activity):
        try:
            replies.append((type_, validate_outgoing(type_, payload)))
        except InvalidPayload as error:
            problems += [{**detail, "activityField": where} for detail in error.details]
    if problems:
        raise InvalidBody("the activity is not a valid message", details=problems)
    return replies


def _parse(model: type[M], value: Any, where: str = "") -> M:
    """`model` validated from `value`, or InvalidBody naming each bad field."""
    try:
        return model.model_validate(value)
    except ValidationError as error:
        raise invalid_fields(error, "the activity is invalid", [where] if where else []) from error


def parse_activity(raw: bytes) -> Activity:
    """The request body as an Activity, or InvalidBody."""
    return _parse(Activity, parse_json_object(raw))


def idempotency_key(activity_id: str, index: int) -> str:
    """The key of the `index`th message of an activity the bot sent with an id."""
    return f"botframework:{hashlib.sha256(activity_id.encode()).hexdigest()[:32]}:{index}"


class Connector:
    """Authenticates the bot's calls and stores the messages of each Activity."""

    def __init__(self, store: Conversations, replies: ReplyPublisher) -> None:
        self._store = store
        self._replies = replies

    async def send_activity(self, request: web.Request) -> web.Response:
        """Store and queue the Activity's messages; 200 with a ResourceResponse."""
        conversation = await self.authenticate(request)
        activity = parse_activity(await request.read())
        replies = checked_messages(activity)
        keyed = request.method == "POST" and bool(activity.id)
        ids: list[str] = []
        try:
            for index, (type_, payload) in enumerate(replies):
                key = idempotency_key(activity.id or "", index) if keyed else None
                record, _ = await self._replies.push(conversation, type_, payload, key)
                ids.append(record.id)
        except BrokerUnavailable as error:
            raise Unavailable(
                "the broker cannot take the message now", headers={"Retry-After": "1"}
            ) from error
        log.info("botframework_activity", activity_type=activity.type, message_ids=ids)
        answer = ResourceResponse(id=ids[0] if ids else uuid.uuid4().hex)
        return web.json_response(answer.model_dump())

    async def authenticate(self, request: web.Request) -> ConversationRecord:
        """The addressed conversation, if the path's reply token is valid for it."""
        conversation = await addressed_conversation(self._store, request)
        token = request.match_info["token"]
        # compare_digest refuses non-ASCII text: such a token is simply not valid.
        if not token.isascii() or not reply_token_valid(
            await self._store.bot_secret(conversation.integration_id),
            token,
            conversation.id,
            time.time(),
        ):
            raise Unauthorized("missing or invalid token")
        return conversation


def add_connector_routes(
    app: web.Application,
    store_key: web.AppKey[Store],
    replies_key: web.AppKey[ReplyPublisher],
) -> None:
    """Register the connector routes; the store and publisher are read from the app."""

    async def send_activity(request: web.Request) -> web.Response:
        connector = Connector(request.app[store_key], request.app[replies_key])
        return await connector.send_activity(request)

    app.router.add_post(CONNECTOR_PREFIX, send_activity)
    app.router.add_post(CONNECTOR_PREFIX + "/{activityId}", send_activity)
    app.router.add_put(CONNECTOR_PREFIX + "/{activityId}", send_activity)
