"""The dead-letter bounds, on the letters kept in the store (SQLite and PostgreSQL): what is
older than the age bound or beyond the length bound goes oldest first, counted and logged
with its ids; the rest stays."""

from __future__ import annotations

import time
import uuid

from structlog.testing import capture_logs

from relay.broker import StageName
from relay.metrics import Metrics
from relay.pipeline.dlq import DeadLetters
from relay.pipeline.dlq_bounds import Bounds, enforce
from relay.store import DeadLetter, DeadLetterFilter, SqlStore

HOUR = 3600.0


async def bury(store: SqlStore, stage: StageName, age: float, prefix: str) -> str:
    """Keep a letter that died `age` seconds ago; its id."""
    letter_id = f"{prefix}-{uuid.uuid4().hex[:8]}"
    await store.keep_dead_letter(
        DeadLetter(
            id=letter_id,
            stage=stage,
            integration_id=f"int-{letter_id}",
            conversation_id=f"conv-{letter_id}",
            reason="the bot failed",
            attempts=1,
            last_status=None,
            dead_at=int(time.time() - age),
            body={"integrationId": f"int-{letter_id}"},
        )
    )
    return letter_id


async def left(store: SqlStore, stage: StageName, prefix: str) -> list[str]:
    found = await store.dead_letters(DeadLetterFilter(stage=stage), None, 1000)
    return [letter.id for letter in found if letter.id.startswith(prefix)]


def expired(metrics: Metrics, stage: str, reason: str) -> float:
    value = metrics.registry.get_sample_value(
        "relay_dead_letters_expired_total", {"stage": stage, "reason": reason}
    )
    return value or 0.0


async def purge_all(store: SqlStore) -> None:
    await DeadLetters(store).purge(DeadLetterFilter())


async def test_dead_letters_past_the_age_bound_go_counted_and_logged(store: SqlStore) -> None:
    await purge_all(store)
    old = [await bury(store, "outbound", (3 - i) * HOUR, "age") for i in range(2)]
    young = [await bury(store, "outbound", 60, "age") for _ in range(2)]
    old_inbound = await bury(store, "inbound", 3 * HOUR, "age")
    metrics = Metrics()

    with capture_logs() as logs:
        done = await enforce(store, Bounds(max_age=HOUR, max_length=0), metrics, time.time())

    assert done == {"inbound": 1, "outbound": 2}
    assert expired(metrics, "outbound", "age") == 2
    assert expired(metrics, "inbound", "age") == 1
    lines = [line for line in logs if line["event"] == "dead_letter_expired"]
    assert [line.get("delivery_id") for line in lines if line["stage"] == "outbound"] == old
    [inbound] = [line for line in lines if line["stage"] == "inbound"]
    assert inbound["message_id"] == old_inbound
    assert inbound["integration_id"] == f"int-{old_inbound}"
    assert inbound["conversation_id"] == f"conv-{old_inbound}"
    assert (inbound["reason"], inbound["dead_reason"], inbound["log_level"]) == (
        "age",
        "the bot failed",
        "warning",
    )
    assert inbound["age"] >= 3 * HOUR
    assert sorted(await left(store, "outbound", "age")) == sorted(young)
    assert await left(store, "inbound", "age") == []


async def test_the_length_bound_takes_the_oldest(store: SqlStore) -> None:
    await purge_all(store)
    letters = [await bury(store, "outbound", 600 - i, "len") for i in range(5)]
    metrics = Metrics()

    with capture_logs() as logs:
        done = await enforce(store, Bounds(max_age=HOUR, max_length=3), metrics, time.time())

    assert done["outbound"] == 2
    assert expired(metrics, "outbound", "length") == 2
    assert expired(metrics, "outbound", "age") == 0
    lines = [line for line in logs if line["event"] == "dead_letter_expired"]
    assert [(line["delivery_id"], line["reason"]) for line in lines] == [
        (letters[0], "length"),
        (letters[1], "length"),
    ]
    assert await left(store, "outbound", "len") == letters[2:]


async def test_no_bounds_touch_nothing(store: SqlStore) -> None:
    await purge_all(store)
    letters = [await bury(store, "outbound", 30 * 24 * HOUR - i, "none") for i in range(2)]

    done = await enforce(store, Bounds(max_age=0, max_length=0), Metrics(), time.time())

    assert done == {"inbound": 0, "outbound": 0}
    assert await left(store, "outbound", "none") == letters
