"""`POST /webhooks/{integrationId}` against the real broker, on both stores."""

from __future__ import annotations

import asyncio
import json
from datetime import datetime
from typing import Any

import pytest

from relay.broker import partition_of
from relay.settings import Settings
from relay.store import SqlStore
from relay.wire import InboundEnvelope, MessageBundle
from tests.helpers import Ingress, Queues, make_integration, message

Case = tuple[str, Any]


async def rows_of(store: SqlStore, integration_id: str) -> dict[str, int]:
    counts = {}
    async with store.driver.connection() as conn:
        for table in ("users", "conversations", "messages"):
            rows = await conn.fetchall(
                f"SELECT id FROM {table} WHERE integration_id = ?", integration_id
            )
            counts[table] = len(rows)
    return counts


def assert_timestamp(value: str) -> None:
    assert value.endswith("Z")
    datetime.fromisoformat(value.replace("Z", "+00:00"))


async def test_accepts_a_message_and_queues_it_once(
    ingress: Ingress, store: SqlStore, settings: Settings, queues: Queues
):
    integration_id, token = await make_integration(store, settings)
    status, body = await ingress.post(integration_id, token, message(1))
    assert status == 200, body
    bundle = MessageBundle.model_validate(body)
    assert body["user"]["tags"] == {"id": "user-1"}
    assert body["conversation"]["tags"] == {"id": "conv-1"}
    assert body["message"]["tags"] == {"id": "msg-1"}
    assert body["message"]["type"] == "text"
    assert body["message"]["payload"] == {"text": "hello 1"}
    assert body["message"]["direction"] == "incoming"
    assert body["message"]["conversationId"] == bundle.conversation.id
    assert body["message"]["userId"] == bundle.user.id
    for obj in body.values():
        assert_timestamp(obj["createdAt"])
        assert_timestamp(obj["updatedAt"])

    [queued] = await queues.take("inbound")
    envelope = InboundEnvelope.model_validate(queued)
    assert envelope.integrationId == integration_id
    assert envelope.bundle == bundle
    assert envelope.text == "hello 1"
    assert queued["_message_id"] == bundle.message.id
    assert queued["_partition"] == partition_of(bundle.conversation.id, settings.partitions)
    found = await store.find_incoming(integration_id, "msg-1")
    assert found is not None
    assert found.state == "queued"


async def test_payload_defaults(
    ingress: Ingress, store: SqlStore, settings: Settings, queues: Queues
):
    integration_id, token = await make_integration(store, settings)
    card = {"title": "Pick", "actions": []}
    status, body = await ingress.post(
        integration_id, token, message(1, type="card", text="a card", payload=card)
    )
    assert status == 200
    assert body["message"]["payload"] == {**card, "text": "a card"}
    status, body = await ingress.post(
        integration_id, token, message(2, payload={"text": "own text", "x": 1})
    )
    assert body["message"]["payload"] == {"text": "own text", "x": 1}
    assert len(await queues.take("inbound")) == 2


async def test_repeated_message_id_answers_the_same_and_queues_nothing(
    ingress: Ingress, store: SqlStore, settings: Settings, queues: Queues
):
    integration_id, token = await make_integration(store, settings)
    _, first = await ingress.post(integration_id, token, message(1))
    status, again = await ingress.post(integration_id, token, message(1))
    assert status == 200
    assert again == first
    assert len(await queues.take("inbound")) == 1


async def test_message_id_reused_with_another_body_is_a_conflict(
    ingress: Ingress, store: SqlStore, settings: Settings, queues: Queues
):
    integration_id, token = await make_integration(store, settings)
    await ingress.post(integration_id, token, message(1))
    await queues.take("inbound")
    before = await rows_of(store, integration_id)
    for changed in (
        {"text": "other"},
        {"userId": "someone-else"},
        {"conversationId": "conv-9"},
        {"payload": {"x": 1}},
    ):
        status, body = await ingress.post(integration_id, token, message(1, **changed))
        assert status == 409, changed
        assert body["error"]["code"] == "conflict"
    assert await queues.take("inbound") == []
    assert await rows_of(store, integration_id) == before


async def test_fifty_concurrent_duplicates_make_one_message_and_one_queued_entry(
    ingress: Ingress, store: SqlStore, settings: Settings, queues: Queues
):
    integration_id, token = await make_integration(store, settings)
    results = await asyncio.gather(
        *[ingress.post(integration_id, token, message("dup")) for _ in range(50)]
    )
    assert {status for status, _ in results} == {200}
    assert len({body["message"]["id"] for _, body in results}) == 1
    assert len(await queues.take("inbound")) == 1
    assert await rows_of(store, integration_id) == {"users": 1, "conversations": 1, "messages": 1}


async def test_one_conversation_stays_on_one_partition(
    ingress: Ingress, store: SqlStore, settings: Settings, queues: Queues
):
    integration_id, token = await make_integration(store, settings)
    for n in range(10):
        await ingress.post(integration_id, token, message(n, conversationId=f"c{n % 3}"))
    taken = await queues.take("inbound")
    by_conversation: dict[str, set[int]] = {}
    for item in taken:
        conv = item["bundle"]["conversation"]["tags"]["id"]
        by_conversation.setdefault(conv, set()).add(item["_partition"])
    assert len(taken) == 10
    assert all(len(partitions) == 1 for partitions in by_conversation.values())
    # and within a partition the broker keeps them in the order they were accepted
    texts = [i["text"] for i in taken if i["bundle"]["conversation"]["tags"]["id"] == "c0"]
    assert texts == ["hello 0", "hello 3", "hello 6", "hello 9"]


AUTH_CASES: list[Case] = [
    ("missing", None),
    ("empty", ""),
    ("scheme only", "Bearer"),
    ("wrong scheme", "Basic dXNlcjpwYXNz"),
    ("wrong token", "Bearer rly_not-a-real-token"),
    ("extra parts", "Bearer a b"),
    ("garbled", "Bearer \u00ff\u00fe%%=="),
    ("tab separated", "Bearer\trly_x"),
]


@pytest.mark.parametrize(("case", "header"), AUTH_CASES, ids=[c[0] for c in AUTH_CASES])
async def test_bad_authorization_is_401(
    ingress: Ingress,
    store: SqlStore,
    settings: Settings,
    queues: Queues,
    case: str,
    header: str | None,
):
    integration_id, _ = await make_integration(store, settings)
    headers = {"Authorization": header} if header is not None else {}
    status, body = await ingress.post(integration_id, None, message(1), headers=headers)
    assert status == 401
    assert body["error"]["code"] == "unauthorized"
    assert await queues.take("inbound") == []
    assert await rows_of(store, integration_id) == {"users": 0, "conversations": 0, "messages": 0}


async def test_scheme_is_case_insensitive(
    ingress: Ingress, store: SqlStore, settings: Settings, queues: Queues
):
    integration_id, token = await make_integration(store, settings)
    for n, scheme in enumerate(("bearer", "BEARER", "BeArEr")):
        status, _ = await ingress.post(
            integration_id, None, message(n), headers={"Authorization": f"{scheme} {token}"}
        )
        assert status == 200
    assert len(await queues.take("inbound")) == 3


async def test_token_of_another_integration_is_401(
    ingress: Ingress, store: SqlStore, settings: Settings, queues: Queues
):
    mine, _ = await make_integration(store, settings)
    _, theirs = await make_integration(store, settings)
    status, body = await ingress.post(mine, theirs, message(1))
    assert status == 401
    assert body == {
        "error": {"code": "unauthorized", "message": "missing or invalid token", "details": None}
    }
    assert await queues.take("inbound") == []


@pytest.mark.parametrize("integration_id", ["no-such-integration", "%00", "x" * 300, "%ED%A0%80"])
async def test_unknown_integration_is_404(ingress: Ingress, queues: Queues, integration_id: str):
    status, body = await ingress.post(integration_id, "rly_x", message(1))
    assert status == 404
    assert body["error"]["code"] == "not_found"
    assert await queues.take("inbound") == []


BODY_CASES: list[Case] = [
    ("not json", b"this is not json"),
    ("truncated json", b'{"userId": "u"'),
    ("invalid utf-8", b'{"userId": "\xff\xfe"}'),
    ("NaN constant", b'{"userId": NaN}'),
    ("array", b"[1, 2]"),
    ("string", b'"text"'),
    ("null", b"null"),
    ("empty body", b""),
    ("deep nesting", b"[" * 100_000 + b"]" * 100_000),
]


@pytest.mark.parametrize(("case", "raw"), BODY_CASES, ids=[c[0] for c in BODY_CASES])
async def test_body_that_is_not_a_json_object_is_400(
    ingress: Ingress, store: SqlStore, settings: Settings, queues: Queues, case: str, raw: bytes
):
    integration_id, token = await make_integration(store, settings)
    status, body = await ingress.post(integration_id, token, None, raw=raw)
    assert status == 400, body
    assert body["error"]["code"] == "invalid_body"
    assert await queues.take("inbound") == []
    assert (await rows_of(store, integration_id))["messages"] == 0


FIELD_CASES: list[tuple[str, dict[str, Any], str]] = []
for field in ("userId", "messageId", "conversationId", "type", "text"):
    FIELD_CASES += [
        (f"{field} missing", {field: ...}, field),
        (f"{field} empty", {field: ""}, field),
        (f"{field} number", {field: 42}, field),
        (f"{field} null", {field: None}, field),
        (f"{field} object", {field: {"a": 1}}, field),
    ]
for field in ("userId", "messageId", "conversationId"):
    FIELD_CASES.append((f"{field} too long", {field: "x" * 257}, field))
for field in ("userId", "messageId", "conversationId", "type", "text"):
    FIELD_CASES += [
        (f"{field} with NUL", {field: "a\u0000b"}, field),
        (f"{field} with lone surrogate", {field: "a\ud800b"}, field),
    ]
FIELD_CASES += [
    ("payload value with NUL", {"payload": {"k": ["x\u0000"]}}, "payload"),
    ("payload key with lone surrogate", {"payload": {"\udc00": 1}}, "payload"),
    ("payload list", {"payload": [1, 2]}, "payload"),
    ("payload string", {"payload": "text"}, "payload"),
    ("payload number", {"payload": 3}, "payload"),
]


@pytest.mark.parametrize(("case", "change", "field"), FIELD_CASES, ids=[c[0] for c in FIELD_CASES])
async def test_each_bad_field_is_400_naming_it(
    ingress: Ingress,
    store: SqlStore,
    settings: Settings,
    queues: Queues,
    case: str,
    change: dict[str, Any],
    field: str,
):
    integration_id, token = await make_integration(store, settings)
    body = message(1)
    for key, value in change.items():
        if value is ...:
            del body[key]
        else:
            body[key] = value
    status, answer = await ingress.post(integration_id, token, body)
    assert status == 400, answer
    assert answer["error"]["code"] == "invalid_body"
    assert field in [d["field"].split(".")[0] for d in answer["error"]["details"]]
    assert await queues.take("inbound") == []
    assert await rows_of(store, integration_id) == {"users": 0, "conversations": 0, "messages": 0}


async def test_every_bad_field_is_named_at_once(
    ingress: Ingress, store: SqlStore, settings: Settings
):
    integration_id, token = await make_integration(store, settings)
    status, answer = await ingress.post(integration_id, token, {"userId": 1, "text": ""})
    assert status == 400
    named = {d["field"] for d in answer["error"]["details"]}
    assert named == {"userId", "messageId", "conversationId", "type", "text"}


async def test_body_over_the_limit_is_413(
    ingress: Ingress, store: SqlStore, settings: Settings, queues: Queues
):
    integration_id, token = await make_integration(store, settings)
    big = message(1, text="x" * (settings.max_body_bytes + 1))
    status, body = await ingress.post(integration_id, token, big)
    assert status == 413
    assert body["error"]["code"] == "payload_too_large"
    assert await queues.take("inbound") == []
    # just under the limit is fine
    fits = message(2, text="x" * (settings.max_body_bytes - 200))
    assert len(json.dumps(fits)) <= settings.max_body_bytes
    status, _ = await ingress.post(integration_id, token, fits)
    assert status == 200
    assert len(await queues.take("inbound")) == 1


async def test_unknown_route_and_method_are_json(ingress: Ingress):
    async with ingress.http.get(f"{ingress.url}/nope") as response:
        assert response.status == 404
        assert (await response.json())["error"]["code"] == "not_found"
    async with ingress.http.get(f"{ingress.url}/webhooks/x") as response:
        assert response.status == 405
        assert (await response.json())["error"]["code"] == "method_not_allowed"
