"""The store's history (both stores): what becomes visible when, in which order, after a
watermark; a transaction still open holds later items back on PostgreSQL rather than let
a reader skip its rows; and rows written before the history existed get their places."""

from __future__ import annotations

import uuid
from typing import Any

import asyncpg
import pytest

from relay.broker.topology import BASE_PARTITIONS
from relay.store import ConversationRecord, SqlStore, Watermark, open_store
from relay.store.postgres import drop_schema
from relay.store.schema import migrations, statements
from relay.store.sql.common import new_id
from relay.store.sql.outgoing import Turn, record_turns_at_once
from relay.wire import InboundRequest, utcnow


def request(conversation: str, n: int) -> InboundRequest:
    return InboundRequest.model_validate(
        {
            "userId": "u1",
            "messageId": f"{conversation}-{n}",
            "conversationId": conversation,
            "type": "text",
            "text": f"m{n}",
        }
    )


async def accept(store: SqlStore, integration_id: str, conversation: str, n: int) -> Any:
    accepted = await store.accept_incoming(
        integration_id, request(conversation, n), utcnow(), None, BASE_PARTITIONS
    )
    return accepted.bundle


async def integration(store: SqlStore) -> str:
    record = await store.create_integration("h", "http://127.0.0.1:9/r", "whsec_x")
    return record.id


def conversation_record(bundle: Any, integration_id: str) -> ConversationRecord:
    return ConversationRecord(
        id=bundle.conversation.id,
        integration_id=integration_id,
        external_id=bundle.conversation.tags.id,
        user_id=bundle.user.id,
    )


async def test_items_appear_when_visible_in_the_order_they_became_so(store: SqlStore):
    integration_id = await integration(store)
    conv = f"c-{uuid.uuid4().hex[:6]}"
    first = await accept(store, integration_id, conv, 1)
    # Pending (its publish not confirmed): not in the history yet.
    page = await store.history("conversation", first.conversation.id, None, 100)
    assert page.items == []
    assert page.watermark == Watermark.ORIGIN
    second = await accept(store, integration_id, conv, 2)
    await store.mark_queued([second.message.id])
    # The second was queued first: it comes first, whatever the order of acceptance.
    record = conversation_record(first, integration_id)
    replies = [("text", {"text": "a"}), ("text", {"text": "b"})]
    await store.record_replies(record, first.message.id, replies, BASE_PARTITIONS)
    page = await store.history("conversation", first.conversation.id, None, 100)
    assert [(i.direction, i.payload.get("text")) for i in page.items] == [
        ("incoming", "m2"),
        ("incoming", "m1"),  # marked queued by its turn, before its replies
        ("outgoing", "a"),
        ("outgoing", "b"),
    ]
    assert [i.sequence for i in page.items] == [None, None, 1, 2]
    assert page.watermark == page.items[-1].watermark
    watermarks = [i.watermark for i in page.items]
    assert watermarks == sorted(watermarks)
    assert len(set(watermarks)) == 4
    # Marking again changes nothing: an item keeps its place.
    await store.mark_queued([first.message.id, second.message.id])
    again = await store.history("conversation", first.conversation.id, None, 100)
    assert [i.watermark for i in again.items] == watermarks
    # After a watermark, and by pages.
    after = await store.history("conversation", first.conversation.id, watermarks[1], 100)
    assert [i.watermark for i in after.items] == watermarks[2:]
    page = await store.history("conversation", first.conversation.id, None, 3)
    assert page.more
    rest = await store.history("conversation", first.conversation.id, page.watermark, 3)
    assert [i.watermark for i in page.items + rest.items] == watermarks
    assert not rest.more
    # A pushed message is visible at once; the integration's view holds every conversation.
    await store.record_pushed(record, "text", {"text": "pushed"}, None, BASE_PARTITIONS)
    other = await accept(store, integration_id, f"{conv}-other", 1)
    await store.mark_queued([other.message.id])
    everything = await store.history("integration", integration_id, None, 100)
    assert [i.payload.get("text") for i in everything.items] == [
        "m2",
        "m1",
        "a",
        "b",
        "pushed",
        "m1",
    ]
    assert await store.latest_watermark(integration_id) == everything.watermark
    assert (await store.latest_watermark(await integration(store))) == Watermark.ORIGIN


async def test_a_turn_reads_its_replies_and_whether_it_settled(store: SqlStore):
    integration_id = await integration(store)
    bundle = await accept(store, integration_id, f"t-{uuid.uuid4().hex[:6]}", 1)
    turn = await store.turn(bundle.message.id)
    assert (turn.handled, turn.dead, turn.responses) == (False, False, [])
    record = conversation_record(bundle, integration_id)
    await store.record_replies(record, bundle.message.id, [("text", {"text": "r"})])
    turn = await store.turn(bundle.message.id)
    assert turn.handled
    assert [r.payload for r in turn.responses] == [{"text": "r"}]
    dead = await accept(store, integration_id, f"t-{uuid.uuid4().hex[:6]}", 2)
    await store.mark_dead(dead.message.id, utcnow())
    assert (await store.turn(dead.message.id)).dead


async def test_an_open_transaction_holds_later_items_back_on_postgresql(
    store: SqlStore, database_url: str
):
    if store.dialect != "postgresql":
        pytest.skip("SQLite's writers take turns: nothing commits out of order")
    integration_id = await integration(store)
    conv = f"h-{uuid.uuid4().hex[:6]}"
    bundle = await accept(store, integration_id, conv, 1)
    # Another transaction started earlier (it has an id) and is not finished.
    server = database_url.split("?")[0]
    other = await asyncpg.connect(server)
    try:
        transaction = other.transaction()
        await transaction.start()
        await other.fetchval("SELECT pg_current_xact_id()")
        await store.mark_queued([bundle.message.id])
        held = await store.history("conversation", bundle.conversation.id, None, 100)
        assert held.items == []
        assert held.held_back
        await transaction.rollback()
        page = await store.history("conversation", bundle.conversation.id, None, 100)
        assert [i.payload["text"] for i in page.items] == ["m1"]
        assert not page.held_back
    finally:
        await other.close()


@pytest.fixture
async def version5_url(database_url: str, tmp_path: Any) -> Any:
    """A fresh database of its own (the module's has the whole schema already)."""
    if database_url.startswith("sqlite"):
        yield f"sqlite:///{tmp_path / 'v5.db'}"
        return
    server = database_url.split("?")[0]
    schema = "t_" + uuid.uuid4().hex[:12]
    yield f"{server}?schema={schema}"
    await drop_schema(server, schema)


async def test_messages_from_before_the_history_get_their_places_in_order(version5_url: str):
    # Written by a Relay at schema version 5, then upgraded.
    store = await open_store(version5_url)
    try:
        dialect = store.dialect
        async with store.driver.transaction() as conn:
            await conn.execute("DELETE FROM schema_version WHERE version = 6")
            for statement in _undo_v6(dialect):
                await conn.execute(statement)
        integration_id = await integration(store)
        conv = f"old-{uuid.uuid4().hex[:6]}"
        bundle = await accept(store, integration_id, conv, 1)
        async with store.driver.connection() as conn:
            await conn.execute(
                "UPDATE messages SET state = 'queued' WHERE id = ?", bundle.message.id
            )
        async with store.driver.transaction() as conn:
            for statement in statements(migrations(dialect)[5]):
                await conn.execute(statement)
            await conn.execute("INSERT INTO schema_version (version) VALUES (6)")
        page = await store.history("conversation", bundle.conversation.id, None, 100)
        assert [i.payload["text"] for i in page.items] == ["m1"]
        # New items come after the old ones.
        record = conversation_record(bundle, integration_id)
        await store.record_replies(record, bundle.message.id, [("text", {"text": "new"})])
        page = await store.history("conversation", bundle.conversation.id, None, 100)
        assert [i.payload["text"] for i in page.items] == ["m1", "new"]
    finally:
        await store.close()


def _undo_v6(dialect: str) -> list[str]:
    drops = [
        "DROP INDEX messages_conversation_items",
        "DROP INDEX messages_integration_items",
        "ALTER TABLE messages DROP COLUMN txid",
        "ALTER TABLE messages DROP COLUMN item",
    ]
    if dialect == "postgresql":
        return [*drops, "DROP SEQUENCE message_items"]
    return ["DROP INDEX messages_items", *drops]


@pytest.mark.parametrize("batched", [False, True], ids=["one turn", "a batch of turns"])
async def test_replies_never_sort_before_the_message_they_answer(
    store: SqlStore, database_url: str, batched: bool
) -> None:
    """The message's ingress marks it queued in a transaction that took its id after the
    bot's turn took its own (the turn then waits for that row): the replies still come
    after the message in the history, whether the turn is stored alone or in a batch."""
    if not database_url.startswith("postgresql"):
        pytest.skip("SQLite's writers take turns: no transaction ids to interleave")
    integration_id = await integration(store)
    tag = uuid.uuid4().hex[:6]
    bundle = await accept(store, integration_id, f"interleaved-{tag}", 1)
    other = await accept(store, integration_id, f"alongside-{tag}", 1)
    await store.mark_queued([other.message.id])
    conversation = conversation_record(bundle, integration_id)
    turn = Turn(conversation, bundle.message.id, [("text", {"text": "r"})], [new_id()], utcnow(), 8)
    alongside = Turn(
        conversation_record(other, integration_id),
        other.message.id,
        [("text", {"text": "o1"}), ("text", {"text": "o2"})],
        [new_id(), new_id()],
        utcnow(),
        8,
    )
    async with store.driver.transaction() as bot:
        # The turn's transaction has its id first...
        await bot.fetchone("SELECT pg_current_xact_id() AS xid")
        # ...the ingress's mark (a later id) stamps the message and commits...
        await store.mark_queued([bundle.message.id])
        # ...and only then does the turn store its reply.
        numbered = await record_turns_at_once(bot, [turn, alongside] if batched else [turn])
        assert [(n.first, n.partitions) for n in numbered.values() if n] == [(1, 8)] * len(numbered)
    page = await store.history("conversation", conversation.id, None, 10)
    assert [item.direction for item in page.items] == ["incoming", "outgoing"]
    if batched:
        page = await store.history("conversation", alongside.conversation.id, None, 10)
        texts = [(item.direction, item.sequence, item.payload.get("text")) for item in page.items]
        assert texts == [("incoming", None, "m1"), ("outgoing", 1, "o1"), ("outgoing", 2, "o2")]
