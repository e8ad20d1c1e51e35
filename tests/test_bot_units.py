"""Pure pieces of the bot side: parking, lanes, reply tokens, Rasa answers."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import cast

import pytest
import structlog.testing
from aio_pika.abc import AbstractChannel

from relay.auth import reply_token, reply_token_valid
from relay.pipeline import settle
from relay.pipeline.lanes import Lanes
from relay.pipeline.parking import Parking, still_waiting
from relay.pipeline.subscription import Subscription
from relay.pipeline.waiting import WaitingRoom
from relay.store import Unfinished
from tests.helpers import eventually
from workers.bot.adapters.http import replies_of


def test_a_head_that_never_comes_back_stops_holding_its_conversation():
    now = [0.0]
    parking = Parking(grace=10, clock=lambda: now[0])
    parking.delay_head("c", "lost", 5.0)  # e.g. the broker dead-lettered it meanwhile
    assert parking.wait_behind("c", "next") == 5.0
    now[0] = 14.0
    assert parking.wait_behind("c", "after") == 5.0  # still within delay + grace
    now[0] = 16.0
    assert parking.wait_behind("c", "next") is None  # overdue: the next one leads
    assert parking.parked("c") == ["next", "after"]


def test_followers_wait_behind_a_failing_head_and_take_over_in_order():
    now = [0.0]
    parking = Parking(clock=lambda: now[0])
    assert parking.wait_behind("c", "m1") is None  # nothing parked: go ahead
    parking.delay_head("c", "m1", 1.0)  # m1 failed, waits 1 s
    assert parking.wait_behind("c", "m2") == 1.0
    assert parking.wait_behind("c", "m3") == 1.0
    assert parking.wait_behind("other", "x") is None  # other conversations are not held
    now[0] = 1.0  # m1 is back and tried again
    parking.delay_head("c", "m1", 5.0)  # failed again: now a longer wait
    assert parking.wait_behind("c", "m2") == 5.0  # m2 came back: waits again
    assert parking.parked("c") == ["m1", "m2", "m3"]
    parking.done("c", "m1")
    assert parking.wait_behind("c", "m2") is None  # the new head goes
    assert parking.wait_behind("c", "m3") == 5.0
    parking.done("c", "m2")
    parking.done("c", "m3")
    assert parking.parked("c") == []
    assert parking.wait_behind("c", "m4") is None


def test_parked_messages_come_back_with_the_messages_ahead_of_them():
    now = [0.0]
    parking = Parking(clock=lambda: now[0])
    parking.delay_head("c", "m1", 2.0)  # the head is back at 2.0
    now[0] = 0.5
    assert parking.wait_behind("c", "m2") == 1.5  # parked to be back with the head
    parking.sent_away("c", "m2", 1.5)
    now[0] = 1.0
    assert parking.wait_behind("c", "m3") == 1.0
    parking.sent_away("c", "m3", 0.5)  # the longest delay queue that fits: back early
    now[0] = 1.5
    assert parking.wait_behind("c", "m3") == 0.5  # so it waits the rest
    parking.sent_away("c", "m3", 0.5)
    now[0] = 2.0
    parking.done("c", "m1")  # the head made it: the next one is due back now
    assert parking.wait_behind("c", "m2") is None
    now[0] = 2.25
    # Everything ahead should be back, yet is not done (m2 is being tried, since 2.0): as
    # long again as that took so far, not a busy loop through the shortest queue.
    assert parking.wait_behind("c", "m3") == 0.25
    parking.sent_away("c", "unparked", 1.0)  # not parked: nothing to remember
    assert parking.parked("c") == ["m2", "m3"]
    # How far back each is (one not parked would come last).
    assert [parking.place("c", m) for m in ("m2", "m3", "x")] == [0, 1, 2]


def test_a_head_delayed_again_is_never_parked_twice():
    parking = Parking(clock=lambda: 0.0)
    parking.delay_head("c", "m1", 1.0)
    assert parking.wait_behind("c", "m2") == 1.0
    parking.delay_head("c", "m2", 1.0)  # (only a head should be; never a duplicate)
    assert parking.parked("c") == ["m2", "m1"]
    parking.done("c", "m2")
    parking.done("c", "m1")
    assert parking.parked("c") == []


def test_a_skipped_sequence_number_sends_the_worker_to_the_store_again():
    subscription = Subscription(0, cast(AbstractChannel, None))  # the channel is not used
    assert subscription.first_sight("c", 5)  # met for the first time
    assert not subscription.first_sight("c", 6)
    assert not subscription.first_sight("c", 3)  # an earlier one (sent again): no gap
    assert subscription.first_sight("c", 8)  # 7 not seen: it may still be on its way
    assert not subscription.first_sight("c", 7)
    assert not subscription.first_sight("c", 9)
    subscription.unsee("c")  # the look-up failed: asked again
    assert subscription.first_sight("c", 10)
    assert subscription.first_sight("d")  # a stage without numbers: the first sight only
    assert not subscription.first_sight("d")
    assert not subscription.first_sight("d", 7)


def test_parking_found_in_the_store_replaces_what_the_worker_remembered():
    parking = Parking(clock=lambda: 0.0)
    # Parked here during an earlier tenure of the partition; finished since by another
    # worker: the store no longer lists it, and it must not hold the conversation.
    parking.delay_head("c", "m0", 1.0)
    parking.adopt("c", ["m1", "m2"], 3.0)
    assert parking.parked("c") == ["m1", "m2"]
    assert parking.wait_behind("c", "m6") == 3.0
    assert parking.wait_behind("c", "m1") is None  # the head found in the store goes first
    parking.done("c", "m1")
    parking.done("c", "m2")
    assert parking.wait_behind("c", "m6") is None  # parked behind them, it leads now
    parking.done("c", "m6")
    parking.delay_head("d", "x", 1.0)
    parking.adopt("d", [], 3.0)  # nothing found: nothing held
    assert parking.wait_behind("d", "y") is None
    parking.delay_head("e", "z", 1.0)
    parking.forget(["e"])
    assert parking.conversations() == []


def test_the_parking_found_in_the_store_is_every_earlier_message_not_finished():
    now = datetime(2026, 1, 1, tzinfo=UTC)

    def row(n: int, retry_in: float | None) -> Unfinished:
        retry_at = None if retry_in is None else now + timedelta(seconds=retry_in)
        return Unfinished(message_id=f"m{n}", retry_at=retry_at)

    never_tried, long_overdue, waiting, parked = row(1, None), row(2, -700), row(3, 5), row(4, None)
    found = [never_tried, long_overdue, waiting, parked]
    # Parked behind a failing head and never tried, it is still on its way: it leads, now.
    assert still_waiting(found, now, grace=600) == (now, [never_tried, waiting, parked])
    assert still_waiting(found, now, grace=800) == (now, found)
    assert still_waiting([long_overdue, waiting, parked], now, grace=600) == (
        waiting.retry_at,
        [waiting, parked],
    )
    assert still_waiting([long_overdue], now, grace=600) is None  # given up
    assert still_waiting([], now, grace=600) is None


async def test_lanes_keep_order_per_key_and_run_keys_concurrently():
    seen: list[str] = []
    running = 0
    peak = 0

    async def handle(item: str) -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.01 if item.endswith("0") else 0)
        seen.append(item)
        running -= 1

    lanes: Lanes[str] = Lanes(handle, concurrency=3)
    for n in range(5):
        for key in "abcd":
            lanes.submit(key, f"{key}{n}")
    assert await lanes.drain(5)
    for key in "abcd":
        assert [item for item in seen if item[0] == key] == [f"{key}{n}" for n in range(5)]
    assert peak == 3  # bounded, and more than one at a time
    assert lanes.busy == 0


async def test_a_stuck_lane_says_where_it_waits():
    gate = asyncio.Event()

    async def wait_for_the_gate(item: str) -> None:
        await gate.wait()

    lanes: Lanes[str] = Lanes(wait_for_the_gate, concurrency=2)
    lanes.submit("held", "x")
    await asyncio.sleep(0)  # the lane starts its item
    await asyncio.sleep(0)
    assert lanes.stuck(60) == {}
    [(key, chain)] = lanes.stuck(0).items()
    assert key == "held"
    assert chain[0].endswith(" _run")
    assert any(line.endswith(" wait_for_the_gate") for line in chain)
    assert any("asyncio/locks.py" in line and line.endswith(" wait") for line in chain)
    gate.set()
    assert await lanes.drain(5)
    assert lanes.stuck(0) == {}


async def test_an_ack_that_never_answers_lets_its_lane_go(monkeypatch: pytest.MonkeyPatch):
    # aiormq waits for room in the write queue of a connection that died, for ever.
    monkeypatch.setattr(settle, "ACK_TIMEOUT", 0.05)
    never: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    with structlog.testing.capture_logs() as logs:
        await asyncio.wait_for(settle.quietly(never), 5)
    assert [line["event"] for line in logs] == ["ack_failed"]
    assert never.cancelled()


def test_reply_tokens_are_scoped_and_expire():
    token = reply_token("secret", "conv-1", expires=2000)
    assert token.startswith("rlyr_")
    assert reply_token_valid("secret", token, "conv-1", now=1999)
    assert not reply_token_valid("secret", token, "conv-1", now=2000)  # expired
    assert not reply_token_valid("secret", token, "conv-2", now=1)  # another conversation
    assert not reply_token_valid("other", token, "conv-1", now=1)  # another secret
    assert not reply_token_valid("secret", token[:-2] + "xx", "conv-1", now=1)
    assert not reply_token_valid("secret", "rlyr_garbage", "conv-1", now=1)


def test_bot_answers_in_botpress_and_rasa_shapes():
    assert replies_of(None) == []
    assert replies_of({"text": "not a list"}) == []
    assert replies_of(
        [
            {"type": "text", "payload": {"text": "a"}},
            {"text": "b"},
            {"image": "https://x/i.png", "text": "c"},
            {"text": "d", "buttons": [{"title": "Yes", "payload": "/yes"}]},
            {"custom": {"type": "video", "payload": {"videoUrl": "https://x/v.mp4"}}},
            {"custom": {"anything": 1}},
            {"attachment": "https://x/f.pdf"},
            "ignored",
        ]
    ) == [
        ("text", {"text": "a"}),
        ("text", {"text": "b"}),
        ("text", {"text": "c"}),
        ("image", {"imageUrl": "https://x/i.png"}),
        ("choice", {"text": "d", "options": [{"label": "Yes", "value": "/yes"}]}),
        ("video", {"videoUrl": "https://x/v.mp4"}),
        ("custom", {"anything": 1}),
        ("file", {"fileUrl": "https://x/f.pdf"}),
    ]


async def test_the_waiting_room_resumes_a_conversation_when_its_head_moves_on():
    resumed: list[tuple[str, str]] = []
    room: WaitingRoom[str] = WaitingRoom(lambda c, item: resumed.append((c, item)), capacity=2)
    first, second, newer = object(), object(), object()  # subscriptions
    assert room.hold("c", 0, first, "m2", 0.05, place=1)
    assert room.hold("c", 0, first, "m3", 0.05, place=1)
    assert not room.hold("d", 0, first, "x", 0.05, place=1)  # the partition's room is full
    assert room.hold("d", 1, second, "y", 0.05, place=1)  # another partition has its own
    assert not room.hold("e", 1, second, "long", 5.0, place=1)  # a long wait: a delay queue
    assert not room.hold("e", 1, second, "far", 0.05, place=9)  # far back: a delay queue
    room.release("c")  # the head is done: both look again, in the order they came
    assert resumed == [("c", "m2"), ("c", "m3")]
    assert room.count(0) == 0
    assert room.hold("d", 1, newer, "z", 0.05, place=1)  # the partition's next subscription
    room.forget(second)  # the old channel is gone: the broker has its messages back
    assert room.count(1) == 1  # what came through the new one stays
    assert room.hold("f", 0, first, "later", 0.1, place=1)  # its timer runs after the others
    await eventually(lambda: _true(("f", "later") in resumed))
    # Nothing resumed twice, nothing forgotten came back.
    assert resumed == [("c", "m2"), ("c", "m3"), ("d", "z"), ("f", "later")]


async def test_a_wait_in_the_waiting_room_ends_by_itself():
    resumed: list[str] = []
    room: WaitingRoom[str] = WaitingRoom(lambda _, item: resumed.append(item), capacity=4)
    assert room.hold(
        "c", 0, object(), "m2", 0.0, place=1
    )  # at least the minimum wait: no busy loop
    assert resumed == []
    await eventually(lambda: _true(resumed == ["m2"]))
    assert room.count(0) == 0
    room.close()
    # A stopping worker's room holds nothing more: its parked messages go to a delay queue.
    assert not room.hold("c", 0, object(), "m3", 0.5, place=1)


async def _true(value: bool) -> bool:
    return value
