"""The one input contract (`relay.wire.contract`): what the edge answers 2xx, every later stage
carries (serialized, published, parsed by the workers, stored, delivered); what it refuses
leaves nothing behind; never a 5xx.

The property test drives the real pipeline (ingress, bot worker, delivery worker, a real
receiver) with bodies that are nested, wide, unicode, numeric and odd-typed; the bot mirrors
the payload it was handed, so the webhook shows what every stage carried.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from relay import admin
from relay.payloads import InvalidPayload, validate_outgoing
from relay.settings import Settings
from relay.store import SqlStore
from relay.wire import InboundEnvelope, InboundRequest, MessageBundle, WebhookResponse, utcnow
from relay.wire.contract import MAX_DEPTH, MAX_PAYLOAD_BYTES, json_problems
from tests.helpers import (
    Ingress,
    admin_call,
    eventually,
    make_integration,
    message,
    start_bot_worker,
    start_delivery_worker,
)
from tests.receivers import Receiver
from tests.test_ingress import rows_of

# The depths the outside review sent: accepted then lost (196-250), a poison row (300-990).
PROBE_DEPTHS = [196, 200, 250, 300, 990]


def nested(depth: int, leaf: Any = 1) -> Any:
    """A JSON value spanning `depth` levels (objects and arrays in turn) around `leaf`."""
    value: Any = {"x": leaf}
    for level in range(depth - 1):
        value = [value] if level % 2 else {"x": value}
    return value


def body_with_payload(payload: Any, n: int | str = 1) -> dict[str, Any]:
    return {**message(n), "payload": payload}


def raw_body_nested(depth: int, n: int | str = 1) -> bytes:
    """`body_with_payload(nested(depth))` as JSON text, written without recursion (a client's
    encoder may not reach the depths the probes sent)."""
    payload = '{"x": [' * (depth // 2) + ('{"x": 1}' if depth % 2 else "1") + "]}" * (depth // 2)
    return json.dumps(message(n))[:-1].encode() + b', "payload": ' + payload.encode() + b"}"


# --- the contract itself -----------------------------------------------------------------


def test_a_body_may_span_the_contracts_depth_and_not_one_level_more() -> None:
    assert json_problems(body_with_payload(nested(MAX_DEPTH - 1))) == []
    assert json_problems(body_with_payload(nested(MAX_DEPTH))) == [
        {
            "field": "payload" + ".x.0" * 31 + ".x",
            "message": f"nested deeper than {MAX_DEPTH} levels",
        }
    ]


@pytest.mark.parametrize(
    ("value", "message_"),
    [
        ({"a": 2**64}, "integers must be between -2**63 and 2**64-1"),
        ({"a": -(2**63) - 1}, "integers must be between -2**63 and 2**64-1"),
        ({"a": "\x00"}, "must not contain NUL characters"),
        ({"a": "\ud800"}, "must not contain unpaired surrogates (invalid UTF-16)"),
        ({"\x00": 1}, "key must not contain NUL characters"),
        ({"a": float("inf")}, "must be a finite number"),
    ],
)
def test_what_the_contract_refuses_is_named_by_its_place(value: Any, message_: str) -> None:
    assert json_problems(value) == [{"field": "a" if "a" in value else "", "message": message_}]


def one(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """`strategy` as one choice of a union (unions are flattened otherwise, and each of its
    branches would weigh as much as a whole other choice)."""
    return strategy.map(lambda value: value)


# What the contract takes, and what it refuses (out-of-range numbers, NUL, lone surrogates).
clean_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(st.characters(exclude_characters="\x00"), max_size=12)
)
hazards = (
    st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(st.characters(codec=None), max_size=12)
)
scalars = st.one_of(one(clean_scalars), one(clean_scalars), one(clean_scalars), one(hazards))
json_values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.text(st.characters(codec=None), max_size=6), children, max_size=4)
    ),
    max_leaves=16,
)
# Deep values around the limit: a payload may span MAX_DEPTH - 1 levels.
deep_values = st.tuples(st.integers(MAX_DEPTH - 8, MAX_DEPTH + 4), clean_scalars).map(
    lambda t: nested(*t)
)
wide_values = st.dictionaries(st.text(max_size=8), clean_scalars, min_size=20, max_size=80)
payload_values = st.dictionaries(
    st.text(max_size=6), json_values | deep_values | wide_values, max_size=4
)


def bundle_with(payload: dict[str, Any]) -> MessageBundle:
    now = utcnow()
    entity = {"createdAt": now, "updatedAt": now}
    return MessageBundle.model_validate(
        {
            "user": {"id": "u", "tags": {"id": "u"}, **entity},
            "conversation": {"id": "c", "tags": {"id": "c"}, **entity},
            "message": {
                "id": "m",
                "tags": {"id": "m"},
                "type": "t",
                "payload": payload,
                "direction": "incoming",
                "conversationId": "c",
                "userId": "u",
                **entity,
            },
        }
    )


@settings(max_examples=300, deadline=None)
@given(payload=payload_values)
def test_every_payload_the_contract_takes_every_stage_carries(payload: dict[str, Any]) -> None:
    """The edge's check and the model's agree; an accepted payload survives the envelopes'
    serialization and the workers' parser unchanged (what broke at 196-990 levels)."""
    body = body_with_payload(payload)
    accepted = json_problems(body) == []
    try:
        request = InboundRequest.model_validate(body)
    except ValueError:
        request = None
    assert (request is not None) == accepted
    if request is None:
        return
    envelope = InboundEnvelope(
        integrationId="i",
        text="t",
        bundle=bundle_with(request.normalized_payload()),
        acceptedAt=utcnow(),
    )
    parsed = InboundEnvelope.model_validate_json(envelope.model_dump_json())
    assert parsed.bundle.message.payload == request.normalized_payload()
    response = WebhookResponse(
        type="mirror",
        payload=parsed.bundle.message.payload,
        conversationId="c",
        botpressUserId="u",
        botpressMessageId="m",
        botpressConversationId="c",
        sequence=0,
    )
    assert json.loads(response.model_dump_json())["payload"] == request.normalized_payload()


async def test_a_bad_key_above_a_bad_value_is_named_readably(
    ingress: Ingress, store: SqlStore, settings: Settings
) -> None:
    """The path of the place names the bad key, escaped: the answer is still JSON."""
    integration_id, token = await make_integration(store, settings, name="bad-key")
    raw = json.dumps(message("bad-key"))[:-1] + ', "payload": {"\\ud800": {"b": 1e999}}}'
    status, answer = await ingress.post(integration_id, token, None, raw=raw.encode())
    assert status == 400, answer
    named = {"field": "payload.\\ud800.b", "message": "must be a finite number"}
    assert named in answer["error"]["details"]


# --- the probes, at every route that takes JSON ------------------------------------------


@pytest.mark.parametrize("depth", PROBE_DEPTHS)
async def test_the_probes_depths_are_refused_at_the_edge_and_nothing_is_kept(
    ingress: Ingress, store: SqlStore, settings: Settings, depth: int
) -> None:
    integration_id, token = await make_integration(store, settings, name=f"deep-{depth}")
    raw = raw_body_nested(depth)
    status, answer = await ingress.post(integration_id, token, None, raw=raw)
    assert status == 400, answer
    assert answer["error"]["code"] == "invalid_body"
    assert answer["error"]["details"][0]["message"] == f"nested deeper than {MAX_DEPTH} levels"
    assert await rows_of(store, integration_id) == {"users": 0, "conversations": 0, "messages": 0}


async def test_the_bot_push_route_refuses_a_payload_past_the_depth(
    ingress: Ingress, store: SqlStore, settings: Settings
) -> None:
    integration_id, token = await make_integration(store, settings, name="deep-push")
    status, answer = await ingress.post(integration_id, token, message("push-1"))
    assert status == 200, answer
    conversation_id = answer["conversation"]["id"]
    bot_token, _ = await admin.create_token(store, integration_id, "bot")
    url = f"{ingress.url}/bot/conversations/{conversation_id}/messages"
    headers = {"Authorization": f"Bearer {bot_token}"}
    async with ingress.http.post(
        url, json={"type": "custom", "payload": {"text": "hi", "x": nested(300)}}, headers=headers
    ) as response:
        assert response.status == 400, await response.text()
    async with store.driver.connection() as conn:
        outgoing = await conn.fetchall(
            "SELECT id FROM messages WHERE conversation_id = ? AND direction = 'outgoing'",
            conversation_id,
        )
    assert outgoing == []


async def test_the_admin_api_refuses_a_body_past_the_depth(
    ingress: Ingress, admin_token: str
) -> None:
    body = {"name": "deep", "responseUrl": "http://127.0.0.1:9/r", "x": nested(300)}
    status, answer = await admin_call(ingress, "POST", "/integrations", admin_token, body)
    assert status == 400, answer
    assert answer["error"]["details"][0]["message"] == f"nested deeper than {MAX_DEPTH} levels"


# --- the property, through the real pipeline ----------------------------------------------


@pytest.fixture(scope="module")
async def mirrored(
    settings: Settings, store: SqlStore, receiver: Receiver
) -> AsyncIterator[tuple[str, str]]:
    """A bot worker mirroring payloads and a delivery worker, for an integration whose
    responses go to the receiver: (integration id, token)."""
    mirror = settings.model_copy(update={"bot": "tests.bots:mirror"})
    ids = await make_integration(store, settings, "mirror", receiver.url("mirror"))
    async with start_bot_worker(mirror), start_delivery_worker(settings):
        yield ids


def mostly(good: st.SearchStrategy[Any], bad: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """`good` about four times in five, else `bad`."""
    return st.sampled_from([True, True, False, True, True]).flatmap(lambda ok: good if ok else bad)


# Mostly the right types (so most bodies reach the bot and the receiver), sometimes not.
odd = one(st.integers() | st.lists(st.integers(), max_size=2) | st.none() | st.booleans())
any_text = st.text(st.characters(codec=None), max_size=40)
ids = one(st.text(st.characters(exclude_characters="\x00"), min_size=1, max_size=40))
bodies = st.fixed_dictionaries(
    {
        "userId": mostly(ids, one(st.text(min_size=250, max_size=260)) | one(any_text) | odd),
        "type": mostly(ids, odd),
        "text": mostly(ids, one(any_text) | odd),
    },
    optional={
        "payload": mostly(payload_values, odd | one(json_values)),
        "extra": json_values,
    },
)


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(body=bodies)
async def test_answered_2xx_is_delivered_and_4xx_keeps_nothing(
    ingress: Ingress,
    store: SqlStore,
    receiver: Receiver,
    mirrored: tuple[str, str],
    body: dict[str, Any],
) -> None:
    integration_id, token = mirrored
    # Fresh ids in every example: each valid body is a new message in a new conversation.
    conversation = f"conv-{uuid.uuid4().hex}"
    sent = {**body, "messageId": f"msg-{uuid.uuid4().hex}", "conversationId": conversation}
    before = await rows_of(store, integration_id)
    status, answer = await ingress.post(integration_id, token, sent)
    event(f"answered {status}")
    assert status < 500, answer
    if status != 200:
        assert status == 400, answer
        assert await rows_of(store, integration_id) == before
        return
    stored = answer["message"]["payload"]

    async def mirrored_back() -> bool:
        return any(
            hit.body["conversationId"] == conversation and hit.body["type"] == "mirror"
            for hit in receiver.at("mirror")
        )

    await eventually(mirrored_back, timeout=20)
    hit = next(h for h in receiver.at("mirror") if h.body["conversationId"] == conversation)
    assert hit.body["payload"] == stored
    expected = {**(body.get("payload") or {})}
    expected.setdefault("text", body["text"])
    assert stored == expected


def test_a_bot_reply_larger_than_any_message_may_carry_is_refused() -> None:
    """A reply does not come in a request body: its own bound keeps every envelope under
    what the broker takes (RabbitMQ 4: 16 MiB)."""
    fits = {"text": "x" * (MAX_PAYLOAD_BYTES - 20)}
    assert validate_outgoing("text", fits) is fits
    with pytest.raises(InvalidPayload) as refused:
        validate_outgoing("text", {"text": "x" * MAX_PAYLOAD_BYTES})
    assert refused.value.details == [
        {"field": "payload", "message": f"must be at most {MAX_PAYLOAD_BYTES} bytes of JSON"}
    ]
