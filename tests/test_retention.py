"""Retention on SQLite and PostgreSQL: old settled rows go in batches under a lease, recent
and in-flight ones stay, SQLite gives the space back; the janitor and `relay prune`."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from aio_pika.abc import AbstractRobustConnection
from structlog.testing import capture_logs

from relay.admin.retention import LEASE_SECONDS, PRUNE_LEASE, Lease, parse_age, prune
from relay.broker import topology_of
from relay.metrics import Metrics
from relay.service.janitor import JANITOR_LEASE, Janitor
from relay.settings import Settings
from relay.store import Accepted, OutgoingRecord, SqlStore, open_store
from relay.store.driver import Conn
from relay.store.sqlite import SqliteDriver
from relay.wire import InboundRequest, utcnow
from tests.helpers import attempt_record, eventually, make_integration, message
from tests.test_cli import relay, relay_processes
from tests.test_store import replying

OLD = timedelta(days=40)
CUTOFF = timedelta(days=30)


def lease_until() -> datetime:
    return utcnow() + timedelta(seconds=30)


@dataclass
class Turn:
    """An incoming message of its own conversation and user, and the replies to it."""

    accepted: Accepted
    replies: list[OutgoingRecord] = field(default_factory=list)

    @property
    def id(self) -> str:
        return self.accepted.bundle.message.id

    @property
    def conversation(self) -> str:
        return self.accepted.bundle.conversation.id

    @property
    def user(self) -> str:
        return self.accepted.bundle.user.id


async def turn(
    store: SqlStore,
    integration_id: str,
    name: str,
    replies: int = 1,
    queued: bool = True,
    handled: bool = True,
    text: str = "reply",
) -> Turn:
    """A message `name` in conversation `name` of user `name`: accepted, queued, handled."""
    request = InboundRequest.model_validate(
        message(name, conversationId=f"conv-{name}", userId=f"user-{name}")
    )
    accepted = await store.accept_incoming(integration_id, request, lease_until(), None)
    made = Turn(accepted)
    if queued:
        await store.mark_queued([made.id])
    if handled:
        made.replies = await store.record_replies(
            replying(integration_id, accepted),
            made.id,
            [("text", {"text": f"{text} {n}"}) for n in range(replies)],
        )
    return made


async def attempt(
    store: SqlStore, response: OutgoingRecord, status: int, retry: bool = False
) -> None:
    """An attempt at a response: final, unless `retry` (another planned)."""
    next_at = utcnow() + timedelta(minutes=5) if retry else None
    await store.record_attempts(
        [attempt_record(response.id, status=status, next_attempt_at=next_at)]
    )


async def age(store: SqlStore, *turns: Turn, by: timedelta = OLD) -> None:
    """Move every timestamp of the turns (their messages, attempts, conversations and
    users) `by` into the past."""
    for made in turns:
        async with store.driver.transaction() as conn:
            ids = [made.id, *(r.id for r in made.replies)]
            marks = ", ".join(["?"] * len(ids))
            for column in ("created_at", "updated_at", "handled_at", "dead_at"):
                await _age_column(conn, "messages", column, f"id IN ({marks})", ids, by)
            where = f"message_id IN ({marks})"
            await _age_column(conn, "delivery_attempts", "created_at", where, ids, by)
            for table, id_ in (("conversations", made.conversation), ("users", made.user)):
                for column in ("created_at", "updated_at"):
                    await _age_column(conn, table, column, "id = ?", [id_], by)


async def _age_column(
    conn: Conn, table: str, column: str, where: str, ids: list[str], by: timedelta
) -> None:
    # Row by row: SQLite keeps timestamps as text, so the shift is done here.
    rows = await conn.fetchall(
        f"SELECT id, {column} AS t FROM {table} WHERE {where} AND {column} IS NOT NULL", *ids
    )
    for row in rows:
        value = row["t"] if isinstance(row["t"], datetime) else datetime.fromisoformat(row["t"])
        await conn.execute(f"UPDATE {table} SET {column} = ? WHERE id = ?", value - by, row["id"])


async def present(store: SqlStore, table: str, ids: list[str]) -> set[str]:
    """Which of `ids` are still rows of `table`."""
    async with store.driver.connection() as conn:
        rows = await conn.fetchall(
            f"SELECT id FROM {table} WHERE id IN ({', '.join(['?'] * len(ids))})", *ids
        )
    return {row["id"] for row in rows}


async def attempts_of(store: SqlStore, response_ids: list[str]) -> int:
    async with store.driver.connection() as conn:
        row = await conn.fetchone(
            "SELECT count(*) AS n FROM delivery_attempts"
            f" WHERE message_id IN ({', '.join(['?'] * len(response_ids))})",
            *response_ids,
        )
    return int(row["n"]) if row else 0


async def newest(store: SqlStore, integration_id: str, name: str) -> Turn:
    """A recent turn, made last: on SQLite the row with the largest stamp always stays
    (`relay.store.sql.retention`), and a test's old rows must not be that one."""
    return await turn(store, integration_id, f"{name}-newest")


async def delivered_long_ago(store: SqlStore, integration_id: str, name: str) -> Turn:
    """An old turn whose reply was delivered (all of it prunable), and a recent one made
    after it (`newest`)."""
    old = await turn(store, integration_id, f"{name}-old")
    await attempt(store, old.replies[0], 200)
    await age(store, old)
    await newest(store, integration_id, name)
    return old


async def prune_now(store: SqlStore) -> None:
    lease = Lease(store, PRUNE_LEASE, LEASE_SECONDS)
    assert await lease.take()
    try:
        pruned, _ = await prune(store, lease, utcnow() - CUTOFF, None)
    finally:
        await lease.release()
    assert pruned.complete


def everything(*turns: Turn) -> dict[str, list[str]]:
    """Every row id of the turns, by table."""
    return {
        "messages": [i for t in turns for i in (t.id, *(r.id for r in t.replies))],
        "conversations": [t.conversation for t in turns],
        "users": [t.user for t in turns],
    }


async def test_old_settled_turns_go_and_recent_and_in_flight_ones_stay(
    store: SqlStore, settings: Settings
) -> None:
    integration_id, _ = await make_integration(store, settings)
    # Settled long ago: delivered; given up (a final failure); dead-lettered unattempted.
    delivered = await turn(store, integration_id, "delivered", replies=2)
    await attempt(store, delivered.replies[0], 500, retry=True)
    await attempt(store, delivered.replies[0], 200)
    await attempt(store, delivered.replies[1], 204)
    given_up = await turn(store, integration_id, "given-up")
    await attempt(store, given_up.replies[0], 410)
    dead = await turn(store, integration_id, "dead")
    await store.mark_dead(dead.replies[0].id, utcnow())
    dead_turn = await turn(store, integration_id, "dead-turn", handled=False)
    await store.mark_dead(dead_turn.id, utcnow())
    gone = (delivered, given_up, dead, dead_turn)
    # In flight, however old: a message not yet handled, one never queued (its ingress's),
    # a response never attempted, one with a retry planned, a turn dead-lettered recently.
    unhandled = await turn(store, integration_id, "unhandled", handled=False)
    unqueued = await turn(store, integration_id, "unqueued", queued=False, handled=False)
    unattempted = await turn(store, integration_id, "unattempted")
    retrying = await turn(store, integration_id, "retrying")
    await attempt(store, retrying.replies[0], 503, retry=True)
    resent = await turn(store, integration_id, "resent")
    await attempt(store, resent.replies[0], 200)
    in_flight = (unhandled, unqueued, unattempted, retrying, resent)
    await age(store, *gone, *in_flight)
    await attempt(store, resent.replies[0], 200)  # a resend today: not settled long ago
    recent = await turn(store, integration_id, "recent")
    await attempt(store, recent.replies[0], 200)

    await prune_now(store)

    for table, ids in everything(*gone).items():
        assert await present(store, table, ids) == set(), table
    for table, ids in everything(*in_flight, recent).items():
        assert await present(store, table, ids) == set(ids), table
    assert await attempts_of(store, [r.id for t in gone for r in t.replies]) == 0
    assert await attempts_of(store, [retrying.replies[0].id, recent.replies[0].id]) == 2
    # The messageId is free again: sent anew, it is a new message (in a new conversation).
    again = InboundRequest.model_validate(
        message("delivered", conversationId="conv-delivered", userId="user-delivered")
    )
    accepted = await recorded(store, integration_id, again)
    assert accepted.created
    assert accepted.bundle.conversation.id != delivered.conversation


async def recorded(store: SqlStore, integration_id: str, request: InboundRequest) -> Accepted:
    """Record as the acceptor does: an attempt that finds its remembered user or
    conversation pruned meanwhile (`Vanished`) is made again, and then makes them anew."""
    for _ in range(2):
        outcome = await store.accept_incoming(integration_id, request, lease_until(), None)
        if isinstance(outcome, Accepted):
            return outcome
    raise AssertionError("the second attempt vanished too")


async def test_a_turn_goes_as_a_whole_and_pushed_keys_with_their_response(
    store: SqlStore, settings: Settings
) -> None:
    integration_id, _ = await make_integration(store, settings)
    # Settled long ago, but one of its replies not: the message waits for it too.
    half = await turn(store, integration_id, "half", replies=2)
    await attempt(store, half.replies[0], 200)
    # A response the bot pushed with an idempotency key, delivered long ago.
    pushing = await turn(store, integration_id, "pushing")
    await attempt(store, pushing.replies[0], 200)
    conversation = replying(integration_id, pushing.accepted)
    pushed, created = await store.record_pushed(conversation, "text", {"text": "p"}, "key-1")
    assert created
    await attempt(store, pushed, 200)
    pushing.replies.append(pushed)
    await age(store, half, pushing)
    await newest(store, integration_id, "pushing")

    await prune_now(store)

    assert await present(store, "messages", [half.id, *(r.id for r in half.replies)]) == {
        half.id,
        half.replies[1].id,
    }
    assert await present(store, "messages", [pushed.id]) == set()
    again = InboundRequest.model_validate(
        message("pushing-2", conversationId="conv-pushing", userId="user-pushing")
    )
    accepted = await recorded(store, integration_id, again)
    await store.mark_queued([accepted.bundle.message.id])
    key_again, created = await store.record_pushed(
        replying(integration_id, accepted), "text", {"text": "p"}, "key-1"
    )
    assert created  # the key went with its response: it makes a new one
    assert key_again.id != pushed.id


async def test_one_pruner_at_a_time(store: SqlStore, settings: Settings) -> None:
    first, second = (Lease(store, "test-one-at-a-time", 60) for _ in range(2))
    taken = await asyncio.gather(first.take(), second.take())
    assert sorted(taken) == [False, True]
    holder, other = (first, second) if taken[0] else (second, first)
    assert await holder.take()  # renewing
    assert not await other.take()
    await holder.release()
    assert await other.take()
    await other.release()
    # An expired lease is free for the taking.
    stale = Lease(store, "test-expired", -1)
    assert await stale.take()
    assert await Lease(store, "test-expired", 60).take()


async def test_two_concurrent_prunes_only_one_works(store: SqlStore, settings: Settings) -> None:
    integration_id, _ = await make_integration(store, settings)
    turns = [await turn(store, integration_id, f"pair-{n}", replies=0) for n in range(6)]
    await age(store, *turns)
    await newest(store, integration_id, "pair")
    leases = [Lease(store, PRUNE_LEASE, LEASE_SECONDS) for _ in range(2)]

    async def pruner(lease: Lease) -> int | None:
        if not await lease.take():
            return None
        try:
            pruned, _ = await prune(store, lease, utcnow() - CUTOFF, None)
        finally:
            await lease.release()
        return pruned.counts["messages"]

    results = await asyncio.gather(*(pruner(lease) for lease in leases))
    assert None in results
    assert await present(store, "messages", [t.id for t in turns]) == set()


async def test_a_prune_stops_between_batches_once_its_lease_is_lost(
    store: SqlStore, settings: Settings
) -> None:
    integration_id, _ = await make_integration(store, settings)
    turns = [await turn(store, integration_id, f"batch-{n}", replies=0) for n in range(5)]
    await age(store, *turns)
    await newest(store, integration_id, "batch")
    renewals = 0

    async def renew() -> bool:
        nonlocal renewals
        renewals += 1
        return renewals <= 2

    pruned = await store.prune(utcnow() - CUTOFF, 2, renew)
    assert not pruned.complete
    assert pruned.counts["messages"] == 2  # the responses' batch, then one of messages
    assert len(await present(store, "messages", [t.id for t in turns])) == 3
    await prune_now(store)
    assert await present(store, "messages", [t.id for t in turns]) == set()


async def test_the_janitor_prunes_on_its_turn_and_lets_go_when_stopped(
    store: SqlStore, settings: Settings
) -> None:
    integration_id, _ = await make_integration(store, settings)
    old = await delivered_long_ago(store, integration_id, "janitor")
    quick = settings.model_copy(update={"retention_days": 30, "prune_interval": 0.1})
    metrics = Metrics()
    # The janitor needs the store alone: the dead letters it bounds are kept there.
    working, waiting = (Janitor(quick, store, metrics) for _ in range(2))
    try:
        working.start()

        sample = metrics.registry.get_sample_value

        async def counted() -> bool:  # once its prune is over
            return sample("relay_pruned_rows_total", {"kind": "messages"}) == 1

        await eventually(counted)
        assert await present(store, "messages", [old.id]) == set()
        assert sample("relay_pruned_rows_total", {"kind": "responses"}) == 1
        # Another janitor's looks find the turn taken: it does nothing meanwhile.
        assert not await waiting.look()
        await working.stop()  # cancelled mid-sleep or mid-prune alike; the turn let go
        assert await lease_holders(store) == set()
        assert await waiting.look()
    finally:
        await working.stop()
        await waiting.stop()
    assert await lease_holders(store) == set()


async def lease_holders(store: SqlStore) -> set[str]:
    async with store.driver.connection() as conn:
        rows = await conn.fetchall(
            "SELECT name FROM leases WHERE name IN (?, ?)", JANITOR_LEASE, PRUNE_LEASE
        )
    return {row["name"] for row in rows}


async def test_worker_services_prune_and_let_the_leases_go_on_sigterm(
    store: SqlStore, settings: Settings, amqp: AbstractRobustConnection
) -> None:
    integration_id, _ = await make_integration(store, settings)
    old = await delivered_long_ago(store, integration_id, "services")
    quick = {"RELAY_PRUNE_INTERVAL": "0.2"}
    async with relay_processes(settings, "delivery-worker", 2, quick):

        async def pruned() -> bool:
            return not await present(store, "messages", [old.id, old.replies[0].id])

        async def both_started() -> bool:
            # Each service's dead-letter keeper consumes once the service is up: a SIGTERM
            # before then (while Python still imports) would kill it outright.
            async with amqp.channel() as channel:
                dead = topology_of(settings).dead_queue("outbound")
                queue = await channel.declare_queue(dead, passive=True)
                return queue.declaration_result.consumer_count == 2

        await eventually(pruned, timeout=30)
        await eventually(both_started, timeout=30)
    # Both stopped on SIGTERM with exit code 0 (relay_processes checks), leases let go.
    assert await lease_holders(store) == set()


async def test_relay_prune_by_hand(store: SqlStore, settings: Settings) -> None:
    integration_id, _ = await make_integration(store, settings)
    old = await turn(store, integration_id, "by-hand")
    await attempt(store, old.replies[0], 200)
    await age(store, old, by=timedelta(days=10))
    week = await turn(store, integration_id, "by-hand-recent")
    await age(store, week, by=timedelta(days=5))

    run = await relay(settings, "prune", "--older-than", "7d")
    assert run.code == 0, run.err
    assert run.err == ""  # quiet unless -v
    lines = run.out.splitlines()
    assert "deleted 1 messages" in lines
    assert "deleted 1 responses" in lines
    assert "deleted 1 attempts" in lines
    assert await present(store, "messages", [old.id]) == set()
    assert await present(store, "messages", [week.id]) == {week.id}
    # Someone else pruning: a clear refusal, nothing done.
    holder = Lease(store, PRUNE_LEASE, 60)
    assert await holder.take()
    try:
        busy = await relay(settings, "prune", "--older-than", "2d")
    finally:
        await holder.release()
    assert busy.code == 1
    assert "another process is pruning" in busy.err
    assert await present(store, "messages", [week.id]) == {week.id}


def plain_settings(path: Path, amqp_url: str) -> Settings:
    """Settings of a SQLite file of a test's own (for what needs no module database)."""
    return Settings(_env_file=None, database_url=f"sqlite:///{path}", amqp_url=amqp_url)


async def test_relay_prune_usage(tmp_path: Path, amqp_url: str) -> None:
    settings = plain_settings(tmp_path / "usage.db", amqp_url)
    for bad in ("7", "7x", "-1d", "0d", "d"):
        run = await relay(settings, "prune", f"--older-than={bad}")
        assert run.code == 2, bad
        assert "--older-than" in run.err
        assert "not an age" in run.err
    shown = await relay(settings, "prune", "--help")
    assert "RELAY_DATABASE_URL" in shown.out
    assert "90m, 12h, 7d or 2w" in shown.out


def test_ages() -> None:
    assert parse_age("90m") == timedelta(minutes=90)
    assert parse_age("12h") == timedelta(hours=12)
    assert parse_age("7d") == timedelta(days=7)
    assert parse_age("2w") == timedelta(days=14)
    assert parse_age("1.5d") == timedelta(hours=36)
    for bad in ("", "7", "7s", "d7", "-7d", "0w", "7 days"):
        with pytest.raises(ValueError, match="not an age"):
            parse_age(bad)


async def pragma(store: SqlStore, name: str) -> int:
    async with store.driver.connection() as conn:
        row = await conn.fetchone(f"PRAGMA {name}")
    assert row is not None
    return int(next(iter(row.values())))


async def checkpoint(store: SqlStore) -> None:
    async with store.driver.connection() as conn:
        await conn.fetchone("PRAGMA wal_checkpoint(TRUNCATE)")


async def old_turns(store: SqlStore, integration_id: str, count: int) -> list[Turn]:
    """`count` turns, each with a large reply delivered, aged."""
    turns = [await turn(store, integration_id, f"big-{n}", text="x" * 4000) for n in range(count)]
    for made in turns:
        await attempt(store, made.replies[0], 200)
    await age(store, *turns)
    return turns


async def test_sqlite_gives_the_space_back_and_keeps_the_newest_stamp(
    tmp_path: Path, amqp_url: str
) -> None:
    path = tmp_path / "space.db"
    store = await open_store(f"sqlite:///{path}")
    try:
        assert await pragma(store, "auto_vacuum") == 2  # incremental from the start
        integration_id, _ = await make_integration(store, plain_settings(path, amqp_url))
        turns = await old_turns(store, integration_id, 40)
        await checkpoint(store)
        size, pages = path.stat().st_size, await pragma(store, "page_count")
        before = await store.history("integration", integration_id, None, 1000)

        await prune_now(store)

        # All gone but the largest stamp (the last reply) and so the message it answers.
        last = turns[-1]
        assert await present(store, "messages", everything(*turns)["messages"]) == {
            last.id,
            last.replies[0].id,
        }
        assert await pragma(store, "freelist_count") == 0
        assert await pragma(store, "page_count") < pages
        await checkpoint(store)
        assert path.stat().st_size < size
        # A new item sorts after every one a reader may have seen before the prune.
        later = await turn(store, integration_id, "after-prune")
        page = await store.history("integration", integration_id, None, 1000)
        assert page.items[-1].id == later.replies[0].id
        assert page.items[-1].watermark > before.watermark
    finally:
        await store.close()


async def test_an_older_sqlite_file_moves_to_incremental_vacuum_at_a_prune(
    tmp_path: Path, amqp_url: str
) -> None:
    path = tmp_path / "older.db"
    store = await open_store(f"sqlite:///{path}")
    try:
        assert isinstance(store.driver, SqliteDriver)
        # A file made before Relay asked for incremental vacuum.
        await store.driver.run_script("PRAGMA auto_vacuum=NONE; VACUUM")
        assert await pragma(store, "auto_vacuum") == 0
        integration_id, _ = await make_integration(store, plain_settings(path, amqp_url))
        await old_turns(store, integration_id, 20)
        await newest(store, integration_id, "older")
        await checkpoint(store)
        size = path.stat().st_size
        # A janitor leaves a file larger than its limit as it is, and says so.
        lease = Lease(store, PRUNE_LEASE, LEASE_SECONDS)
        assert await lease.take()
        with capture_logs() as logs:
            _, reclaimed = await prune(store, lease, utcnow() - CUTOFF, 1024)
        assert reclaimed == 0
        assert await pragma(store, "auto_vacuum") == 0
        assert "sqlite_vacuum_postponed" in [line["event"] for line in logs]
        assert await pragma(store, "freelist_count") > 0  # the space is still the file's
        # `relay prune` converts whatever the size: one VACUUM, and the space is given back.
        _, reclaimed = await prune(store, lease, utcnow() - CUTOFF, None)
        await lease.release()
        assert reclaimed > 0
        assert await pragma(store, "auto_vacuum") == 2
        assert await pragma(store, "freelist_count") == 0
        await checkpoint(store)
        assert path.stat().st_size < size
    finally:
        await store.close()
