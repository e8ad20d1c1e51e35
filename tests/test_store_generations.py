"""The partition count each conversation is published under, run on SQLite and PostgreSQL:
a conversation moves to a publisher's count only when nothing of it is unfinished in the
stage (`relay/store/sql/generations.py`)."""

from __future__ import annotations

from datetime import timedelta

from relay.settings import Settings
from relay.store import SqlStore
from relay.wire import utcnow
from tests.helpers import attempt_record, make_integration
from tests.test_store import inbound, lease, replying


async def test_a_conversation_stays_on_its_count_while_a_message_is_unfinished(
    store: SqlStore, settings: Settings
):
    integration_id, _ = await make_integration(store, settings)
    first = await store.accept_incoming(
        integration_id, inbound(1, conversationId="c-stay"), lease(), None, 8
    )
    assert first.created
    assert first.partitions == 8  # a new conversation takes the publisher's count
    # A publisher with 16 partitions: the first message is not handled yet, so the second
    # goes where the first went, behind it.
    second = await store.accept_incoming(
        integration_id, inbound(2, conversationId="c-stay"), lease(), None, 16
    )
    assert second.partitions == 8
    # Once both are handled, the next message moves the conversation to 16.
    conversation = replying(integration_id, first)
    for accepted in (first, second):
        await store.record_replies(conversation, accepted.bundle.message.id, [], 8)
    third = await store.accept_incoming(
        integration_id, inbound(3, conversationId="c-stay"), lease(), None, 16
    )
    assert third.partitions == 16
    # The same messageId again: answered with the count it went under.
    again = await store.accept_incoming(
        integration_id, inbound(3, conversationId="c-stay"), lease(), None, 8
    )
    assert not again.created
    assert again.partitions == 16
    # And a publisher with 8 partitions now finds it under 16 (the third is unfinished).
    fourth = await store.accept_incoming(
        integration_id, inbound(4, conversationId="c-stay"), lease(), None, 8
    )
    assert fourth.partitions == 16


async def test_a_remembered_conversation_is_moved_once_drained(store: SqlStore, settings: Settings):
    # The batched path (user and conversation remembered by this store) moves it as well.
    integration_id, _ = await make_integration(store, settings)
    first = await store.accept_incoming(
        integration_id, inbound(1, conversationId="c-batch"), lease(), None, 8
    )
    second = await store.accept_incoming(
        integration_id, inbound(2, conversationId="c-batch"), lease(), None, 8
    )
    assert (first.partitions, second.partitions) == (8, 8)
    conversation = replying(integration_id, first)
    for accepted in (first, second):
        await store.record_replies(conversation, accepted.bundle.message.id, [], 8)
    third = await store.accept_incoming(
        integration_id, inbound(3, conversationId="c-batch"), lease(), None, 16
    )
    assert third.partitions == 16
    fourth = await store.accept_incoming(
        integration_id, inbound(4, conversationId="c-batch"), lease(), None, 16
    )
    assert fourth.partitions == 16
    [pending] = [
        p
        for p in await store.claim_stale_pending(utcnow() + timedelta(hours=1), lease(), 10)
        if p.bundle.message.id == fourth.bundle.message.id
    ]
    assert pending.partitions == 16  # the outbox publishes it where it belongs


async def test_responses_stay_on_their_count_until_delivered(store: SqlStore, settings: Settings):
    integration_id, _ = await make_integration(store, settings)
    accepted = await store.accept_incoming(
        integration_id, inbound(1, conversationId="c-out"), lease(), None, 8
    )
    conversation = replying(integration_id, accepted)
    replies = [("text", {"text": "one"}), ("text", {"text": "two"})]
    records = await store.record_replies(conversation, accepted.bundle.message.id, replies, 8)
    assert [r.partitions for r in records] == [8, 8]
    # Undelivered: a bot worker with 16 partitions leaves the conversation on 8.
    assert await store.settle_partitions(conversation.id, "outbound", 16) == 8
    pushed, _ = await store.record_pushed(conversation, "text", {"text": "three"}, None, 16)
    assert pushed.partitions == 8
    # A failed attempt that will be retried leaves a response unfinished...
    await store.record_attempts(
        [attempt_record(r.id, integration_id=integration_id, status=200) for r in records]
    )
    await store.record_attempts(
        [
            attempt_record(
                pushed.id, integration_id=integration_id, status=503, next_attempt_at=utcnow()
            )
        ]
    )
    assert await store.settle_partitions(conversation.id, "outbound", 16) == 8
    # ...the final one finishes it: now the conversation moves.
    await store.record_attempts(
        [attempt_record(pushed.id, integration_id=integration_id, attempt=1, status=200)]
    )
    assert await store.settle_partitions(conversation.id, "outbound", 16) == 16
    moved, _ = await store.record_pushed(conversation, "text", {"text": "four"}, None, 8)
    assert moved.partitions == 16
    # The inbound stage has a count of its own: untouched.
    assert await store.settle_partitions(conversation.id, "inbound", 8) == 8


async def test_a_dead_lettered_message_is_finished(store: SqlStore, settings: Settings):
    integration_id, _ = await make_integration(store, settings)
    accepted = await store.accept_incoming(
        integration_id, inbound(1, conversationId="c-dead"), lease(), None, 8
    )
    conversation_id = accepted.bundle.conversation.id
    assert await store.settle_partitions(conversation_id, "inbound", 16) == 8
    await store.mark_dead(accepted.bundle.message.id, utcnow())
    assert await store.settle_partitions(conversation_id, "inbound", 16) == 16


async def test_the_counts_in_use_are_noted_and_forgotten(store: SqlStore, settings: Settings):
    noted_at = utcnow()
    await store.register_partitions(24, noted_at - timedelta(minutes=5))
    await store.register_partitions(24, noted_at)  # noted again: the latest time counts
    counts = await store.partition_counts()
    assert abs((counts[24] - noted_at).total_seconds()) < 1
    integration_id, _ = await make_integration(store, settings)
    accepted = await store.accept_incoming(
        integration_id, inbound(1, conversationId="c-24"), lease(), None, 24
    )
    assert await store.unfinished_under(24) == {"inbound": 1, "outbound": 0}
    conversation = replying(integration_id, accepted)
    [reply] = await store.record_replies(
        conversation, accepted.bundle.message.id, [("text", {"text": "hi"})], 24
    )
    assert await store.unfinished_under(24) == {"inbound": 0, "outbound": 1}
    await store.record_attempts([attempt_record(reply.id, integration_id=integration_id)])
    assert await store.unfinished_under(24) == {"inbound": 0, "outbound": 0}
    assert await store.forget_partitions(24)
    assert 24 not in await store.partition_counts()
    assert not await store.forget_partitions(24)


async def test_a_turn_is_unfinished_until_its_replies_are_published(
    store: SqlStore, settings: Settings
):
    # A turn's replies are stored (the message handled) before they are published: until
    # they are marked queued, the next message must not go to another count's queue, whose
    # worker could publish its own replies first.
    integration_id, _ = await make_integration(store, settings)
    accepted = await store.accept_incoming(
        integration_id, inbound(1, conversationId="c-turn"), lease(), None, 8
    )
    conversation = replying(integration_id, accepted)
    replies = await store.record_replies(
        conversation, accepted.bundle.message.id, [("text", {"text": "hi"})], 8
    )
    assert await store.settle_partitions(conversation.id, "inbound", 16) == 8
    await store.mark_queued([reply.id for reply in replies])
    assert await store.settle_partitions(conversation.id, "inbound", 16) == 16
