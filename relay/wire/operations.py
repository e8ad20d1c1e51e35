"""Operations events: what Relay tells an integration's back end about its deliveries, at the
integration's `operationsUrl` (Svix's operational webhooks).

Each event is POSTed as `{"type", "timestamp", "data"}` with the Standard Webhooks headers,
signed with the integration's signing secret(s) as its responses are. Its `webhook-id` is
made from what identifies the event (`event_id`): an event sent again, after a failed
attempt or a worker's crash, carries the same one, for the receiver to deduplicate. On the
way it travels in an `OperationsEnvelope` (the `{prefix}.operations` queue).
"""

from __future__ import annotations

import hashlib
from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from relay.wire import OutboundEnvelope, Timestamp

DisabledReason = Literal["gone", "operator"]  # a `410 Gone` from the endpoint, or an operator


class ResponseDead(BaseModel):
    """A response given up on: dead-lettered by a delivery worker (its attempts spent, or a
    4xx), or by the broker (past its queue's delivery limit); never to be delivered unless
    replayed."""

    integrationId: str
    webhookId: str  # the response's own `webhook-id`
    conversationId: str  # the back end's id of the conversation
    botpressConversationId: str
    botpressMessageId: str
    sequence: int
    reason: str  # why, with the last error
    lastStatus: int | None  # the endpoint's last HTTP status; null: no answer, or none known
    attempts: int  # attempts made


class CircuitOpened(BaseModel):
    """An endpoint (scheme, host and port) failed enough times in a row that a delivery
    worker stopped sending to it: its responses wait in the broker until a probe succeeds."""

    integrationId: str
    endpoint: str
    openedAt: Timestamp
    probeAt: Timestamp  # when the first probe may go


class CircuitClosed(BaseModel):
    """A probe (or a delivery) to the endpoint succeeded: deliveries flow again."""

    integrationId: str
    endpoint: str
    openedAt: Timestamp | None  # as told by `relay.endpoint.circuit_opened`
    closedAt: Timestamp


class IntegrationDisabled(BaseModel):
    """The integration's endpoint is disabled: by a `410 Gone` (`gone`) or by an operator
    (`operator`). Nothing is delivered until it is enabled again."""

    integrationId: str
    reason: DisabledReason
    disabledAt: Timestamp


class ResponseDeadEvent(BaseModel):
    """`relay.response.dead`."""

    type: Literal["relay.response.dead"] = "relay.response.dead"
    timestamp: Timestamp
    data: ResponseDead


class CircuitOpenedEvent(BaseModel):
    """`relay.endpoint.circuit_opened`."""

    type: Literal["relay.endpoint.circuit_opened"] = "relay.endpoint.circuit_opened"
    timestamp: Timestamp
    data: CircuitOpened


class CircuitClosedEvent(BaseModel):
    """`relay.endpoint.circuit_closed`."""

    type: Literal["relay.endpoint.circuit_closed"] = "relay.endpoint.circuit_closed"
    timestamp: Timestamp
    data: CircuitClosed


class IntegrationDisabledEvent(BaseModel):
    """`relay.integration.disabled`."""

    type: Literal["relay.integration.disabled"] = "relay.integration.disabled"
    timestamp: Timestamp
    data: IntegrationDisabled


# The body POSTed to the operations URL, told apart by its `type`.
OperationsEvent = Annotated[
    ResponseDeadEvent | CircuitOpenedEvent | CircuitClosedEvent | IntegrationDisabledEvent,
    Field(discriminator="type"),
]


class OperationsEnvelope(BaseModel):
    """An operations event on its way (the `{prefix}.operations` queue, versioned)."""

    model_config = ConfigDict(frozen=True)

    kind: Literal["operations.event"] = "operations.event"
    version: Literal[1] = 1
    integrationId: str
    webhookId: str  # the same for every attempt, and for the same event told twice
    attempt: int = Field(default=0, ge=0)
    createdAt: Timestamp
    event: OperationsEvent

    def body(self) -> bytes:
        """The JSON POSTed: the event alone."""
        return self.event.model_dump_json().encode()


def event_id(*parts: str) -> str:
    """A `webhook-id` made from what identifies an event: the same parts, the same id."""
    digest = hashlib.sha256("\x1f".join(parts).encode()).hexdigest()
    return f"evt_{digest[:32]}"


def _iso(value: datetime | None) -> str:
    return value.isoformat() if value is not None else ""


def response_dead(
    envelope: OutboundEnvelope, reason: str, last_status: int | None, attempts: int, at: datetime
) -> OperationsEnvelope:
    """The event of a response given up on. Its id is the response's and its life's (the
    time it was queued, which a replay renews): a worker deciding its death again after a
    crash tells the same event; a replayed response that dies again tells a new one."""
    body = envelope.body
    data = ResponseDead(
        integrationId=envelope.integrationId,
        webhookId=envelope.deliveryId,
        conversationId=body.conversationId,
        botpressConversationId=body.botpressConversationId,
        botpressMessageId=body.botpressMessageId,
        sequence=body.sequence,
        reason=reason,
        lastStatus=last_status or None,
        attempts=attempts,
    )
    event = ResponseDeadEvent(timestamp=at, data=data)
    parts = (event.type, envelope.deliveryId, _iso(envelope.createdAt))
    return OperationsEnvelope(
        integrationId=envelope.integrationId, webhookId=event_id(*parts), createdAt=at, event=event
    )


def circuit_opened(
    integration_id: str, endpoint: str, opened_at: datetime, probe_at: datetime
) -> OperationsEnvelope:
    """The event of an endpoint's circuit opened, told to one integration delivering to it."""
    data = CircuitOpened(
        integrationId=integration_id, endpoint=endpoint, openedAt=opened_at, probeAt=probe_at
    )
    event = CircuitOpenedEvent(timestamp=opened_at, data=data)
    parts = (event.type, integration_id, endpoint, _iso(opened_at))
    return OperationsEnvelope(
        integrationId=integration_id, webhookId=event_id(*parts), createdAt=opened_at, event=event
    )


def circuit_closed(
    integration_id: str, endpoint: str, opened_at: datetime | None, closed_at: datetime
) -> OperationsEnvelope:
    """The event of an endpoint's circuit closed again, told to one integration."""
    data = CircuitClosed(
        integrationId=integration_id, endpoint=endpoint, openedAt=opened_at, closedAt=closed_at
    )
    event = CircuitClosedEvent(timestamp=closed_at, data=data)
    parts = (event.type, integration_id, endpoint, _iso(closed_at))
    return OperationsEnvelope(
        integrationId=integration_id, webhookId=event_id(*parts), createdAt=closed_at, event=event
    )


def integration_disabled(
    integration_id: str, reason: DisabledReason, disabled_at: datetime
) -> OperationsEnvelope:
    """The event of an integration disabled (its id: the integration and the moment)."""
    data = IntegrationDisabled(integrationId=integration_id, reason=reason, disabledAt=disabled_at)
    event = IntegrationDisabledEvent(timestamp=disabled_at, data=data)
    parts = (event.type, integration_id, _iso(disabled_at))
    return OperationsEnvelope(
        integrationId=integration_id,
        webhookId=event_id(*parts),
        createdAt=disabled_at,
        event=event,
    )
