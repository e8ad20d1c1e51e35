"""Pure pieces of delivery: backoff, Retry-After, hops, the circuit breaker, the SSRF guard."""

from __future__ import annotations

import asyncio
import ipaddress
import random
import time
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest

from relay.pipeline.breaker import Breakers, State, endpoint_of
from relay.pipeline.delays import hop
from relay.pipeline.settle import Outcome, Verdict
from relay.ssrf import EndpointRefused, GuardedResolver, check_url, is_public
from relay.wire import DUE_HEADER, OutboundEnvelope
from workers.delivery.attempt_log import record
from workers.delivery.backoff import jittered, next_delay, parse_retry_after
from workers.delivery.judging import permanent, wait_for
from workers.delivery.sender import Sent

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
OUTBOUND = {
    "integrationId": "int_1",
    "deliveryId": "dlv_1",
    "createdAt": NOW.isoformat(),
    "body": {
        "type": "text",
        "payload": {"text": "hi"},
        "conversationId": "c1",
        "botpressUserId": "u1",
        "botpressMessageId": "msg_1",
        "botpressConversationId": "conv_1",
        "sequence": 1,
    },
}


def test_jitter_stays_within_twenty_percent_and_varies():
    rng = random.Random(7)
    values = [jittered(100, rng) for _ in range(500)]
    assert min(values) >= 80
    assert max(values) <= 120
    assert max(values) - min(values) > 30


def test_retry_after_in_seconds_or_as_a_date():
    assert parse_retry_after("120", NOW) == 120
    assert parse_retry_after(
        format_datetime(NOW + timedelta(seconds=90), usegmt=True), NOW
    ) == pytest.approx(90)
    assert parse_retry_after(format_datetime(NOW - timedelta(hours=1), usegmt=True), NOW) == 0
    assert parse_retry_after(None, NOW) is None
    assert parse_retry_after("soon", NOW) is None


def test_next_delay_honours_retry_after_up_to_twice_the_schedule_and_the_penalty():
    rng = random.Random(1)
    assert 4 <= next_delay(5, None, False, 30, rng) <= 6
    assert next_delay(5, 7, False, 30, rng) == 7  # honoured
    assert next_delay(5, 3600, False, 30, rng) == 10  # clamped to twice the schedule
    assert next_delay(5, None, True, 30, rng) == 30  # timeout or 429: at least the penalty
    assert next_delay(300, None, True, 30, rng) >= 240  # the schedule when it is longer


def test_waits_hop_through_fixed_delay_queues():
    queues = [1, 5, 30, 300]
    assert hop(0, queues) is None
    assert hop(0.5, queues) == 1  # shorter than any queue: the shortest
    assert hop(7, queues) == 5
    assert hop(4000, queues) == 300
    remaining, hops = 4000.0, 0
    while (step := hop(remaining, queues)) is not None:
        remaining -= step
        hops += 1
    assert hops == 13 + 3 + 2  # 13x300, 3x30, 2x5 (and 0 left)


def test_breaker_opens_after_failures_probes_once_then_closes():
    now = [0.0]
    breakers = Breakers(threshold=3, cooldown=10, cap=2, clock=lambda: now[0])
    endpoint = endpoint_of("https://shop.example.com/hook?x=1")
    assert endpoint == "https://shop.example.com:443"
    for _ in range(3):
        assert breakers.acquire(endpoint) is None
        breakers.release(endpoint, success=False)
    assert breakers.state(endpoint) is State.OPEN
    assert breakers.acquire(endpoint) == pytest.approx(10)
    now[0] = 10
    assert breakers.state(endpoint) is State.HALF_OPEN
    assert breakers.acquire(endpoint) is None  # the probe
    assert breakers.acquire(endpoint) is not None  # only one probe at a time
    breakers.release(endpoint, success=False)  # the probe failed: open again
    assert breakers.state(endpoint) is State.OPEN
    now[0] = 20
    assert breakers.acquire(endpoint) is None
    breakers.release(endpoint, success=True)
    assert breakers.state(endpoint) is State.CLOSED


def test_breaker_caps_in_flight_deliveries_per_endpoint():
    breakers = Breakers(threshold=3, cooldown=10, cap=2)
    assert breakers.acquire("a") is None
    assert breakers.acquire("a") is None
    assert breakers.acquire("a") is not None  # at the cap
    assert breakers.acquire("b") is None  # other endpoints are not held up
    breakers.release("a", success=True)
    assert breakers.acquire("a") is None


REFUSED = [
    "127.0.0.1",
    "10.0.0.1",
    "172.16.5.4",
    "192.168.0.1",
    "169.254.169.254",
    "100.64.0.1",
    "0.0.0.0",
    "224.0.0.1",
    "240.0.0.1",
    "255.255.255.255",
    "::1",
    "fc00::1",
    "fd12::1",
    "fe80::1",
    "ff02::1",
    "::ffff:10.0.0.1",
    "2002:0a00:0001::",
    "64:ff9b::a00:1",
    "::",
    "::127.0.0.1",
    "fec0::1",
]
ALLOWED = [
    "8.8.8.8",
    "1.1.1.1",
    "2606:4700:4700::1111",
    "::ffff:8.8.8.8",
    "2002:0808:0808::",
    "64:ff9b::808:808",
]


@pytest.mark.parametrize("address", REFUSED)
def test_ssrf_refuses_non_public_addresses(address: str):
    assert not is_public(ipaddress.ip_address(address))
    with pytest.raises(EndpointRefused):
        check_url(
            f"http://[{address}]/hook" if ":" in address else f"http://{address}/hook",
            [],
            https_only=False,
        )


@pytest.mark.parametrize("address", ALLOWED)
def test_ssrf_allows_public_addresses(address: str):
    assert is_public(ipaddress.ip_address(address))


def test_ssrf_allowlist_scheme_and_https_only():
    local = [ipaddress.ip_network("127.0.0.0/8")]
    check_url("http://127.0.0.1:8090/r", local, https_only=False)
    with pytest.raises(EndpointRefused):
        check_url("http://127.0.0.1:8090/r", local, https_only=True)
    with pytest.raises(EndpointRefused):
        check_url("ftp://example.com/r", [], https_only=False)
    check_url("https://example.com/r", [], https_only=True)  # names are checked at connect


def test_ssrf_checks_what_a_name_resolves_to():
    async def resolve(networks: list[ipaddress.IPv4Network]) -> list[str]:
        resolver = GuardedResolver(networks)
        try:
            return [r["host"] for r in await resolver.resolve("localhost", 80)]
        finally:
            await resolver.close()

    with pytest.raises(EndpointRefused):
        asyncio.run(resolve([]))
    assert asyncio.run(resolve([ipaddress.ip_network("127.0.0.0/8")])) == ["127.0.0.1"]


def test_only_the_4xx_an_endpoint_answers_again_are_permanent():
    assert all(permanent(status) for status in (400, 404, 410, 422))
    assert not any(permanent(status) for status in (408, 409, 425, 429, 500, 503, None))


def test_a_wait_holds_the_order_and_says_when_it_ends():
    before = time.time()
    verdict = wait_for(45.0, "not due yet", [1.0, 10.0, 60.0])
    assert (verdict.outcome, verdict.delay, verdict.holds_order) == (Outcome.WAIT, 10.0, True)
    due = verdict.headers[DUE_HEADER]
    assert isinstance(due, int)
    assert int((before + 45) * 1000) <= due <= (time.time() + 45) * 1000


def test_an_attempt_row_notes_the_next_attempt_only_for_a_retry():
    envelope = OutboundEnvelope.model_validate(OUTBOUND)
    sent = Sent(status=503, latency_ms=12.5, error=None, body="busy")
    due = int(NOW.timestamp() * 1000)
    retry = record(envelope, sent, Verdict(Outcome.RETRY, headers={DUE_HEADER: due}))
    assert retry.next_attempt_at == NOW
    assert (retry.delivery_id, retry.attempt, retry.status) == ("dlv_1", 0, 503)
    assert (retry.response_body, retry.latency_ms) == ("busy", 12.5)
    waited = record(envelope, sent, Verdict(Outcome.WAIT, headers={DUE_HEADER: due}))
    assert waited.next_attempt_at is None
