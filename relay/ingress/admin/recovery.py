"""Sending responses again, and looking at a conversation: `POST /responses/{webhookId}/resend`,
`POST /integrations/{id}/recover`, `GET /integrations/{id}/conversations/{conversationId}`.

A resend publishes the stored response as a first attempt under its webhook-id, so the
back end can tell it is the same response. A recovery does that for every response of the
integration given up on since a time (`relay.admin.recovery`).
"""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from relay.admin.recovery import recover_integration
from relay.errors import Conflict, NotFound
from relay.ingress.admin.common import (
    AdminKeys,
    body_of,
    find_integration,
    json_answer,
    page_size,
)
from relay.ingress.conversations import parse_watermark
from relay.store import AttemptQuery
from relay.views import attempt_view, history_item, response_id
from relay.wire.admin import Count, Recovery, Resent, Timeline

TIMELINE_ATTEMPTS = 1000  # the newest this many of a conversation's attempts


@dataclass(frozen=True)
class RecoveryRoutes:
    """The handlers, reaching the store, broker and publisher through the parent's keys."""

    keys: AdminKeys

    def add_to(self, app: web.Application) -> None:
        app.router.add_post("/responses/{webhookId}/resend", self.resend)
        app.router.add_post("/integrations/{id}/recover", self.recover)
        app.router.add_get("/integrations/{id}/conversations/{conversationId}", self.timeline)

    async def resend(self, request: web.Request) -> web.Response:
        """A delivered response once more (202: it is queued, not yet delivered)."""
        webhook_id = request.match_info["webhookId"]
        relay_id = response_id(webhook_id)
        found = None
        if relay_id is not None:
            found = await request.config_dict[self.keys.store].find_response(relay_id)
        if relay_id is None or found is None:
            raise NotFound("no response has that webhook-id")
        if not found.delivered:
            raise Conflict(
                "that response was not delivered yet: it is being retried, or it is dead"
                " (replay it from the dead letters, or recover the integration)"
            )
        if not await request.config_dict[self.keys.replies].send_again(found.record):
            raise Conflict("that response's stored payload can never be published: it is dead")
        return json_answer(Resent(webhookId=webhook_id, responseId=relay_id), status=202)

    async def recover(self, request: web.Request) -> web.Response:
        """Every response of the integration given up on since `since`, sent again."""
        store = request.config_dict[self.keys.store]
        integration = await find_integration(store, request.match_info["id"])
        body = await body_of(request, Recovery)
        replies = request.config_dict[self.keys.replies]
        return json_answer(
            Count(count=await recover_integration(store, replies, integration.id, body.since))
        )

    async def timeline(self, request: web.Request) -> web.Response:
        """The conversation's items after `?after=` (its history) with their attempts."""
        store = request.config_dict[self.keys.store]
        integration = await find_integration(store, request.match_info["id"])
        after = parse_watermark(request.query.get("after"), "after")
        limit = page_size(request)
        conversation = await store.find_conversation(
            integration.id, request.match_info["conversationId"]
        )
        if conversation is None:
            raise NotFound("unknown conversation")
        page = await store.history("conversation", conversation, after, limit)
        responses = {row.id for row in page.items if row.direction == "outgoing"}
        query = AttemptQuery(conversation_id=conversation)
        found = await store.search_attempts(query, TIMELINE_ATTEMPTS) if responses else []
        attempts = [attempt_view(a) for a in reversed(found) if a.message_id in responses]
        answer = Timeline(
            messages=[history_item(row) for row in page.items],
            attempts=attempts,
            watermark=str(page.watermark),
        )
        return json_answer(answer)
