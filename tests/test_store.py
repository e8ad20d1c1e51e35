"""The store contract, run on SQLite and on PostgreSQL."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from datetime import timedelta

import asyncpg
import pytest

from relay.auth import hash_token
from relay.settings import Settings
from relay.store import (
    Accepted,
    ConversationRecord,
    SqlStore,
    StoreError,
    StoreUnavailable,
    TurnReplies,
    Vanished,
    open_store,
    schema,
)
from relay.store.postgres import translated
from relay.store.schema import MIGRATIONS_TEMPLATE, apply_migrations
from relay.wire import InboundRequest, utcnow
from tests.helpers import attempt_record, make_integration, message


def inbound(n: int | str = 1, **overrides: object) -> InboundRequest:
    return InboundRequest.model_validate(message(n, **overrides))


def replying(integration_id: str, accepted: Accepted) -> ConversationRecord:
    """The conversation an accepted message's replies go to."""
    bundle = accepted.bundle
    return ConversationRecord(
        id=bundle.conversation.id,
        integration_id=integration_id,
        external_id=bundle.conversation.tags.id,
        user_id=bundle.user.id,
    )


def lease(seconds: float = 30) -> object:
    return utcnow() + timedelta(seconds=seconds)


async def accepted_in_the_end(
    store: SqlStore, integration_id: str, request: InboundRequest
) -> Accepted:
    """Record as the acceptor does: an attempt that found what it relied on removed by a
    concurrent discard (`Vanished`) is made again."""
    for _ in range(5):
        outcome = await store.accept_incoming(integration_id, request, lease(), None)
        if isinstance(outcome, Accepted):
            return outcome
    raise AssertionError("every attempt vanished")


async def test_migrations_are_idempotent_and_versioned(store: SqlStore, database_url: str):
    again = await open_store(database_url)  # a second process starting on the same schema
    try:
        assert await apply_migrations(again.driver) == len(MIGRATIONS_TEMPLATE)
        async with again.driver.connection() as conn:
            rows = await conn.fetchall("SELECT version FROM schema_version ORDER BY version")
        assert [r["version"] for r in rows] == list(range(1, len(MIGRATIONS_TEMPLATE) + 1))
    finally:
        await again.close()


async def test_integrations_round_trip(store: SqlStore):
    created = await store.create_integration("shop", "https://example.test/hook", "whsec_abc")
    assert await store.get_integration(created.id) == created
    assert created in await store.list_integrations()
    assert await store.get_integration("missing") is None


async def test_tokens_are_stored_only_as_hashes(store: SqlStore):
    integration = await store.create_integration("t", "https://example.test/h", "whsec_x")
    token = "rly_secret-value-never-stored"
    record = await store.create_token(integration.id, "integration", hash_token(token), token[:8])
    async with store.driver.connection() as conn:
        rows = await conn.fetchall("SELECT * FROM tokens WHERE id = ?", record.id)
    assert rows
    assert token not in str(rows)
    assert rows[0]["token_hash"] == hash_token(token)
    assert await store.active_token_hashes(integration.id, "integration") == [hash_token(token)]
    assert await store.active_token_hashes(integration.id, "bot") == []


async def test_revoked_tokens_are_not_active(store: SqlStore):
    integration = await store.create_integration("t", "https://example.test/h", "whsec_x")
    record = await store.create_token(integration.id, "bot", hash_token("a"), "a")
    assert await store.revoke_token(record.id) is True
    assert await store.revoke_token(record.id) is False
    assert await store.active_token_hashes(integration.id, "bot") == []
    [listed] = await store.list_tokens(integration.id)
    assert listed.revoked_at is not None


async def test_accept_creates_user_conversation_and_message_once(
    store: SqlStore, settings: Settings
):
    integration_id, _ = await make_integration(store, settings)
    first = await store.accept_incoming(integration_id, inbound(1), lease(), "req-1")
    assert first.created
    assert first.created_user
    assert first.created_conversation
    assert first.state == "pending"
    bundle = first.bundle
    assert bundle.user.tags.id == "user-1"
    assert bundle.conversation.tags.id == "conv-1"
    assert bundle.message.tags.id == "msg-1"
    assert bundle.message.payload == {"text": "hello 1"}
    assert bundle.message.direction == "incoming"
    assert bundle.message.conversationId == bundle.conversation.id

    again = await store.accept_incoming(integration_id, inbound(1), lease(), "req-2")
    assert not again.created
    assert again.bundle == first.bundle

    second = await store.accept_incoming(integration_id, inbound(2), lease(), None)
    assert second.created
    assert not second.created_user
    assert not second.created_conversation
    assert second.bundle.user.id == bundle.user.id


async def test_message_ids_are_scoped_per_integration(store: SqlStore, settings: Settings):
    a, _ = await make_integration(store, settings)
    b, _ = await make_integration(store, settings)
    in_a = await store.accept_incoming(a, inbound(1), lease(), None)
    in_b = await store.accept_incoming(b, inbound(1), lease(), None)
    assert in_a.created
    assert in_b.created
    assert in_a.bundle.message.id != in_b.bundle.message.id
    assert in_a.bundle.user.id != in_b.bundle.user.id


async def test_concurrent_duplicates_create_exactly_one_message(
    store: SqlStore, settings: Settings
):
    integration_id, _ = await make_integration(store, settings)
    results = await asyncio.gather(
        *[store.accept_incoming(integration_id, inbound("same"), lease(), None) for _ in range(50)]
    )
    assert sum(r.created for r in results) == 1
    assert len({r.bundle.message.id for r in results}) == 1
    async with store.driver.connection() as conn:
        rows = await conn.fetchall(
            "SELECT id FROM messages WHERE integration_id = ?", integration_id
        )
        users = await conn.fetchall("SELECT id FROM users WHERE integration_id = ?", integration_id)
    assert len(rows) == 1
    assert len(users) == 1


async def test_mark_queued_settles_the_message(store: SqlStore, settings: Settings):
    integration_id, _ = await make_integration(store, settings)
    accepted = await store.accept_incoming(integration_id, inbound(1), lease(), None)
    await store.mark_queued([accepted.bundle.message.id])
    found = await store.find_incoming(integration_id, "msg-1")
    assert found is not None
    assert found.state == "queued"
    assert found.lease_until is None
    assert found.bundle == accepted.bundle


async def test_discard_removes_everything_the_request_created(store: SqlStore, settings: Settings):
    integration_id, _ = await make_integration(store, settings)
    accepted = await store.accept_incoming(integration_id, inbound(1), lease(), None)
    await store.discard_pending(accepted)
    assert await store.find_incoming(integration_id, "msg-1") is None
    async with store.driver.connection() as conn:
        for table in ("users", "conversations", "messages"):
            rows = await conn.fetchall(
                f"SELECT id FROM {table} WHERE integration_id = ?", integration_id
            )
            assert rows == [], table


async def test_discard_keeps_rows_that_other_messages_use(store: SqlStore, settings: Settings):
    integration_id, _ = await make_integration(store, settings)
    kept = await store.accept_incoming(integration_id, inbound(1), lease(), None)
    await store.mark_queued([kept.bundle.message.id])
    # A new conversation for the same user: only the conversation is this request's own.
    dropped = await store.accept_incoming(
        integration_id, inbound(2, conversationId="conv-2"), lease(), None
    )
    assert dropped.created_conversation
    assert not dropped.created_user
    await store.discard_pending(dropped)
    assert await store.find_incoming(integration_id, "msg-1") is not None
    async with store.driver.connection() as conn:
        convs = await conn.fetchall(
            "SELECT external_id FROM conversations WHERE integration_id = ?", integration_id
        )
    assert [c["external_id"] for c in convs] == ["conv-1"]


async def test_discard_never_removes_a_queued_message(store: SqlStore, settings: Settings):
    integration_id, _ = await make_integration(store, settings)
    accepted = await store.accept_incoming(integration_id, inbound(1), lease(), None)
    await store.mark_queued([accepted.bundle.message.id])
    await store.discard_pending(accepted)
    assert await store.find_incoming(integration_id, "msg-1") is not None


async def test_claims_only_pending_messages_whose_lease_expired(
    store: SqlStore, settings: Settings
):
    integration_id, _ = await make_integration(store, settings)
    live = await store.accept_incoming(integration_id, inbound(1), lease(30), None)
    stale = await store.accept_incoming(integration_id, inbound(2), lease(-1), "req-stale")
    done = await store.accept_incoming(integration_id, inbound(3), lease(-1), None)
    await store.mark_queued([done.bundle.message.id])
    now = utcnow()
    assert not await store.claim_pending(live.bundle.message.id, now, now + timedelta(60))

    claimed = await store.claim_stale_pending(now, now + timedelta(seconds=60), 100)
    mine = [c for c in claimed if c.integration_id == integration_id]
    assert [c.bundle.message.id for c in mine] == [stale.bundle.message.id]
    assert mine[0].request_id == "req-stale"
    assert mine[0].text == "hello 2"
    # The claim renewed the lease: nobody else takes it now.
    again = await store.claim_stale_pending(utcnow(), utcnow() + timedelta(seconds=60), 100)
    assert stale.bundle.message.id not in [c.bundle.message.id for c in again]


async def test_responses_waiting_to_be_published_are_not_taken_for_inbound_messages(
    store: SqlStore, settings: Settings
):
    # Both are "pending" until published; each outbox must take only its own direction.
    integration_id, _ = await make_integration(store, settings)
    accepted = await store.accept_incoming(integration_id, inbound(1), lease(), None)
    await store.mark_queued([accepted.bundle.message.id])
    [reply] = await store.record_replies(
        replying(integration_id, accepted), accepted.bundle.message.id, [("text", {"text": "hi"})]
    )
    now = utcnow()
    # The response outbox claimed it once, and that claim ran out.
    claimed = await store.claim_stale_outgoing(
        now + timedelta(seconds=1), now, now - timedelta(seconds=1), 100
    )
    assert reply.id in [r.id for r in claimed]
    inbound_claims = await store.claim_stale_pending(now, now + timedelta(seconds=60), 100)
    assert reply.id not in [c.bundle.message.id for c in inbound_claims]
    assert await store.claim_pending(reply.id, now, now + timedelta(seconds=60)) is None


async def test_undelivered_responses_are_those_no_attempt_finished(
    store: SqlStore, settings: Settings
):
    integration_id, _ = await make_integration(store, settings)
    accepted = await store.accept_incoming(integration_id, inbound("undelivered"), lease(), None)
    await store.mark_queued([accepted.bundle.message.id])
    replies = await store.record_replies(
        replying(integration_id, accepted),
        accepted.bundle.message.id,
        [("text", {"text": str(n)}) for n in range(6)],
    )
    now = utcnow()
    later = now + timedelta(seconds=30)

    async def attempt(index: int, status: int, next_at: object, seconds: float) -> None:
        reply = replies[index]
        record = attempt_record(
            reply.id,
            integration_id=integration_id,
            status=status,
            next_attempt_at=next_at,
            created_at=now + timedelta(seconds=seconds),
        )
        await store.record_attempts([record])

    await attempt(0, 200, None, 0)  # delivered
    await attempt(1, 503, now, 0)  # failed, then delivered: the last attempt counts
    await attempt(1, 200, None, 1)
    await attempt(2, 503, later, 0)  # waiting for its retry
    await attempt(3, 400, None, 0)  # dead-lettered
    # 4 and 5 were never tried
    conversation = accepted.bundle.conversation.id
    since = now - timedelta(hours=1)
    found = await store.undelivered(conversation, since)
    assert [(u.message_id, u.retry_at) for u in found] == [
        (replies[2].id, later),
        (replies[4].id, None),
        (replies[5].id, None),
    ]
    assert await store.undelivered(conversation, now + timedelta(hours=1)) == []
    await store.mark_dead(replies[4].id, now)  # dead-lettered before any attempt
    found = await store.undelivered(conversation, since)
    assert [u.message_id for u in found] == [replies[2].id, replies[5].id]


async def test_batches_beyond_a_statement_s_parameter_limit_are_written_whole(
    store: SqlStore, settings: Settings
):
    # 2,750 values: three statements on the 999 limit
    attempts = [attempt_record(f"many-{n}") for n in range(250)]
    await store.record_attempts(attempts)
    assert await store.list_attempts("msg_many-249") == [attempts[-1]]
    integration_id, _ = await make_integration(store, settings)
    accepted = await store.accept_incoming(integration_id, inbound("many"), lease(), None)
    ids = [f"unknown-{n}" for n in range(1500)] + [accepted.bundle.message.id]
    await store.mark_queued(ids)
    assert await store.inbound_state(accepted.bundle.message.id) == "queued"


async def test_a_value_the_database_refuses_is_a_store_error(store: SqlStore):
    attempt = attempt_record("nul", response_body="a\x00b")
    if store.driver.dialect == "postgresql":  # text cannot hold NUL there
        with pytest.raises(StoreError):
            await store.record_attempts([attempt])
    else:
        await store.record_attempts([attempt])
        assert await store.list_attempts("msg_nul") == [attempt]


async def test_unhandled_messages_are_the_queued_ones_no_turn_handled(
    store: SqlStore, settings: Settings
):
    integration_id, _ = await make_integration(store, settings)
    accepted = []
    for n in range(5):
        one = await store.accept_incoming(integration_id, inbound(f"unhandled-{n}"), lease(), None)
        if n != 3:  # 3 is still pending: its publish was never confirmed
            await store.mark_queued([one.bundle.message.id])
        accepted.append(one.bundle.message.id)
    conversation = one.bundle.conversation
    await store.record_replies(
        replying(integration_id, one), accepted[0], [("text", {"text": "handled"})]
    )
    retry_at = utcnow() + timedelta(seconds=30)
    await store.mark_retrying(accepted[1], retry_at)
    since = utcnow() - timedelta(hours=1)
    found = await store.unhandled(conversation.id, since)
    assert [(u.message_id, u.retry_at) for u in found] == [
        (accepted[1], retry_at),
        (accepted[2], None),
        (accepted[4], None),
    ]
    await store.mark_dead(accepted[1], utcnow())  # dead-lettered: no turn to come
    found = await store.unhandled(conversation.id, since)
    assert [u.message_id for u in found] == [accepted[2], accepted[4]]


async def test_only_the_lease_holder_may_discard(store: SqlStore, settings: Settings):
    integration_id, _ = await make_integration(store, settings)
    accepted = await store.accept_incoming(integration_id, inbound(1), lease(-1), None)
    now = utcnow()
    new_owner = await store.claim_pending(accepted.bundle.message.id, now, now + timedelta(60))
    assert new_owner is not None
    assert new_owner != accepted.lease_owner
    # the original writer's late discard must not remove what the new holder publishes
    assert await store.discard_pending(accepted) is False
    assert await store.find_incoming(integration_id, "msg-1") is not None
    assert await store.discard_pending(replace(accepted, lease_owner=new_owner)) is True
    assert await store.find_incoming(integration_id, "msg-1") is None


async def test_a_discard_never_takes_a_concurrent_message_along(
    store: SqlStore, settings: Settings
):
    """A failed first message of a new user, discarded while the user's next one commits."""
    integration_id, _ = await make_integration(store, settings)
    for round_ in range(15):
        user = f"user-{round_}"
        failed = await store.accept_incoming(
            integration_id, inbound(f"{round_}-a", userId=user), lease(), None
        )
        _, kept = await asyncio.gather(
            store.discard_pending(failed),
            accepted_in_the_end(
                store, integration_id, inbound(f"{round_}-b", userId=user, conversationId="other")
            ),
        )
        found = await store.find_incoming(integration_id, f"msg-{round_}-b")
        assert found is not None, round_
        assert found.bundle == kept.bundle
        assert await store.find_incoming(integration_id, f"msg-{round_}-a") is None


async def test_a_retry_racing_the_discard_of_its_first_attempt_answers_what_it_found(
    store: SqlStore, settings: Settings
):
    integration_id, _ = await make_integration(store, settings)
    for round_ in range(15):
        # Through the acceptor's retry: the last round's discard removed the conversation
        # this process remembers, which an attempt learns as `Vanished`.
        first = await accepted_in_the_end(store, integration_id, inbound(round_))
        again, _ = await asyncio.gather(
            store.accept_incoming(integration_id, inbound(round_), lease(), None),
            store.discard_pending(first),
        )
        found = await store.find_incoming(integration_id, f"msg-{round_}")
        if isinstance(again, Vanished):  # found the first attempt, then found it discarded
            assert found is None
        elif again.created:  # came after the discard: a new message of its own
            assert again.bundle.message.id != first.bundle.message.id
            assert found is not None
            assert found.bundle.message.id == again.bundle.message.id
        else:  # saw the first attempt, which was then discarded
            assert again.bundle.message.id == first.bundle.message.id
            assert found is None


async def test_a_newer_schema_is_refused(database_url: str):
    opened = await open_store(database_url)
    try:
        async with opened.driver.connection() as conn:
            await conn.execute("INSERT INTO schema_version (version) VALUES (?)", 999)
        with pytest.raises(RuntimeError, match="newer than this Relay"):
            await apply_migrations(opened.driver)
    finally:
        async with opened.driver.connection() as conn:
            await conn.execute("DELETE FROM schema_version WHERE version = ?", 999)
        await opened.close()


async def test_migrations_upgrade_an_older_schema(
    database_url: str, monkeypatch: pytest.MonkeyPatch
):
    v2 = "CREATE TABLE upgrade_probe (id TEXT PRIMARY KEY, seen {ts})"
    monkeypatch.setattr(schema, "MIGRATIONS_TEMPLATE", [*MIGRATIONS_TEMPLATE, v2])
    opened = await open_store(database_url)
    try:
        async with opened.driver.connection() as conn:
            await conn.execute("INSERT INTO upgrade_probe (id, seen) VALUES (?, ?)", "x", utcnow())
            rows = await conn.fetchall("SELECT version FROM schema_version ORDER BY version")
        assert [r["version"] for r in rows][-1] == len(MIGRATIONS_TEMPLATE) + 1
    finally:
        async with opened.driver.connection() as conn:
            await conn.execute("DROP TABLE upgrade_probe")
            await conn.execute(
                "DELETE FROM schema_version WHERE version = ?", len(MIGRATIONS_TEMPLATE) + 1
            )
        await opened.close()


async def test_the_bot_secret_is_made_once_even_on_concurrent_first_use(store: SqlStore):
    integration = await store.create_integration("b", "https://example.test/h", "whsec_x")
    secrets = await asyncio.gather(*[store.bot_secret(integration.id) for _ in range(10)])
    assert len(set(secrets)) == 1
    assert await store.bot_secret(integration.id) == secrets[0]
    with pytest.raises(StoreError):
        await store.bot_secret("no-such-integration")


@pytest.mark.parametrize(
    "raised",
    [
        # What asyncpg raised while the pool released a connection broken by a restart.
        asyncpg.InternalClientError("cannot switch to state 15; another operation is in progress"),
        asyncpg.ConnectionDoesNotExistError("connection was closed in the middle of operation"),
        asyncpg.AdminShutdownError("terminating connection due to administrator command"),
        asyncpg.InterfaceError("cannot perform operation: another operation is in progress"),
        ConnectionResetError("reset by peer"),
    ],
)
async def test_every_postgresql_failure_is_the_store_being_unavailable(raised: Exception):
    with pytest.raises(StoreUnavailable):
        async with translated():
            raise raised


async def test_a_value_postgresql_refuses_is_a_store_error_not_unavailability():
    with pytest.raises(StoreError) as caught:
        async with translated():
            raise asyncpg.UntranslatableCharacterError("unsupported Unicode escape sequence")
    assert not isinstance(caught.value, StoreUnavailable)


async def test_replies_are_recorded_once_and_read_back_as_they_were_returned(
    store: SqlStore, settings: Settings
):
    integration_id, _ = await make_integration(store, settings)
    accepted = await store.accept_incoming(integration_id, inbound("once"), lease(), None)
    target, message_id = replying(integration_id, accepted), accepted.bundle.message.id
    replies = [("typing", {"value": True}), ("text", {"text": "hi"})]
    first = await store.record_replies(target, message_id, replies)
    assert [(r.type, r.payload, r.sequence) for r in first] == [
        ("typing", {"value": True}, 1),
        ("text", {"text": "hi"}, 2),
    ]
    assert await store.inbound_state(message_id) == "handled"
    # A redelivered turn gets what was stored, whatever it would answer now.
    again = await store.record_replies(target, message_id, [("text", {"text": "other"})])
    assert again == first
    # The next turn in the conversation numbers on.
    later = await store.accept_incoming(integration_id, inbound("later"), lease(), None)
    [next_reply] = await store.record_replies(
        target, later.bundle.message.id, [("text", {"text": "next"})]
    )
    assert next_reply.sequence == 3


async def test_turns_of_several_conversations_are_recorded_together(
    store: SqlStore, settings: Settings
):
    # The bot worker's lanes that finish together: one transaction, each turn numbered in
    # its own conversation, a turn handled before answered with what it stored then.
    integration_id, _ = await make_integration(store, settings)
    turns = []
    for name in ("a", "b", "c"):
        accepted = await store.accept_incoming(
            integration_id,
            inbound(f"together-{name}", conversationId=f"together-{name}"),
            lease(),
            None,
        )
        assert isinstance(accepted, Accepted)
        turns.append((replying(integration_id, accepted), accepted.bundle.message.id))
    (a, a_id), (b, b_id), (c, c_id) = turns
    before = await store.record_replies(b, b_id, [("text", {"text": "stored first"})])
    recorded = await store.record_turns(
        [
            TurnReplies(a, a_id, [("typing", {"value": True}), ("text", {"text": "a"})], 8),
            TurnReplies(b, b_id, [("text", {"text": "not stored"})], 8),
            TurnReplies(c, c_id, [], 8),
        ]
    )
    assert [[(r.payload, r.sequence) for r in records] for records in recorded] == [
        [({"value": True}, 1), ({"text": "a"}, 2)],
        [({"text": "stored first"}, 1)],
        [],
    ]
    assert recorded[1] == before
    assert {await store.inbound_state(id_) for id_ in (a_id, b_id, c_id)} == {"handled"}


async def test_turns_of_one_conversation_in_a_batch_are_numbered_in_turn(
    store: SqlStore, settings: Settings
):
    # Not what a lane makes (one turn of its conversation at a time), but a batch that has
    # it is still written whole, each turn's replies after the one before.
    integration_id, _ = await make_integration(store, settings)
    turns = []
    for n in (1, 2):
        accepted = await store.accept_incoming(
            integration_id, inbound(f"same-{n}", conversationId="same"), lease(), None
        )
        assert isinstance(accepted, Accepted)
        turns.append((replying(integration_id, accepted), accepted.bundle.message.id))
    (first, first_id), (second, second_id) = turns
    recorded = await store.record_turns(
        [
            TurnReplies(first, first_id, [("text", {"text": "1a"}), ("text", {"text": "1b"})], 8),
            TurnReplies(second, second_id, [("text", {"text": "2a"})], 8),
        ]
    )
    assert [[(r.payload["text"], r.sequence) for r in records] for records in recorded] == [
        [("1a", 1), ("1b", 2)],
        [("2a", 3)],
    ]


async def test_a_batch_with_a_turn_never_accepted_raises_and_the_rest_stand(
    store: SqlStore, settings: Settings
):
    integration_id, _ = await make_integration(store, settings)
    kept = await store.accept_incoming(integration_id, inbound("batch-kept"), lease(), None)
    gone = await store.accept_incoming(
        integration_id, inbound("batch-gone", conversationId="batch-gone"), lease(), None
    )
    assert isinstance(kept, Accepted)
    assert isinstance(gone, Accepted)
    assert await store.discard_pending(gone)
    kept_turn = TurnReplies(
        replying(integration_id, kept), kept.bundle.message.id, [("text", {"text": "k"})], 8
    )
    gone_turn = TurnReplies(replying(integration_id, gone), gone.bundle.message.id, [], 8)
    with pytest.raises(StoreError):
        await store.record_turns([kept_turn, gone_turn])
    # Asked again alone (as the bot worker's group write does), the stored turn is answered.
    [records] = await store.record_turns([kept_turn])
    assert [(r.payload, r.sequence) for r in records] == [({"text": "k"}, 1)]


async def test_a_turn_without_replies_still_marks_its_message_handled(
    store: SqlStore, settings: Settings
):
    integration_id, _ = await make_integration(store, settings)
    accepted = await store.accept_incoming(integration_id, inbound("silent"), lease(), None)
    target, message_id = replying(integration_id, accepted), accepted.bundle.message.id
    assert await store.record_replies(target, message_id, []) == []
    assert await store.inbound_state(message_id) == "handled"
    assert await store.record_replies(target, message_id, [("text", {"text": "x"})]) == []


async def test_a_turn_on_a_message_never_accepted_is_a_store_error(
    store: SqlStore, settings: Settings
):
    integration_id, _ = await make_integration(store, settings)
    accepted = await store.accept_incoming(integration_id, inbound("gone"), lease(), None)
    assert await store.discard_pending(accepted)
    with pytest.raises(StoreError):
        await store.record_replies(
            replying(integration_id, accepted), accepted.bundle.message.id, [("text", {})]
        )


async def test_a_message_handled_while_pending_is_neither_discarded_nor_republished(
    store: SqlStore, settings: Settings
):
    # The bot worker may take a message before its ingress marks it queued; once handled,
    # it is accepted for good, whatever becomes of the ingress's publish.
    integration_id, _ = await make_integration(store, settings)
    accepted = await store.accept_incoming(integration_id, inbound("early"), lease(0), None)
    await store.record_replies(
        replying(integration_id, accepted), accepted.bundle.message.id, [("text", {})]
    )
    assert await store.discard_pending(accepted) is False
    now = utcnow()
    claimed = await store.claim_stale_pending(now, now + timedelta(seconds=60), 100)
    assert accepted.bundle.message.id not in [c.bundle.message.id for c in claimed]
    found = await store.find_incoming(integration_id, "msg-early")
    assert found is not None
    assert found.state == "queued"


async def test_a_remembered_conversation_removed_meanwhile_is_made_again(
    store: SqlStore, settings: Settings, database_url: str
):
    # Another process discarded the first message of a conversation this one remembers.
    integration_id, _ = await make_integration(store, settings)
    first = await store.accept_incoming(
        integration_id, inbound(1, conversationId="conv-x", userId="user-x"), lease(), None
    )
    other = await open_store(database_url)
    try:
        assert await other.discard_pending(first)
    finally:
        await other.close()
    request = inbound(2, conversationId="conv-x", userId="user-x")
    # The attempt finds them gone and forgets them (nothing written); the next makes them.
    assert isinstance(await store.accept_incoming(integration_id, request, lease(), None), Vanished)
    second = await store.accept_incoming(integration_id, request, lease(), None)
    assert isinstance(second, Accepted)
    assert second.created
    assert second.created_conversation
    assert second.bundle.conversation.id != first.bundle.conversation.id
    found = await store.find_incoming(integration_id, "msg-2")
    assert found is not None
    assert found.bundle == second.bundle


async def test_concurrent_messages_of_a_known_conversation_are_each_written_once(
    store: SqlStore, settings: Settings
):
    # Written together in batches: each request still learns whether its message is new.
    integration_id, _ = await make_integration(store, settings)
    await store.accept_incoming(integration_id, inbound("known"), lease(), None)
    requests = [inbound(f"batch-{n % 30}") for n in range(60)] + [inbound("known")]
    results = await asyncio.gather(
        *[store.accept_incoming(integration_id, r, lease(), None) for r in requests]
    )
    assert sum(r.created for r in results) == 30
    by_message: dict[str, set[str]] = {}
    for request, result in zip(requests, results, strict=True):
        assert result.bundle.message.tags.id == request.messageId
        by_message.setdefault(request.messageId, set()).add(result.bundle.message.id)
    assert all(len(ids) == 1 for ids in by_message.values())
    async with store.driver.connection() as conn:
        rows = await conn.fetchall(
            "SELECT external_id FROM messages WHERE integration_id = ?", integration_id
        )
    assert sorted(r["external_id"] for r in rows) == sorted(by_message)


async def test_messages_of_new_conversations_join_one_batch_with_known_ones(
    store: SqlStore, settings: Settings
):
    # One path: a conversation seen for the first time is made, then its message is written
    # with the others of the moment, in one statement.
    integration_id, _ = await make_integration(store, settings)
    await store.accept_incoming(integration_id, inbound("known"), lease(), None)
    sizes: list[int] = []
    group = store._new_messages
    write = group._write

    async def spied(batch):  # type: ignore[no-untyped-def]
        sizes.append(len(batch))
        await write(batch)

    group._write = spied
    requests = [inbound(f"new-{n}", conversationId=f"new-{n}") for n in range(10)]
    requests += [inbound(f"known-{n}") for n in range(10)]
    results = await asyncio.gather(
        *[store.accept_incoming(integration_id, r, lease(), None) for r in requests]
    )
    assert all(isinstance(r, Accepted) and r.created for r in results)
    assert sum(sizes) == 20
    assert max(sizes) > 1


async def test_a_messageid_found_there_keeps_nothing_made_for_it(
    store: SqlStore, settings: Settings
):
    # The messageId was used before, in another conversation: the conversation and user
    # this attempt made for it are removed again, as a rolled-back transaction would.
    integration_id, _ = await make_integration(store, settings)
    first = await store.accept_incoming(integration_id, inbound(1), lease(), None)
    again = await store.accept_incoming(
        integration_id, inbound(1, conversationId="elsewhere", userId="someone"), lease(), None
    )
    assert isinstance(first, Accepted)
    assert isinstance(again, Accepted)
    assert not again.created
    assert again.bundle == first.bundle
    async with store.driver.connection() as conn:
        convs = await conn.fetchall(
            "SELECT external_id FROM conversations WHERE integration_id = ?", integration_id
        )
        users = await conn.fetchall(
            "SELECT external_id FROM users WHERE integration_id = ?", integration_id
        )
    assert [c["external_id"] for c in convs] == ["conv-1"]
    assert [u["external_id"] for u in users] == ["user-1"]
