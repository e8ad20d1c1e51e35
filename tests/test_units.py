"""Plain functions with (almost) no I/O: auth, rate limiting, models, settings, partitioning,
signing, telling cancellations apart."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
from pydantic import ValidationError
from standardwebhooks import Webhook

from relay.aio import cancel_and_wait, cancelled_from_outside, pause
from relay.auth import bearer_token, hash_token, new_signing_secret, new_token, token_matches
from relay.broker import Topology, partition_of
from relay.ingress.ratelimit import RateLimiter, retry_after
from relay.lru import Lru
from relay.retry import pauses
from relay.settings import Settings, describe_error
from relay.signing import signature_headers
from relay.store.postgres import numbered, split_schema
from relay.store.sqlite import sqlite_path, to_db
from relay.wire import InboundRequest, Message, Tags
from tests.helpers import message


@pytest.mark.parametrize(
    ("header", "token"),
    [
        ("Bearer abc", "abc"),
        ("bearer abc", "abc"),
        ("BEARER  abc ", "abc"),
        (None, None),
        ("", None),
        ("Bearer", None),
        ("Bearer ", None),
        ("Basic abc", None),
        ("Bearer a b", None),
        ("abc", None),
    ],
)
def test_bearer_token(header: str | None, token: str | None):
    assert bearer_token(header) == token


def test_token_matches_any_active_hash_only():
    token = new_token()
    assert token.startswith("rly_")
    assert len(token) > 40
    hashes = [hash_token("other"), hash_token(token)]
    assert token_matches(token, hashes)
    assert not token_matches("wrong", hashes)
    assert not token_matches(None, hashes)
    assert not token_matches(token, [])
    assert not token_matches("", [hash_token("")])


def test_signing_secret_is_standard_webhooks():
    secret = new_signing_secret()
    assert secret.startswith("whsec_")
    Webhook(secret)  # decodes


def test_rate_limiter_allows_bursts_then_refills():
    now = [0.0]
    limiter = RateLimiter(rate=2, burst=3, clock=lambda: now[0])
    assert [limiter.check("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    wait = limiter.check("a")
    assert wait == pytest.approx(0.5)
    assert limiter.check("b") == 0.0  # buckets are per integration
    now[0] = 0.5
    assert limiter.check("a") == 0.0
    assert limiter.check("a") > 0
    assert retry_after(0.2) == "1"
    assert retry_after(2.1) == "3"


def test_rate_limit_zero_disables_it():
    limiter = RateLimiter(rate=0, burst=1)
    assert all(limiter.check("a") == 0 for _ in range(1000))


def test_payload_defaulting_and_fingerprint():
    plain = InboundRequest.model_validate(message(1))
    assert plain.normalized_payload() == {"text": "hello 1"}
    with_payload = InboundRequest.model_validate(message(1, payload={"imageUrl": "u"}))
    assert with_payload.normalized_payload() == {"imageUrl": "u", "text": "hello 1"}
    own_text = InboundRequest.model_validate(message(1, payload={"text": "mine"}))
    assert own_text.normalized_payload() == {"text": "mine"}
    # the fingerprint follows the normalized message, not the byte layout
    explicit = InboundRequest.model_validate(message(1, payload={"text": "hello 1"}))
    assert explicit.fingerprint() == plain.fingerprint()
    assert with_payload.fingerprint() != plain.fingerprint()
    assert InboundRequest.model_validate(message(2)).fingerprint() != plain.fingerprint()


def test_inbound_request_is_strict():
    with pytest.raises(ValidationError):
        InboundRequest.model_validate(message(1, userId=5))
    with pytest.raises(ValidationError):
        InboundRequest.model_validate(message(1, payload=[1]))
    # unknown fields are ignored, as a Botpress back end may send more
    assert InboundRequest.model_validate(message(1, extra="x")).messageId == "msg-1"


def test_timestamps_are_iso_utc_with_milliseconds():
    at = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
    item = Message(
        id="m",
        createdAt=at,
        updatedAt=at,
        tags=Tags(id="x"),
        type="text",
        payload={},
        direction="incoming",
        conversationId="c",
        userId="u",
    )
    assert json.loads(item.model_dump_json())["createdAt"] == "2026-01-02T03:04:05.678Z"


def test_partitions_are_stable_and_spread():
    assert partition_of("conversation-1", 8) == partition_of("conversation-1", 8)
    spread = {partition_of(f"c{n}", 8) for n in range(200)}
    assert spread == set(range(8))
    names = Topology("relay", 2).queue_names()
    # Each partition count is a generation of queues of its own; the default (8) keeps the
    # names it always had.
    assert names == [
        "relay.inbound.of2.0",
        "relay.inbound.of2.1",
        "relay.inbound.dead",
        "relay.outbound.of2.0",
        "relay.outbound.of2.1",
        "relay.outbound.dead",
        "relay.operations",  # of no partition count: the same under every count
    ]
    base = Topology("relay", 8)
    assert base.queue("inbound", 7) == "relay.inbound.7"
    assert base.routing_key(7) == "7"
    assert base.presence_exchange("inbound") == "relay.inbound.presence"
    grown = base.with_partitions(16)
    assert grown.queue("outbound", 15) == "relay.outbound.of16.15"
    assert grown.routing_key(15) == "of16.15"
    assert grown.exchange("outbound") == base.exchange("outbound")  # one exchange for all
    assert grown.presence_exchange("inbound") == "relay.inbound.of16.presence"


def test_signature_headers_verify_with_standardwebhooks():
    old, new = new_signing_secret(), new_signing_secret()
    body = b'{"type":"text"}'
    at = datetime.now(UTC)
    headers = signature_headers([new, old], "msg_1", body, at)
    assert headers["webhook-id"] == "msg_1"
    assert headers["webhook-timestamp"] == str(int(at.timestamp()))
    assert len(headers["webhook-signature"].split(" ")) == 2
    for secret in (old, new):
        assert Webhook(secret).verify(body, headers) == {"type": "text"}


def test_settings_defaults_and_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.chdir(tmp_path)
    defaults = Settings()
    assert defaults.amqp_url == "amqp://guest:guest@127.0.0.1:5672/"
    assert defaults.database_url == "sqlite:///relay.db"
    assert defaults.http_port == 8080
    assert defaults.public_base_url == "http://127.0.0.1:8080"
    assert defaults.bot == "echo"
    monkeypatch.setenv("RELAY_HTTP_PORT", "9000")
    monkeypatch.setenv("RELAY_ALLOWED_ENDPOINT_NETWORKS", "127.0.0.0/8, ::1/128")
    configured = Settings()
    assert configured.public_base_url == "http://127.0.0.1:9000"
    assert [str(n) for n in configured.allowed_endpoint_networks] == ["127.0.0.0/8", "::1/128"]


def test_settings_read_a_dotenv_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text(
        "RELAY_PUBLIC_URL=https://relay.example.com/\nRELAY_PARTITIONS=16\n"
    )
    settings = Settings()
    assert settings.public_base_url == "https://relay.example.com"
    assert settings.partitions == 16


@pytest.mark.parametrize(
    ("name", "value", "shown"),
    [
        ("RELAY_HTTP_PORT", "eighty", "RELAY_HTTP_PORT"),
        ("RELAY_HTTP_PORT", "70000", "RELAY_HTTP_PORT"),
        ("RELAY_DATABASE_URL", "mysql://x", "RELAY_DATABASE_URL"),
        ("RELAY_AMQP_URL", "http://x", "RELAY_AMQP_URL"),
        ("RELAY_ALLOWED_ENDPOINT_NETWORKS", "10.0.0.0/33", "RELAY_ALLOWED_ENDPOINT_NETWORKS"),
        ("RELAY_QUEUE_PREFIX", "has space", "RELAY_QUEUE_PREFIX"),
    ],
)
def test_bad_settings_name_the_variable(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, name: str, value: str, shown: str
):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError) as raised:
        Settings()
    text = describe_error(raised.value)
    assert text.startswith("invalid configuration:")
    assert shown in text


def test_bad_urls_are_not_echoed(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RELAY_AMQP_URL", "http://user:s3cret@host/")
    with pytest.raises(ValidationError) as raised:
        Settings()
    text = describe_error(raised.value)
    assert "RELAY_AMQP_URL" in text
    assert "s3cret" not in text


def test_sql_helpers():
    assert numbered("SELECT ? , ? WHERE x = ?") == "SELECT $1 , $2 WHERE x = $3"
    assert split_schema("postgresql://h/db?schema=s1&sslmode=disable") == (
        "postgresql://h/db?sslmode=disable",
        "s1",
    )
    assert split_schema("postgresql://h/db") == ("postgresql://h/db", None)
    with pytest.raises(ValueError, match="invalid schema"):
        split_schema("postgresql://h/db?schema=a;drop")
    assert sqlite_path("sqlite:///relay.db") == "relay.db"
    assert sqlite_path("sqlite:////var/lib/relay.db") == "/var/lib/relay.db"
    # fixed width, so text comparison in SQLite orders like time
    early = to_db(datetime(2026, 1, 1, tzinfo=UTC))
    late = to_db(datetime(2026, 1, 1, 0, 0, 0, 1, tzinfo=UTC))
    assert len(early) == len(late)
    assert early < late


def test_any_string_hashes_as_a_token_even_a_lone_surrogate():
    assert hash_token("\ud800") != hash_token("\ud801")
    assert len(hash_token("\ud800")) == 64


async def test_a_future_cancelled_under_a_task_is_told_from_the_task_being_cancelled():
    # aiormq cancels the confirm a publish waits for when its connection closes: that
    # CancelledError must be a failed publish, while a stop's cancel must still stop.
    seen: list[bool] = []

    async def wait_on(future: asyncio.Future[None]) -> None:
        try:
            await future
        except asyncio.CancelledError:
            seen.append(cancelled_from_outside())
            raise

    loop = asyncio.get_running_loop()
    under = loop.create_future()
    task = asyncio.create_task(wait_on(under))
    await asyncio.sleep(0)
    under.cancel()  # the library's doing
    with pytest.raises(asyncio.CancelledError):
        await task
    stopped = asyncio.create_task(wait_on(loop.create_future()))
    await asyncio.sleep(0)
    stopped.cancel()  # a stop's doing
    with pytest.raises(asyncio.CancelledError):
        await stopped
    assert seen == [False, True]


def test_the_retry_loops_back_off_doubling_up_to_a_cap():
    assert list(itertools.islice(pauses(0.5, 5.0), 6)) == [0.5, 1.0, 2.0, 4.0, 5.0, 5.0]


async def test_cancel_and_wait_ends_a_background_task() -> None:
    started = asyncio.Event()

    async def forever() -> None:
        started.set()
        await asyncio.sleep(3600)

    task = asyncio.create_task(forever())
    await started.wait()
    await asyncio.wait_for(cancel_and_wait(task), 5)
    assert task.cancelled()
    await cancel_and_wait(task)  # twice: nothing more
    await cancel_and_wait(None)  # never started


async def test_a_cancel_swallowed_by_a_library_call_still_ends_a_background_loop():
    # aio-pika catches the CancelledError of futures it cancels itself, and so may swallow
    # a stop's cancel arriving meanwhile: the loop's pause raises it again.
    inside = asyncio.Event()

    async def swallowing_call() -> None:
        inside.set()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(30)

    async def background_loop() -> None:
        while True:
            await swallowing_call()
            await pause(30)

    task = asyncio.create_task(background_loop())
    await inside.wait()
    task.cancel()
    async with asyncio.timeout(5):
        with pytest.raises(asyncio.CancelledError):
            await task


def test_an_lru_keeps_its_size_and_drops_the_least_recently_used() -> None:
    cache: Lru[str, int] = Lru(2)
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1  # read: now the most recent
    cache.put("c", 3)
    assert "b" not in cache
    assert (len(cache), cache.get("a"), cache.get("c")) == (2, 1, 3)
    cache.pop("a")
    cache.pop("a")  # gone already: nothing to do
    assert cache.get("a") is None
