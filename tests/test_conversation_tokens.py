"""Conversation tokens (Direct Line's model) on both stores, through a real ingress and broker:
minted with the integration token, a `converse` token posts its own user's messages to its
own conversation and reads that conversation's history and events, a `read` token only
reads; anything else is a 401 (another conversation, another user, the integration's stream,
minting, the admin API, the push API). Revoked by conversation or by id, expired, pruned;
stored as a hash; never logged. The chat page's use of one, in Chromium:
tests/test_chat_page.py."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from typing import Any

import pytest
import structlog
from structlog.testing import capture_logs

from relay import admin
from relay.auth import CONVERSE_PREFIX, READ_PREFIX, hash_token, new_conversation_token
from relay.settings import Settings
from relay.store import ConversationGrant, SqlStore
from relay.wire import utcnow
from tests.helpers import Ingress, eventually, make_integration, message, start_ingress
from tests.sse import open_stream
from tests.test_cli import relay

Integration = tuple[str, str]
CUTOFF_DAYS = 30


@pytest.fixture(scope="module")
async def ingress(settings: Settings) -> AsyncIterator[Ingress]:
    # Many 401s on purpose: no budget of failed authentications per client here. Streams
    # check their token again every keep-alive: a short one.
    update = {"auth_failure_rate": 0, "stream_keepalive": 0.5}
    async with start_ingress(settings.model_copy(update=update)) as running:
        yield running


@pytest.fixture(scope="module")
async def integration(store: SqlStore, settings: Settings) -> Integration:
    return await make_integration(store, settings)


def conversation() -> str:
    return f"conv-{uuid.uuid4().hex[:8]}"


def bearer(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


async def call(
    ingress: Ingress, method: str, path: str, token: str | None = None, body: Any = None
) -> tuple[int, Any]:
    """(status, JSON answer; None for an empty one)."""
    async with ingress.http.request(
        method, f"{ingress.url}{path}", json=body, headers=bearer(token)
    ) as answer:
        text = await answer.text()
        return answer.status, (await answer.json() if text else None)


def tokens_path(integration: Integration, conv: str) -> str:
    return f"/webhooks/{integration[0]}/conversations/{conv}/tokens"


def messages_path(integration: Integration, conv: str, query: str = "") -> str:
    return f"/webhooks/{integration[0]}/conversations/{conv}/messages{query}"


async def mint(
    ingress: Ingress, integration: Integration, conv: str, **body: Any
) -> dict[str, Any]:
    status, answer = await call(
        ingress, "POST", tokens_path(integration, conv), integration[1], {"userId": "u1", **body}
    )
    assert status == 201, answer
    assert set(answer) == {"id", "token", "expiresAt"}
    return dict(answer)


async def send(
    ingress: Ingress, integration_id: str, token: str, conv: str, user: str = "u1"
) -> tuple[int, Any]:
    body = message(uuid.uuid4().hex, conversationId=conv, userId=user)
    return await call(ingress, "POST", f"/webhooks/{integration_id}", token, body)


async def token_rows(store: SqlStore) -> list[dict[str, Any]]:
    async with store.driver.connection() as conn:
        return await conn.fetchall("SELECT * FROM conversation_tokens ORDER BY created_at")


def grant(integration_id: str, conv: str, expires_at: datetime, **more: Any) -> ConversationGrant:
    fields = {"user_id": "u1", "scope": "converse", **more}
    return ConversationGrant(integration_id, conv, expires_at=expires_at, **fields)


# -- the store -------------------------------------------------------------------------------


async def test_the_store_finds_a_token_by_its_hash_and_revokes_by_conversation_or_id(
    store: SqlStore, integration: Integration
):
    conv, other = conversation(), conversation()
    later = utcnow() + timedelta(hours=1)
    made = []
    for where in (conv, conv, other):
        token = new_conversation_token("converse")
        record = await store.create_conversation_token(
            grant(integration[0], where, later), hash_token(token), token[:8]
        )
        made.append((token, record))
    (first, one), (second, two), (third, three) = made
    found = await store.find_conversation_token(hash_token(first))
    assert found == one
    assert found.grant == grant(integration[0], conv, later)
    assert found.live(utcnow())
    assert not found.live(later)
    assert await store.find_conversation_token(hash_token("rlyc_nope")) is None
    # One by id (only in its own conversation), then the rest of the conversation.
    assert await store.revoke_conversation_tokens(integration[0], other, one.id) == 0
    assert await store.revoke_conversation_tokens(integration[0], conv, one.id) == 1
    assert await store.revoke_conversation_tokens(integration[0], conv, one.id) == 0
    assert await store.revoke_conversation_tokens(integration[0], conv) == 1
    assert await store.revoke_conversation_tokens(integration[0], conv) == 0
    for token, live in ((first, False), (second, False), (third, True)):
        record = await store.find_conversation_token(hash_token(token))
        assert record is not None
        assert record.live(utcnow()) is live
    # Only hashes are stored.
    rows = [row for row in await token_rows(store) if row["id"] in {one.id, two.id, three.id}]
    assert {row["token_hash"] for row in rows} == {
        hashlib.sha256(token.encode()).hexdigest() for token in (first, second, third)
    }
    assert not [row for row in rows for token in (first, second, third) if token in str(row)]


async def test_retention_deletes_tokens_expired_or_revoked_before_the_cutoff(
    store: SqlStore, integration: Integration
):
    now, conv = utcnow(), conversation()
    old = now - timedelta(days=CUTOFF_DAYS + 1)
    kept_live, kept_recent, gone_expired, gone_revoked = [
        await store.create_conversation_token(
            grant(integration[0], conv, expires), hash_token(str(uuid.uuid4())), "rlyc_abc"
        )
        for expires in (now + timedelta(hours=1), now - timedelta(days=1), old, old)
    ]
    async with store.driver.connection() as conn:
        await conn.execute(
            "UPDATE conversation_tokens SET revoked_at = ?, expires_at = ? WHERE id = ?",
            old,
            now + timedelta(hours=1),
            gone_revoked.id,
        )
    pruned = await store.prune(now - timedelta(days=CUTOFF_DAYS), 1, _always)
    assert pruned.counts["conversation_tokens"] == 2
    left = {row["id"] for row in await token_rows(store)}
    assert {kept_live.id, kept_recent.id} <= left
    assert not {gone_expired.id, gone_revoked.id} & left


async def _always() -> bool:
    return True


# -- minting ---------------------------------------------------------------------------------


async def test_a_token_is_minted_with_the_integration_token_and_stored_as_a_hash(
    ingress: Ingress, store: SqlStore, integration: Integration
):
    conv = conversation()
    before = utcnow()
    converse = await mint(ingress, integration, conv, scope="converse", expiresIn=60)
    assert converse["token"].startswith(CONVERSE_PREFIX)
    expires = datetime.fromisoformat(converse["expiresAt"].replace("Z", "+00:00"))
    assert before + timedelta(seconds=59) < expires <= utcnow() + timedelta(seconds=60)
    # A read token needs a conversation with a message; by default it lives an hour.
    status, answer = await call(
        ingress, "POST", tokens_path(integration, conv), integration[1], {"userId": "u1"}
    )
    assert (status, answer["error"]["code"]) == (404, "not_found")
    assert (await send(ingress, integration[0], integration[1], conv))[0] == 200
    read = await mint(ingress, integration, conv)
    assert read["token"].startswith(READ_PREFIX)
    expires = datetime.fromisoformat(read["expiresAt"].replace("Z", "+00:00"))
    assert abs(expires - (utcnow() + timedelta(hours=1))) < timedelta(seconds=10)
    # The longest; written with a fraction, as JSON Schema allows an integer to be.
    assert (await mint(ingress, integration, conv, expiresIn=86400.0))["token"]
    rows = {row["id"]: row for row in await token_rows(store)}
    row = rows[converse["id"]]
    assert row["token_hash"] == hash_token(converse["token"])
    assert (row["conversation_external_id"], row["user_external_id"], row["scope"]) == (
        conv,
        "u1",
        "converse",
    )
    assert row["prefix"] == converse["token"][:8]
    assert not [r for r in rows.values() if converse["token"] in str(r) or read["token"] in str(r)]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "userId"),
        ({"userId": ""}, "userId"),
        ({"userId": 7}, "userId"),
        ({"userId": "x" * 257}, "userId"),
        ({"userId": "a\u0000b"}, "userId"),
        ({"userId": "u", "scope": "write"}, "scope"),
        ({"userId": "u", "expiresIn": 59}, "expiresIn"),
        ({"userId": "u", "expiresIn": 86401}, "expiresIn"),
        ({"userId": "u", "expiresIn": 600.5}, "expiresIn"),
        ({"userId": "u", "expiresIn": "600"}, "expiresIn"),
        ({"userId": "u", "expiresIn": True}, "expiresIn"),
        ({"userId": "u", "user": "typo"}, "user"),
    ],
)
async def test_a_bad_body_is_a_400_naming_the_field_and_mints_nothing(
    ingress: Ingress, store: SqlStore, integration: Integration, body: Any, field: str
):
    before = len(await token_rows(store))
    status, answer = await call(
        ingress, "POST", tokens_path(integration, conversation()), integration[1], body
    )
    assert status == 400, answer
    assert answer["error"]["code"] == "invalid_body"
    assert field in [detail["field"] for detail in answer["error"]["details"]], answer
    assert len(await token_rows(store)) == before


async def test_only_an_integration_token_of_the_integration_mints_or_revokes(
    ingress: Ingress, store: SqlStore, settings: Settings, integration: Integration
):
    conv = conversation()
    converse = (await mint(ingress, integration, conv, scope="converse"))["token"]
    other = await make_integration(store, settings, name="other")
    bot, _ = await admin.create_token(store, integration[0], "bot")
    path = tokens_path(integration, conv)
    for token in (None, converse, other[1], bot, "rly_wrong"):
        assert (await call(ingress, "POST", path, token, {"userId": "u1"}))[0] == 401
        assert (await call(ingress, "DELETE", path, token))[0] == 401
        assert (await call(ingress, "DELETE", f"{path}/ctk_x", token))[0] == 401
    assert (await call(ingress, "POST", f"/webhooks/nope/conversations/{conv}/tokens"))[0] == 404


# -- what a token may do, and nothing else ------------------------------------------------------


async def test_a_converse_token_posts_its_users_messages_and_reads_its_conversation(
    ingress: Ingress, integration: Integration
):
    conv = conversation()
    token = (await mint(ingress, integration, conv, scope="converse"))["token"]
    # Minted before the conversation exists: nothing to read yet, the first message starts it.
    assert (await call(ingress, "GET", messages_path(integration, conv), token))[0] == 404
    status, bundle = await send(ingress, integration[0], token, conv)
    assert status == 200, bundle
    assert (bundle["conversation"]["tags"]["id"], bundle["user"]["tags"]["id"]) == (conv, "u1")
    assert (await send(ingress, integration[0], token, conv))[0] == 200
    status, read = await call(ingress, "GET", messages_path(integration, conv), token)
    assert status == 200
    assert [item["direction"] for item in read["messages"]] == ["incoming", "incoming"]
    query = f"?token={token}"
    assert (await call(ingress, "GET", messages_path(integration, conv, query)))[0] == 200
    url = f"{ingress.url}/webhooks/{integration[0]}/conversations/{conv}/events{query}"
    async with open_stream(ingress.http, url) as stream:
        assert [e.item["conversationId"] for e in await stream.take(2)] == [conv, conv]


async def test_a_token_is_refused_anywhere_else(
    ingress: Ingress, store: SqlStore, settings: Settings, integration: Integration
):
    conv, other_conv = conversation(), conversation()
    assert (await send(ingress, integration[0], integration[1], other_conv))[0] == 200
    converse = (await mint(ingress, integration, conv, scope="converse"))["token"]
    assert (await send(ingress, integration[0], converse, conv))[0] == 200
    read = (await mint(ingress, integration, conv))["token"]
    other = await make_integration(store, settings, name="stranger")
    admin_token, _ = await admin.create_token(store, None, "admin")
    bundle = (await send(ingress, integration[0], integration[1], conv, user="u2"))[1]
    relay_conversation = bundle["conversation"]["id"]
    before = (await call(ingress, "GET", messages_path(integration, conv), integration[1]))[1]
    for token in (converse, read):
        refused = [
            # another conversation, another user, another integration
            await send(ingress, integration[0], token, other_conv),
            await send(ingress, integration[0], token, conv, user="u2"),
            await send(ingress, other[0], token, conv),
            await call(ingress, "GET", messages_path(integration, other_conv), token),
            await call(ingress, "GET", messages_path(integration, other_conv, f"?token={token}")),
            await call(ingress, "GET", messages_path(other, conv), token),
            # the integration's stream, the admin API, the bot's push API
            await call(ingress, "GET", f"/webhooks/{integration[0]}/events", token),
            await call(ingress, "GET", f"/webhooks/{integration[0]}/events?token={token}"),
            await call(ingress, "GET", "/admin/v1/queues", token),
            await call(ingress, "GET", f"/admin/v1/integrations/{integration[0]}", token),
            await call(
                ingress,
                "POST",
                f"/bot/conversations/{relay_conversation}/messages",
                token,
                {"type": "text", "payload": {"text": "hi"}},
            ),
        ]
        assert [status for status, _ in refused] == [401] * len(refused), refused
        assert {answer["error"]["code"] for _, answer in refused} == {"unauthorized"}
    # A read token never posts; no token goes in the query of a POST.
    assert (await send(ingress, integration[0], read, conv))[0] == 401
    query = f"/webhooks/{integration[0]}?token={converse}"
    assert (await call(ingress, "POST", query, None, message("q", conversationId=conv)))[0] == 401
    # The refused posts wrote nothing; the admin API still answers its own token.
    after = (await call(ingress, "GET", messages_path(integration, conv), integration[1]))[1]
    assert after["messages"] == before["messages"]
    assert (await call(ingress, "GET", "/admin/v1/queues", admin_token))[0] == 200


async def test_revoked_by_id_or_by_conversation_and_refused_from_the_next_request(
    ingress: Ingress, integration: Integration
):
    conv, other_conv = conversation(), conversation()
    one, two = [await mint(ingress, integration, conv, scope="converse") for _ in range(2)]
    elsewhere = await mint(ingress, integration, other_conv, scope="converse")
    for token, where in ((one, conv), (two, conv), (elsewhere, other_conv)):
        assert (await send(ingress, integration[0], token["token"], where))[0] == 200
    path = tokens_path(integration, conv)
    # One, by its id: only in its own conversation, and once.
    elsewhere_path = f"{tokens_path(integration, other_conv)}/{one['id']}"
    assert (await call(ingress, "DELETE", elsewhere_path, integration[1]))[0] == 404
    assert (await call(ingress, "DELETE", f"{path}/{one['id']}", integration[1]))[0] == 204
    assert (await call(ingress, "DELETE", f"{path}/{one['id']}", integration[1]))[0] == 404
    assert (await send(ingress, integration[0], one["token"], conv))[0] == 401
    assert (await send(ingress, integration[0], two["token"], conv))[0] == 200
    # Every token of the conversation; another conversation's stay.
    assert (await call(ingress, "DELETE", path, integration[1]))[0] == 204
    assert (await send(ingress, integration[0], two["token"], conv))[0] == 401
    assert (await call(ingress, "GET", messages_path(integration, conv), two["token"]))[0] == 401
    assert (await send(ingress, integration[0], elsewhere["token"], other_conv))[0] == 200
    # Nothing left to revoke is no error.
    assert (await call(ingress, "DELETE", path, integration[1]))[0] == 204
    assert (await call(ingress, "DELETE", tokens_path(integration, "never"), integration[1]))[
        0
    ] == 204


async def test_an_open_stream_ends_once_its_token_is_revoked(
    ingress: Ingress, integration: Integration
):
    conv = conversation()
    token = (await mint(ingress, integration, conv, scope="converse"))["token"]
    assert (await send(ingress, integration[0], token, conv))[0] == 200
    events = f"{ingress.url}/webhooks/{integration[0]}/conversations/{conv}/events"
    async with (
        open_stream(ingress.http, f"{events}?token={token}") as revocable,
        open_stream(ingress.http, events, bearer(integration[1])) as kept,
    ):
        assert len(await revocable.take(1)) == len(await kept.take(1)) == 1
        path = tokens_path(integration, conv)
        assert (await call(ingress, "DELETE", path, integration[1]))[0] == 204
        assert await revocable.ended(timeout=5)
        # The integration token's stream goes on past a keep-alive (its token is not revoked).
        assert not await kept.ended(timeout=1.5)


async def test_a_token_is_refused_once_expired(
    ingress: Ingress, store: SqlStore, integration: Integration
):
    # Made in the store, past the minimum a mint allows: expiry is what is tested here.
    conv = conversation()
    token = new_conversation_token("converse")
    expires = utcnow() + timedelta(seconds=1.5)
    await store.create_conversation_token(
        grant(integration[0], conv, expires), hash_token(token), token[:8]
    )
    assert (await send(ingress, integration[0], token, conv))[0] == 200

    async def refused() -> bool:
        return (await send(ingress, integration[0], token, conv))[0] == 401

    await eventually(refused, timeout=10, interval=0.2)
    assert utcnow() >= expires
    assert (await call(ingress, "GET", messages_path(integration, conv), token))[0] == 401


async def test_no_log_line_holds_a_token(ingress: Ingress, integration: Integration):
    conv = conversation()
    with capture_logs(processors=[structlog.contextvars.merge_contextvars]) as logs:
        minted = await mint(ingress, integration, conv, scope="converse")
        token = minted["token"]
        assert (await send(ingress, integration[0], token, conv))[0] == 200
        assert (await send(ingress, integration[0], token, conv, user="u2"))[0] == 401
        assert (await call(ingress, "GET", messages_path(integration, conv, f"?token={token}")))[
            0
        ] == 200
        assert (await call(ingress, "GET", f"/webhooks/{integration[0]}/events?token={token}"))[
            0
        ] == 401
        assert (await call(ingress, "DELETE", tokens_path(integration, conv), integration[1]))[
            0
        ] == 204
        assert (await send(ingress, integration[0], token, conv))[0] == 401
    assert logs, "the requests were logged"
    assert token not in repr(logs)
    assert token.split("_", 1)[1] not in repr(logs)
    # What is logged is the token's id, which is no secret.
    assert minted["id"] in {line.get("conversation_token_id") for line in logs}


async def test_the_cli_mints_a_token_for_the_chat_page(
    ingress: Ingress, settings: Settings, integration: Integration
):
    conv = conversation()
    run = await relay(
        settings,
        "tokens",
        "conversation",
        "--integration",
        integration[0],
        "--conversation",
        conv,
        "--user",
        "u1",
        "--scope",
        "converse",
        "--expires-in",
        "86400",
    )
    assert run.code == 0, run.err
    token = run.out.strip()
    assert token.startswith(CONVERSE_PREFIX)
    assert token not in run.err
    assert (await send(ingress, integration[0], token, conv))[0] == 200
