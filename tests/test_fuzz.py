"""Arbitrary JSON at the ingress: never a 5xx; nothing queued unless it is a valid message."""

from __future__ import annotations

from typing import Any

from aio_pika.abc import AbstractRobustConnection
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from relay.broker import Topology
from relay.settings import Settings
from relay.store import SqlStore
from relay.wire import InboundRequest, storable_text
from relay.wire.contract import json_problems
from tests.helpers import Ingress, Queues, make_integration

# Any character at all, unpaired surrogates and NUL included: JSON can carry them.
anything = st.text(st.characters(codec=None)) | st.text(st.characters(categories=["Cs", "Cc"]))
scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | anything
json_values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
FIELDS = ["userId", "messageId", "conversationId", "type", "text", "payload"]
# Objects shaped like messages: the real keys with arbitrary values, some left out.
near_messages = st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=6)


def is_valid(body: Any) -> bool:
    # The input contract first (it applies to the whole body), then the message's shape.
    if not isinstance(body, dict) or json_problems(body):
        return False
    try:
        InboundRequest.model_validate(body)
    except ValidationError:
        return False
    return True


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=json_values | near_messages, counter=st.integers(min_value=0, max_value=10**9))
async def test_arbitrary_json_gets_a_4xx_and_queues_nothing(
    ingress: Ingress,
    store: SqlStore,
    settings: Settings,
    amqp: AbstractRobustConnection,
    body: Any,
    counter: int,
):
    queues = Queues(amqp, Topology(settings.queue_prefix, settings.partitions))
    integration_id, token = await make_integration(store, settings, name="fuzz")
    if isinstance(body, dict) and isinstance(body.get("messageId"), str):
        # fresh ids, so a valid body is a new message in every example
        body = {**body, "messageId": f"{body['messageId'][:200]}-{counter}"}
    status, answer = await ingress.post(integration_id, token, body)
    queued = await queues.take("inbound")
    if is_valid(body):
        assert status == 200, answer
        assert len(queued) == 1
        return
    assert status == 400, (body, answer)
    assert answer["error"]["code"] == "invalid_body"
    assert answer["error"]["details"]
    assert queued == []
    message_id = body.get("messageId") if isinstance(body, dict) else None
    if isinstance(message_id, str) and is_storable(message_id):
        assert await store.find_incoming(integration_id, message_id) is None


def is_storable(text: str) -> bool:
    try:
        storable_text(text)
    except ValueError:
        return False
    return True
