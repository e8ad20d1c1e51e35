"""Inbound order when the broker reorders: each inbound message is numbered in its
conversation by the statement that stores it, the number travels in its envelope, and the
bot stage goes to the store when a number is skipped, so a message the broker delivers
ahead of an earlier one waits behind it. On SQLite and PostgreSQL, with the real broker.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import timedelta
from typing import Any

import pytest

from relay.broker import Broker
from relay.ingress.accept import Acceptor
from relay.metrics import Metrics
from relay.pipeline.stage import StageWorker
from relay.settings import Settings
from relay.store import Accepted, SqlStore, Vanished, open_store
from relay.wire import InboundEnvelope, InboundRequest, utcnow
from tests.conftest import PARTITIONS
from tests.helpers import (
    Queues,
    connected_broker,
    eventually,
    make_integration,
    message,
    settled,
    start_bot_worker,
)
from workers.bot.adapters.base import BotContext
from workers.bot.adapters.plugin import PluginBot
from workers.bot.worker import BotTurns


@pytest.fixture(scope="module")
async def broker(settings: Settings) -> AsyncIterator[Broker]:
    async with connected_broker(settings) as connected:
        yield connected


def request(conversation: str, n: int | str) -> InboundRequest:
    return InboundRequest.model_validate(
        message(f"{conversation}-{n}", conversationId=conversation, text=f"{conversation} {n}")
    )


def lease(seconds: float = 30) -> Any:
    return utcnow() + timedelta(seconds=seconds)


async def accept(
    store: SqlStore,
    integration_id: str,
    conversation: str,
    n: int | str,
    seconds: float = 30,
    partitions: int = PARTITIONS,
) -> Accepted:
    """Record an inbound message as an ingress does (under the tests' partition count)."""
    outcome = await store.accept_incoming(
        integration_id, request(conversation, n), lease(seconds), None, partitions
    )
    assert isinstance(outcome, Accepted)
    return outcome


async def until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll a plain condition until it holds (fails at the deadline)."""

    async def probe() -> bool:
        return condition()

    await eventually(probe, timeout)


async def numbers_in_store_order(store: SqlStore, accepted: Sequence[Accepted]) -> list[int]:
    """The numbers of these messages (all of one conversation) in the order the store hands
    them out to a worker that asks (`unhandled`), once marked queued."""
    await store.mark_queued([a.bundle.message.id for a in accepted])
    conversation = accepted[0].bundle.conversation.id
    rows = await store.unhandled(conversation, utcnow() - timedelta(hours=1))
    number = {a.bundle.message.id: a.sequence for a in accepted}
    return [n for row in rows if (n := number[row.message_id]) is not None]


def batch_sizes(store: SqlStore) -> list[int]:
    """Record the size of every batch of new messages the store's group commit writes."""
    sizes: list[int] = []
    group = store._new_messages
    write = group._write

    async def spied(batch: Sequence[Any]) -> None:
        sizes.append(len(batch))
        await write(batch)

    group._write = spied
    return sizes


# --- the store: numbers per conversation -------------------------------------------------


async def test_numbers_grow_within_one_batch_of_the_group_commit(
    store: SqlStore, settings: Settings
) -> None:
    integration_id, _ = await make_integration(store, settings)
    # Known conversations: their next messages go through the group commit, interleaved.
    first = [await accept(store, integration_id, c, 0) for c in ("batch-a", "batch-b")]
    sizes = batch_sizes(store)
    later = await asyncio.gather(
        *[accept(store, integration_id, c, n) for n in range(1, 11) for c in ("batch-a", "batch-b")]
    )
    assert max(sizes) >= 4  # several messages of each conversation in one statement
    for conversation, head in zip(("batch-a", "batch-b"), first, strict=True):
        mine = [head, *(a for a in later if a.bundle.conversation.tags.id == conversation)]
        numbers = [a.sequence for a in mine]
        assert numbers == list(range(1, 12))  # in the order they came, no gap, none shared
        assert await numbers_in_store_order(store, mine) == list(range(1, 12))


async def test_numbers_are_never_shared_by_concurrent_writers(
    store: SqlStore, settings: Settings, database_url: str
) -> None:
    integration_id, _ = await make_integration(store, settings)
    other = await open_store(database_url)  # a second ingress process on the same database
    try:
        heads = [
            await accept(s, integration_id, "concurrent", f"head-{i}")
            for i, s in enumerate((store, other))
        ]
        per_writer = await asyncio.gather(
            *[
                asyncio.gather(
                    *[accept(s, integration_id, "concurrent", f"{i}-{n}") for n in range(25)]
                )
                for i, s in enumerate((store, other))
            ]
        )
    finally:
        await other.close()
    every = [*heads, *per_writer[0], *per_writer[1]]
    assert all(a.sequence is not None for a in every)
    numbers = [a.sequence or 0 for a in every]
    assert len(set(numbers)) == len(every)  # never shared
    for written in per_writer:  # each writer's in the order it wrote them
        mine = [a.sequence or 0 for a in written]
        assert mine == sorted(mine)
    in_store_order = await numbers_in_store_order(store, every)
    assert in_store_order == sorted(numbers)  # the store hands them out in number order


async def test_a_discarded_message_leaves_a_gap_and_its_number_is_never_given_again(
    store: SqlStore, settings: Settings
) -> None:
    integration_id, _ = await make_integration(store, settings)
    first = await accept(store, integration_id, "gap", 1)
    discarded = await accept(store, integration_id, "gap", 2)
    assert await store.discard_pending(discarded)
    third = await accept(store, integration_id, "gap", 3)
    assert (first.sequence, discarded.sequence, third.sequence) == (1, 2, 3)
    # Found again (a repeated messageId, the outbox): the number it was stored with.
    again = await accept(store, integration_id, "gap", 3)
    assert not again.created
    assert again.sequence == 3
    found = await store.find_incoming(integration_id, request("gap", 1).messageId)
    assert found is not None
    assert found.sequence == 1


# --- the envelope: both publishers carry the number ---------------------------------------


async def test_the_accept_path_and_the_outbox_put_the_number_in_the_envelope(
    store: SqlStore, settings: Settings, broker: Broker, queues: Queues
) -> None:
    integration_id, _ = await make_integration(store, settings)
    acceptor = Acceptor(store, broker, Metrics(), lease=30, wait=2)
    for n in (1, 2):
        await acceptor.accept(integration_id, request("carried", n), None)
    # A publisher that died between its commit and its publish: the outbox publishes it.
    stale = await accept(store, integration_id, "carried", 3, seconds=-1)
    assert await acceptor.outbox.sweep_outbox() >= 1
    taken = await queues.take("inbound")
    mine = [t for t in taken if t["bundle"]["conversation"]["tags"]["id"] == "carried"]
    assert [t["sequence"] for t in mine] == [1, 2, 3]
    assert mine[2]["bundle"]["message"]["id"] == stale.bundle.message.id
    # An envelope from before the numbers (still in a queue during an upgrade) is read.
    old = {k: v for k, v in mine[0].items() if not k.startswith("_") and k != "sequence"}
    assert InboundEnvelope.model_validate(old).sequence is None


# --- the bot stage: a conversation's messages delivered out of order -----------------------


class Recorder:
    """A bot that notes each message it is shown, in order, and answers it."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, int | None]] = []

    async def __call__(self, envelope: InboundEnvelope, context: BotContext) -> None:
        conversation = envelope.bundle.conversation.tags.id
        self.seen.append((conversation, envelope.text, envelope.sequence))
        await context.reply("text", {"text": f"echo: {envelope.text}"})

    def texts(self, conversation: str) -> list[str]:
        return [text for c, text, _ in self.seen if c == conversation]


def count_lookups(worker: StageWorker[InboundEnvelope]) -> list[str]:
    """Note each time the worker asks the store what its conversation has unfinished."""
    asked: list[str] = []
    turns = worker.handler
    unfinished = turns.unfinished

    async def counted(envelope: InboundEnvelope) -> Any:
        asked.append(envelope.text)
        return await unfinished(envelope)

    turns.unfinished = counted  # type: ignore[method-assign]
    return asked


async def known_conversation(
    acceptor: Acceptor, bot: Recorder, integration_id: str, conversation: str
) -> None:
    """A first message, through the accept path and the bot: from then on the worker knows
    the conversation, and nothing but the numbers tells it that one is missing."""
    await acceptor.accept(integration_id, request(conversation, "first"), None)
    await until(lambda: bool(bot.texts(conversation)))


async def publish(acceptor: Acceptor, integration_id: str, accepted: Accepted) -> None:
    """Publish an accepted message's envelope to its partition queue as the ingress does."""
    await acceptor.publisher.publish(
        integration_id,
        accepted.bundle,
        accepted.text,
        None,
        accepted.partitions,
        accepted.sequence,
    )


async def deliver_reordered(
    store: SqlStore, settings: Settings, broker: Broker, conversation: str, order: Sequence[int]
) -> tuple[list[str], list[str]]:
    """Accept three messages of a conversation the worker knows, confirmed (marked queued),
    then publish their envelopes straight to the partition queue in `order` (as a quorum
    queue may deliver them again after losing its leader): what the bot sees, in order,
    and the messages that sent the worker to the store."""
    integration_id, _ = await make_integration(store, settings)
    acceptor = Acceptor(store, broker, Metrics(), lease=30, wait=2)
    bot = Recorder()
    async with start_bot_worker(settings, PluginBot(bot)) as worker:
        asked = count_lookups(worker)
        await known_conversation(acceptor, bot, integration_id, conversation)
        accepted = [await accept(store, integration_id, conversation, n) for n in (1, 2, 3)]
        await store.mark_queued([a.bundle.message.id for a in accepted])
        for n in order:
            await publish(acceptor, integration_id, accepted[n - 1])
        await until(lambda: len(bot.texts(conversation)) == 4)
        await until(lambda: settled(worker, "done") >= 4)
    return bot.texts(conversation), asked


async def test_the_bot_sees_a_conversation_in_order_when_the_broker_reorders_it(
    store: SqlStore, settings: Settings, broker: Broker
) -> None:
    seen, asked = await deliver_reordered(store, settings, broker, "reordered", (1, 3, 2))
    assert seen == ["reordered first", "reordered 1", "reordered 2", "reordered 3"]
    # The store was asked on meeting the conversation, and when 3 skipped 2: no more.
    assert asked == ["reordered first", "reordered 3"]


async def test_without_the_number_the_bot_would_see_the_queues_order(
    store: SqlStore, settings: Settings, broker: Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The premise of the test above: the worker really is handed 1, 3, 2.
    monkeypatch.setattr(BotTurns, "sequence", lambda self, envelope: None)
    seen, _ = await deliver_reordered(store, settings, broker, "unchecked", (1, 3, 2))
    assert seen == ["unchecked first", "unchecked 1", "unchecked 3", "unchecked 2"]


async def test_a_gap_costs_one_look_up_and_holds_nothing_up(
    store: SqlStore, settings: Settings, broker: Broker
) -> None:
    integration_id, _ = await make_integration(store, settings)
    acceptor = Acceptor(store, broker, Metrics(), lease=30, wait=2)
    bot = Recorder()
    async with start_bot_worker(settings, PluginBot(bot)) as worker:
        asked = count_lookups(worker)
        await known_conversation(acceptor, bot, integration_id, "gapped")
        accepted = [await accept(store, integration_id, "gapped", n) for n in (1, 2, 3, 4)]
        assert await store.discard_pending(accepted[1])  # its publish failed: never accepted
        kept = [accepted[0], accepted[2], accepted[3]]
        await store.mark_queued([a.bundle.message.id for a in kept])
        for item in kept:
            await publish(acceptor, integration_id, item)
        # Well within the shortest retry delay would a wait behind the missing one take.
        await until(lambda: len(bot.texts("gapped")) == 4, timeout=5)
    assert bot.texts("gapped") == ["gapped first", "gapped 1", "gapped 3", "gapped 4"]
    assert asked == ["gapped first", "gapped 3"]


# --- the acceptor: the one layer that retries ----------------------------------------------


async def test_the_acceptor_makes_an_attempt_that_vanished_again(
    store: SqlStore, settings: Settings, broker: Broker, queues: Queues, database_url: str
) -> None:
    # Another process discarded the first message of a conversation this one remembers: the
    # store's attempt answers Vanished (nothing written), the acceptor's next one makes the
    # conversation anew.
    integration_id, _ = await make_integration(store, settings)
    first = await accept(store, integration_id, "vanishing", 1)
    other = await open_store(database_url)
    try:
        assert await other.discard_pending(first)
    finally:
        await other.close()
    outcomes: list[object] = []
    record = store.accept_incoming

    async def spied(*args: Any) -> object:
        outcomes.append(await record(*args))
        return outcomes[-1]

    store.accept_incoming = spied  # type: ignore[method-assign]
    try:
        acceptor = Acceptor(store, broker, Metrics(), lease=30, wait=2)
        second = request("vanishing", 2)
        bundle = await acceptor.accept(integration_id, second, None)
    finally:
        del store.accept_incoming
    assert [type(outcome) for outcome in outcomes] == [Vanished, Accepted]
    assert bundle.conversation.id != first.bundle.conversation.id
    found = await store.find_incoming(integration_id, second.messageId)
    assert found is not None
    assert found.state == "queued"
