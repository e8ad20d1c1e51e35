"""The admin API (/admin/v1) against a real broker and both stores: admin tokens only
(each looked up by its hash), integrations (create with the endpoint check, change the
response URL with the check again, disable, enable, delete; the signing secret shown when
made, by creation or rotation, and never again), tokens (create, list, revoke), queues, and
a JSON 4xx for every bad input."""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from typing import Any

from aio_pika.abc import AbstractRobustConnection

from relay import admin
from relay.auth import hash_token
from relay.broker import topology_of
from relay.broker.operations import OperationsEvents
from relay.broker.topology import delete
from relay.settings import Settings
from relay.store import SqlStore
from relay.wire import utcnow
from relay.wire.operations import integration_disabled
from tests.helpers import (
    Ingress,
    attempt_record,
    connected_broker,
    eventually,
    make_integration,
    message,
    start_ingress,
)
from tests.helpers import admin_call as call
from tests.receivers import Receiver


async def test_only_admin_tokens_get_in(
    ingress: Ingress, store: SqlStore, settings: Settings, admin_token: str
):
    _, integration_token = await make_integration(store, settings)
    for token in (None, integration_token, "rly_nonsense"):
        status, body = await call(ingress, "GET", "/integrations", token)
        assert status == 401
        assert body["error"]["code"] == "unauthorized"
    status, _ = await call(ingress, "GET", "/integrations", admin_token)
    assert status == 200
    # Revoked: out.
    other, record = await admin.create_token(store, None, "admin")
    assert (await call(ingress, "GET", "/integrations", other))[0] == 200
    assert await store.revoke_token(record.id)
    assert (await call(ingress, "GET", "/integrations", other))[0] == 401


async def test_an_admin_token_is_looked_up_by_its_hash_alone(store: SqlStore, settings: Settings):
    token, record = await admin.create_token(store, None, "admin")
    _, integration_token = await make_integration(store, settings)
    assert await store.admin_token_active(hash_token(token))
    for other in (integration_token, "rly_nonsense", ""):
        assert not await store.admin_token_active(hash_token(other))
    assert await store.revoke_token(record.id)
    assert not await store.admin_token_active(hash_token(token))


async def test_a_signing_secret_is_shown_when_made_and_never_in_a_list_or_a_read(
    ingress: Ingress, admin_token: str, receiver: Receiver, store: SqlStore
):
    url = receiver.url("admin-secret")
    status, created = await call(
        ingress, "POST", "/integrations", admin_token, {"name": "once", "responseUrl": url}
    )
    assert status == 201
    first = created["signingSecret"]
    path = f"/integrations/{created['id']}"
    rotated_until = utcnow() + timedelta(hours=24)
    status, rotated = await call(ingress, "POST", f"{path}/rotate-secret", admin_token)
    assert status == 200, rotated
    assert set(rotated) == {"id", "signingSecret", "previousSecretValidUntil"}
    second = rotated["signingSecret"]
    assert second.startswith("whsec_")
    assert second != first
    # The grace period the CLI uses (24 hours) unless the body says otherwise.
    until = datetime.fromisoformat(rotated["previousSecretValidUntil"])
    assert abs((until - rotated_until).total_seconds()) < 60
    record = await store.get_integration(created["id"])
    assert record is not None
    assert record.signing_secrets(utcnow()) == [second, first]
    status, again = await call(ingress, "POST", f"{path}/rotate-secret", admin_token, {"grace": 0})
    assert status == 200
    record = await store.get_integration(created["id"])
    assert record is not None
    assert record.signing_secrets(utcnow()) == [again["signingSecret"]]

    # No list, read or change answers a secret, old or new.
    secrets = [first, second, again["signingSecret"]]
    answers = [
        await call(ingress, "GET", "/integrations?limit=1000", admin_token),
        await call(ingress, "GET", path, admin_token),
        await call(ingress, "PATCH", path, admin_token, {"responseUrl": url}),
        await call(ingress, "PATCH", path, admin_token, {"enabled": True}),
    ]
    for status, answer in answers:
        assert status == 200
        text = json.dumps(answer)
        assert "signingSecret" not in text
        assert not [secret for secret in secrets if secret.removeprefix("whsec_") in text]


async def test_a_rotation_takes_an_optional_grace_in_seconds(
    ingress: Ingress, admin_token: str, store: SqlStore, settings: Settings
):
    integration_id, _ = await make_integration(store, settings, name="rotated")
    path = f"/integrations/{integration_id}/rotate-secret"
    before = await store.get_integration(integration_id)
    for body, raw in [
        ({"grace": -1}, None),
        ({"grace": "1h"}, None),
        ({"grace": True}, None),
        ({"grace": 31 * 86400}, None),
        ({"grace": 60, "secret": "whsec_mine"}, None),
        (None, b"[]"),
        (None, b"not json"),
    ]:
        status, answer = await call(ingress, "POST", path, admin_token, body, raw)
        assert (status, answer["error"]["code"]) == (400, "invalid_body"), (body, raw, answer)
    assert await store.get_integration(integration_id) == before
    assert (await call(ingress, "POST", "/integrations/nope/rotate-secret", admin_token))[0] == 404
    assert (await call(ingress, "POST", path, None))[0] == 401
    status, rotated = await call(ingress, "POST", path, admin_token, {"grace": 90})
    assert status == 200
    until = datetime.fromisoformat(rotated["previousSecretValidUntil"])
    assert abs((until - utcnow()).total_seconds() - 90) < 30
    record = await store.get_integration(integration_id)
    assert record is not None
    assert before is not None
    assert record.signing_secrets(utcnow()) == [rotated["signingSecret"], before.signing_secret]
    assert record.signing_secrets(utcnow() + timedelta(seconds=120)) == [record.signing_secret]


async def test_integrations_from_creation_to_deletion(
    ingress: Ingress, admin_token: str, receiver: Receiver, store: SqlStore
):
    url = receiver.url("admin-created")
    status, created = await call(
        ingress, "POST", "/integrations", admin_token, {"name": "shop", "responseUrl": url}
    )
    assert status == 201, created
    assert receiver.at("admin-created")[0].body == {"type": "test", "payload": "test"}
    assert created["enabled"] is True
    assert created["signingSecret"].startswith("whsec_")
    integration_id = created["id"]
    status, shown = await call(ingress, "GET", f"/integrations/{integration_id}", admin_token)
    assert (status, {**shown, "signingSecret": created["signingSecret"]}) == (200, created)

    # A new response URL is checked again: a failing endpoint is refused, nothing changes.
    failing = receiver.on("admin-failing", 500)
    status, refused = await call(
        ingress, "PATCH", f"/integrations/{integration_id}", admin_token, {"responseUrl": failing}
    )
    assert status == 422
    assert "answered 500" in refused["error"]["message"]
    moved = receiver.url("admin-moved")
    status, changed = await call(
        ingress, "PATCH", f"/integrations/{integration_id}", admin_token, {"responseUrl": moved}
    )
    assert (status, changed["responseUrl"]) == (200, moved)
    status, disabled = await call(
        ingress, "PATCH", f"/integrations/{integration_id}", admin_token, {"enabled": False}
    )
    assert (status, disabled["enabled"]) == (200, False)
    assert disabled["disabledAt"] is not None
    status, enabled = await call(
        ingress, "PATCH", f"/integrations/{integration_id}", admin_token, {"enabled": True}
    )
    assert (enabled["enabled"], enabled["disabledAt"]) == (True, None)

    # Tokens: made (shown once), listed without the token, revoked.
    status, made = await call(
        ingress, "POST", f"/integrations/{integration_id}/tokens", admin_token, {"kind": "bot"}
    )
    assert status == 201
    assert made["token"].startswith("rly_")
    assert made["kind"] == "bot"
    status, listed = await call(
        ingress, "GET", f"/integrations/{integration_id}/tokens", admin_token
    )
    assert [t["id"] for t in listed["items"]] == [made["id"]]
    assert "token" not in listed["items"][0]
    assert (await call(ingress, "DELETE", f"/tokens/{made['id']}", admin_token))[0] == 204
    assert (await call(ingress, "DELETE", f"/tokens/{made['id']}", admin_token))[0] == 404

    # A message goes in, then the integration goes with everything it holds.
    status, token = await call(
        ingress, "POST", f"/integrations/{integration_id}/tokens", admin_token, {}
    )
    posted, _ = await ingress.post(integration_id, token["token"], message("admin-1"))
    assert posted == 200
    assert (await call(ingress, "DELETE", f"/integrations/{integration_id}", admin_token))[0] == 204
    assert await store.get_integration(integration_id) is None
    assert await store.find_incoming(integration_id, "msg-admin-1") is None
    assert (await call(ingress, "GET", f"/integrations/{integration_id}", admin_token))[0] == 404


async def test_integrations_are_listed_in_pages(
    ingress: Ingress, admin_token: str, store: SqlStore, settings: Settings
):
    made = [(await make_integration(store, settings, name=f"page-{n}"))[0] for n in range(5)]
    seen: list[str] = []
    cursor = ""
    for _ in range(100):
        query = f"?limit=2&cursor={cursor}" if cursor else "?limit=2"
        status, page = await call(ingress, "GET", f"/integrations{query}", admin_token)
        assert status == 200
        assert len(page["items"]) <= 2
        seen += [item["id"] for item in page["items"]]
        cursor = page["nextCursor"]
        if cursor is None:
            break
    assert set(made) <= set(seen)
    assert len(seen) == len(set(seen))


async def test_bad_input_is_a_json_4xx_and_changes_nothing(
    ingress: Ingress, admin_token: str, store: SqlStore, settings: Settings
):
    integration_id, _ = await make_integration(store, settings, name="unchanged")
    before = await store.get_integration(integration_id)
    cases: list[tuple[str, str, Any, bytes | None, int]] = [
        ("POST", "/integrations", {"name": "x"}, None, 400),
        ("POST", "/integrations", {"name": "", "responseUrl": "http://127.0.0.1:9/"}, None, 400),
        ("POST", "/integrations", {"name": "x", "responseUrl": "ftp://x/"}, None, 400),
        ("POST", "/integrations", {"name": "x", "responseUrl": "http://10.0.0.1/"}, None, 422),
        ("POST", "/integrations", None, b"not json", 400),
        ("POST", "/integrations", {"name": "x", "responseUrl": "u", "extra": 1}, None, 400),
        ("PATCH", f"/integrations/{integration_id}", {"enabled": "yes"}, None, 400),
        ("PATCH", f"/integrations/{integration_id}", {"responseUrl": "ftp://x/"}, None, 400),
        ("POST", f"/integrations/{integration_id}/tokens", {"kind": "admin"}, None, 400),
        ("GET", "/integrations?limit=0", None, None, 400),
        ("GET", "/integrations/nope", None, None, 404),
        ("DELETE", "/tokens/nope", None, None, 404),
        ("PUT", f"/integrations/{integration_id}", {}, None, 405),
    ]
    for method, path, body, raw, expected in cases:
        status, answer = await call(ingress, method, path, admin_token, body, raw)
        assert status == expected, (method, path, answer)
        assert "error" in answer
    assert await store.get_integration(integration_id) == before
    # An empty patch changes nothing.
    status, same = await call(ingress, "PATCH", f"/integrations/{integration_id}", admin_token, {})
    assert (status, same["responseUrl"]) == (200, before.response_url if before else None)


async def test_queues_show_every_relay_queue(
    ingress: Ingress, admin_token: str, settings: Settings
):
    async def listed() -> Any:
        status, page = await call(ingress, "GET", "/queues", admin_token)
        assert status == 200
        return page

    page = await eventually(listed)
    names = {q["name"] for q in page["items"]}
    assert topology_of(settings).queue("inbound", 0) in names
    assert f"{settings.queue_prefix}.outbound.dead" in names
    first = page["items"][0]
    assert set(first) >= {"name", "stage", "kind", "ready", "consumers"}


async def test_queues_show_the_operations_queues_with_their_depth(
    admin_token: str, settings: Settings, amqp: AbstractRobustConnection
):
    # An ingress on a prefix of the test's own: the module's operations queue holds the
    # events of the module's other disables.
    own = settings.model_copy(update={"queue_prefix": f"{settings.queue_prefix}-ops"})
    topology = topology_of(own)
    queue, *delays = topology.operations_queues()
    try:
        async with start_ingress(own) as ingress, connected_broker(own) as broker:
            events = OperationsEvents(broker)
            for n in range(2):
                await events.publish(integration_disabled(f"i{n}", "operator", utcnow()))
            status, page = await call(ingress, "GET", "/queues", admin_token)
        assert status == 200
        found = {q["name"]: q for q in page["items"]}
        assert set(found) >= set(topology.queue_names())
        assert (found[queue]["stage"], found[queue]["kind"], found[queue]["ready"]) == (
            "operations",
            "operations",
            2,
        )
        assert delays
        assert [(found[d]["stage"], found[d]["kind"]) for d in delays] == [
            ("operations", "delay")
        ] * len(delays)
    finally:
        async with amqp.channel() as channel:
            await delete(channel, topology)


async def test_attempts_are_found_by_what_an_operator_knows(
    ingress: Ingress, admin_token: str, store: SqlStore
):
    integration = (await store.create_integration("att", "http://127.0.0.1:9/", "whsec_x")).id
    other = (await store.create_integration("att2", "http://127.0.0.1:9/", "whsec_x")).id
    now = utcnow()
    await store.record_attempts(
        [
            attempt_record("r1", integration_id=integration, status=500, created_at=now),
            attempt_record(
                "r1", integration_id=integration, attempt=1, created_at=now + timedelta(seconds=1)
            ),
            attempt_record(
                "r2", integration_id=integration, status=None, error="timeout", created_at=now
            ),
            attempt_record("r3", integration_id=other, created_at=now),
        ]
    )

    async def found(query: str) -> list[dict[str, Any]]:
        status, page = await call(ingress, "GET", f"/attempts?{query}", admin_token)
        assert status == 200, page
        items: list[dict[str, Any]] = page["items"]
        return items

    mine = await found(f"integrationId={integration}")
    assert (mine[0]["responseId"], mine[0]["attempt"]) == ("r1", 1)  # newest first
    assert len(mine) == 3
    assert [a["status"] for a in await found(f"integrationId={integration}&statusClass=5xx")] == [
        500
    ]
    assert [a["error"] for a in await found(f"integrationId={integration}&statusClass=error")] == [
        "timeout"
    ]
    failed = await found(f"integrationId={integration}&outcome=failed")
    assert {a["responseId"] for a in failed} == {"r1", "r2"}
    assert [a["attempt"] for a in await found("webhookId=msg_r1")] == [1, 0]
    later = (now + timedelta(milliseconds=500)).isoformat()
    assert len(await found(f"integrationId={integration}&since={later.replace('+', '%2B')}")) == 1
    # Pages of one, newest first, each once.
    seen, cursor = [], None
    for _ in range(10):
        query = f"integrationId={integration}&limit=1" + (f"&cursor={cursor}" if cursor else "")
        status, page = await call(ingress, "GET", f"/attempts?{query}", admin_token)
        seen += [a["id"] for a in page["items"]]
        cursor = page["nextCursor"]
        if cursor is None:
            break
    assert seen == [a["id"] for a in mine]
    for bad in ("statusClass=6xx", "outcome=maybe", "since=yesterday", "cursor=%%%", "limit=0"):
        status, answer = await call(ingress, "GET", f"/attempts?{bad}", admin_token)
        assert (status, answer["error"]["code"]) == (400, "invalid_query"), bad
