"""Views: each stored record as the wire model that shows it, in one place.

The store speaks in records (`relay.store.records`), the wire in models (`relay.wire`,
`relay.wire.admin`); here one becomes the other, once for every reader, so a field added to
a record reaches every answer that shows it through one edit. The ingress (the APIs), the
pipeline (the webhook body) and the CLI show records through these functions; the CLI
prints the same views with its own timestamp format (`relay.commands.output.plain`).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING

from relay.store.records import (
    BotChoice,
    ConversationTokenRecord,
    DeadLetter,
    FoundAttempt,
    HistoryRow,
    IntegrationRecord,
    OutgoingRecord,
    TokenRecord,
)
from relay.wire import ConversationItem, ItemDelivery, OutgoingMessage, WebhookResponse
from relay.wire.admin import (
    AttemptView,
    BotView,
    DeadLetterView,
    IntegrationView,
    PacedView,
    SecretRotated,
    TokenView,
)
from relay.wire.tokens import ConversationTokenAnswer

if TYPE_CHECKING:
    # Only its type: the pipeline shows responses through this module, and a worker need
    # not load the admin operations (and their HTTP client) to do so.
    from relay.admin.integrations import Rotated


def webhook_body(record: OutgoingRecord) -> WebhookResponse:
    """The body POSTed to the back end for a response (and answered to a waiting POST)."""
    return WebhookResponse(
        type=record.type,
        payload=record.payload,
        conversationId=record.conversation_external_id,
        botpressUserId=record.user_id,
        botpressMessageId=record.id,
        botpressConversationId=record.conversation_id,
        sequence=record.sequence,
    )


def outgoing_view(record: OutgoingRecord) -> OutgoingMessage:
    """A bot message as stored, as the push API answers it."""
    return OutgoingMessage(
        id=record.id,
        createdAt=record.created_at,
        updatedAt=record.created_at,
        type=record.type,
        payload=record.payload,
        direction="outgoing",
        conversationId=record.conversation_id,
        userId=record.user_id,
        sequence=record.sequence,
    )


def integration_view(record: IntegrationRecord, public_base_url: str) -> IntegrationView:
    """An integration, never with its signing secret (only its creation and a rotation show
    that); `public_base_url`: how back ends reach the ingress (RELAY_PUBLIC_URL)."""
    return IntegrationView(
        id=record.id,
        name=record.name,
        webhookUrl=f"{public_base_url}/webhooks/{record.id}",
        responseUrl=record.response_url,
        enabled=record.disabled_at is None,
        createdAt=record.created_at,
        disabledAt=record.disabled_at,
        bot=bot_view(record.bot),
        operationsUrl=record.delivery.operations_url,
        deliveryRate=record.delivery.delivery_rate,
        deliveryBurst=record.delivery.delivery_burst,
        expiringTypes=record.delivery.expiring_types,
    )


_CREDENTIAL_NAMES = {"secret": "secret", "app_id": "appId", "app_password": "appPassword"}


def bot_view(bot: BotChoice | None) -> BotView | None:
    """The bot an integration names (None: RELAY_BOT), with the names of its credentials."""
    if bot is None:
        return None
    names = [_CREDENTIAL_NAMES[name] for name in bot.credentials()]
    return BotView.model_validate({"adapter": bot.adapter, "url": bot.url, "credentials": names})


def rotation_view(rotated: Rotated) -> SecretRotated:
    """A rotation: the new signing secret (this once) and until when the old one signs."""
    return SecretRotated(
        id=rotated.integration_id,
        signingSecret=rotated.secret,
        previousSecretValidUntil=rotated.previous_until,
    )


def token_view(record: TokenRecord) -> TokenView:
    """A token's metadata (never the token, which only its creation shows)."""
    return TokenView(
        id=record.id,
        integrationId=record.integration_id,
        kind=record.kind,
        prefix=record.prefix,
        createdAt=record.created_at,
        revokedAt=record.revoked_at,
    )


def conversation_token_answer(
    token: str, record: ConversationTokenRecord
) -> ConversationTokenAnswer:
    """A conversation token just minted: the token itself (shown this once), its id and when
    it expires."""
    return ConversationTokenAnswer(id=record.id, token=token, expiresAt=record.grant.expires_at)


def paced_view(integration: IntegrationRecord, waiting: int) -> PacedView:
    """A paced integration's pace, with how many of its responses wait."""
    return PacedView(
        integrationId=integration.id,
        name=integration.name,
        deliveryRate=integration.delivery.delivery_rate or 0.0,
        deliveryBurst=integration.delivery.burst(),
        waiting=waiting,
    )


def attempt_view(found: FoundAttempt) -> AttemptView:
    """One delivery attempt, with the ids that find it again."""
    return AttemptView(
        id=found.id,
        webhookId=found.delivery_id,
        attempt=found.attempt,
        integrationId=found.integration_id,
        responseId=found.message_id,
        conversationId=found.conversation_external_id,
        botpressConversationId=found.conversation_id,
        status=found.status,
        latencyMs=found.latency_ms,
        error=found.error,
        nextAttemptAt=found.next_attempt_at,
        responseBody=found.response_body,
        createdAt=found.created_at,
    )


def dead_letter_view(letter: DeadLetter) -> DeadLetterView:
    """A dead letter kept in the store."""
    return DeadLetterView(
        id=letter.id,
        stage=letter.stage,
        integrationId=letter.integration_id,
        conversationId=letter.conversation_id,
        reason=letter.reason,
        attempts=letter.attempts,
        lastStatus=letter.last_status,
        deadAt=datetime.fromtimestamp(letter.dead_at, UTC),
        body=letter.body,
    )


def delivery_id(message_id: str) -> str:
    """The `webhook-id` of a response: derived from its relay id, so stable across retries."""
    return f"msg_{message_id}"


def response_id(webhook_id: str) -> str | None:
    """The relay id of the response with that `webhook-id` (None: not one of ours)."""
    found = webhook_id.removeprefix("msg_")
    return found if found != webhook_id and found else None


def history_item(row: HistoryRow) -> ConversationItem:
    """A history row as the API shows it."""
    outgoing = row.direction == "outgoing"
    state = "delivered" if row.delivered else "expired" if row.expired else None
    state = state or ("dead" if row.dead else None)
    state = state or ("failed" if row.attempts else "pending")
    return ConversationItem(
        id=str(row.watermark),
        direction=row.direction,
        type=row.type,
        payload=row.payload,
        createdAt=row.created_at,
        conversationId=row.conversation_external_id,
        botpressConversationId=row.conversation_id,
        messageId=row.external_id or row.id,
        botpressMessageId=row.id,
        sequence=row.sequence,
        webhookId=delivery_id(row.id) if outgoing else None,
        delivery=ItemDelivery(state=state, attempts=row.attempts) if outgoing else None,
    )
