"""The mechanisms under the fair limits, each on its own: counted slots per key, the client
address behind proxies, token buckets bounded in memory and shared ones asked no more than
they must (both stores), the directory's bounded cache (both stores), and history pages
bounded in bytes (both stores)."""

from __future__ import annotations

import uuid
from ipaddress import ip_network

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from multidict import CIMultiDict

from relay.errors import RateLimited
from relay.ingress.clients import client_address
from relay.ingress.conversations import item_json
from relay.ingress.limits import Claim, Slots, take_all
from relay.ingress.paging import READ_ROWS, Scope, read_page
from relay.ingress.ratelimit import IntegrationLimit, RateLimiter
from relay.rates import SharedRates
from relay.settings import Settings
from relay.store import IntegrationRecord, SqlStore, Taken, TokenKind
from relay.store.directory import Directory
from tests.helpers import make_integration, start_ingress

# -- slots ---------------------------------------------------------------------------------


def test_slots_are_taken_together_or_not_at_all_and_given_back():
    pool, per_key = Slots("pool", 3), Slots("per_key", 2)
    with take_all([Claim(per_key, "a"), Claim(pool, "")]) as full:
        assert full is None
        with take_all([Claim(per_key, "a"), Claim(pool, "")]) as full:
            assert full is None
            with take_all([Claim(per_key, "a"), Claim(pool, "")]) as full:
                # a's share is used up: nothing is taken, the narrowest full limit is named
                assert full is per_key
                assert (pool.total(), per_key.held("a")) == (2, 2)
            with take_all([Claim(per_key, "b"), Claim(pool, "")]) as full:
                assert full is None
                with take_all([Claim(per_key, "c"), Claim(pool, "")]) as full:
                    assert full is pool
    assert (pool.total(), per_key.total(), per_key.held("a")) == (0, 0, 0)


def test_a_slot_is_given_back_when_its_holder_fails():
    slots = Slots("one", 1)
    with pytest.raises(RuntimeError), take_all([Claim(slots, "k")]):
        raise RuntimeError
    assert not slots.full("k")


# -- client addresses --------------------------------------------------------------------------


class _Transport:
    """What aiohttp asks of a transport to tell the peer."""

    def __init__(self, peer: str) -> None:
        self._peer = peer

    def get_extra_info(self, name: str, default: object = None) -> object:
        return (self._peer, 40000) if name == "peername" else default


def request_from(peer: str, *forwarded: str) -> web.Request:
    headers = CIMultiDict([("X-Forwarded-For", value) for value in forwarded])
    return make_mocked_request("GET", "/", headers=headers, transport=_Transport(peer))


PROXIES = [ip_network("10.0.0.0/8"), ip_network("fd00::/8")]


@pytest.mark.parametrize(
    ("peer", "forwarded", "client"),
    [
        ("198.51.100.4", ["203.0.113.9"], "198.51.100.4"),  # not a proxy: ignored
        ("10.0.0.2", ["203.0.113.9"], "203.0.113.9"),
        ("10.0.0.2", ["1.1.1.1, 203.0.113.9, 10.0.0.3"], "203.0.113.9"),
        ("10.0.0.2", ["1.1.1.1", "203.0.113.9"], "203.0.113.9"),  # headers in order
        ("10.0.0.2", [], "10.0.0.2"),
        ("10.0.0.2", ["10.0.0.7, 10.0.0.3"], "10.0.0.7"),  # all trusted: the first
        ("10.0.0.2", ["203.0.113.9:5555"], "203.0.113.9"),
        ("10.0.0.2", ["[2001:db8:a:b::1]:443"], "2001:db8:a:b::/64"),
        ("fd00::1", ["::ffff:203.0.113.9"], "203.0.113.9"),
        ("2001:db8:a:b:c:d:e:f", [], "2001:db8:a:b::/64"),
        ("10.0.0.2", ["unknown"], "unknown"),
    ],
)
def test_the_client_is_the_right_most_address_no_trusted_proxy_wrote(
    peer: str, forwarded: list[str], client: str
):
    assert client_address(request_from(peer, *forwarded), PROXIES) == client


# -- token buckets -------------------------------------------------------------------------


def test_a_limiter_keeps_a_bounded_number_of_buckets_least_recent_out():
    now = [0.0]
    limiter = RateLimiter(rate=1, burst=1, clock=lambda: now[0], max_keys=2)
    assert limiter.check("a") == 0
    assert limiter.check("b") == 0
    assert limiter.wait("a") > 0  # used recently: kept (and now the most recent)
    assert limiter.check("c") == 0  # pushes out b, the least recent
    assert limiter.wait("a") > 0
    assert limiter.wait("b") == 0  # forgotten: a full bucket again
    assert len(limiter._buckets) == 2


class CountingBuckets:
    """The real store's shared buckets, counting the calls made to them."""

    def __init__(self, store: SqlStore) -> None:
        self._store = store
        self.keys: list[str] = []

    async def take_tokens(
        self, key: str, rate: float, burst: float, wanted: int, now: float
    ) -> Taken:
        self.keys.append(key)
        return await self._store.take_tokens(key, rate, burst, wanted, now)


async def test_an_empty_shared_bucket_is_not_asked_again_before_its_next_token(store: SqlStore):
    """A client over its rate costs the store one call per token at a low rate (a lease of
    one), not one per refusal; the store is asked again at the latest after a lease's life
    (should the rate have changed)."""
    buckets, clock = CountingBuckets(store), [1_800_000_000.0]
    rates = SharedRates(buckets, lease_seconds=0.1, lease_life=1.0, clock=lambda: clock[0])
    key = f"empty-{uuid.uuid4().hex[:8]}"
    assert [await rates.take(key, 2.0, 2) for _ in range(2)] == [0.0, 0.0]  # the burst
    waits = [await rates.take(key, 2.0, 2) for _ in range(50)]
    assert waits[0] == pytest.approx(0.5)
    assert all(0 < wait <= 0.5 for wait in waits)
    assert len(buckets.keys) == 3  # two leases of one token, one refusal from the store
    clock[0] += 0.5
    assert await rates.take(key, 2.0, 2) == 0.0  # the next token, from the store
    assert len(buckets.keys) == 4
    slow = f"slow-{uuid.uuid4().hex[:8]}"
    assert await rates.take(slow, 0.01, 1) == 0.0
    assert await rates.take(slow, 0.01, 1) == pytest.approx(100)
    clock[0] += 1.0
    assert await rates.take(slow, 0.01, 1) == pytest.approx(99)  # asked again: still empty
    assert len(buckets.keys) == 7


async def test_a_flood_over_a_high_rate_asks_the_store_once_per_lease_time(store: SqlStore):
    """At 100 per second (leases of 10 over 0.1 s), a process flooded with requests asks an
    empty bucket again only once a lease's worth has come: a lease and at most one refusal
    from the store each tenth of a second, however many requests it refuses."""
    buckets, clock = CountingBuckets(store), [1_800_000_000.0]
    rates = SharedRates(buckets, lease_seconds=0.1, lease_life=1.0, clock=lambda: clock[0])
    key = f"flood-{uuid.uuid4().hex[:8]}"
    granted = 0
    for _ in range(1000):  # 1,000 requests a second for a second
        clock[0] += 0.001
        wait = await rates.take(key, 100.0, 10)
        granted += wait == 0
        assert wait >= 0
    assert len(buckets.keys) <= 22, len(buckets.keys)  # not 1,000
    assert 100 <= granted <= 110, granted  # the burst and the rate: it holds, and no less


async def test_an_integration_limit_of_zero_never_asks_the_store(store: SqlStore):
    buckets = CountingBuckets(store)
    off = IntegrationLimit(SharedRates(buckets), rate=0, burst=1)
    for _ in range(100):
        await off.enforce("integration")
    assert buckets.keys == []
    on = IntegrationLimit(SharedRates(buckets), rate=0.01, burst=1)
    integration = f"i-{uuid.uuid4().hex[:8]}"
    await on.enforce(integration)
    with pytest.raises(RateLimited) as refused:
        await on.enforce(integration)
    assert refused.value.headers == {"Retry-After": "100"}
    # The ingress's buckets are named apart from the delivery pace's.
    assert buckets.keys == [f"ingress:{integration}"] * 2


# -- the directory -------------------------------------------------------------------------


class CountingLookup:
    """The real store, counting what the directory asks of it."""

    def __init__(self, store: SqlStore) -> None:
        self._store = store
        self.asked: list[str] = []

    async def get_integration(self, integration_id: str) -> IntegrationRecord | None:
        self.asked.append(integration_id)
        return await self._store.get_integration(integration_id)

    async def active_token_hashes(self, integration_id: str, kind: TokenKind) -> list[str]:
        return await self._store.active_token_hashes(integration_id, kind)


@pytest.fixture
def clock() -> list[float]:
    return [0.0]


async def test_the_directory_evicts_the_least_recently_used_integration(
    store: SqlStore, settings: Settings, clock: list[float]
):
    lookup = CountingLookup(store)
    directory = Directory(lookup, ttl=60, size=2, clock=lambda: clock[0])
    a, b, c = [(await make_integration(store, settings, name=n))[0] for n in "abc"]
    for integration_id in (a, b, a, c, a, b):
        entry = await directory.lookup(integration_id, "integration")
        assert entry.integration is not None
        assert entry.integration.id == integration_id
    # a stayed (used again before c came); b was the least recent when c came, and again
    # when it came back
    assert lookup.asked == [a, b, c, b]
    assert len(directory) == 2


async def test_unknown_ids_are_remembered_apart_and_never_push_out_known_ones(
    store: SqlStore, settings: Settings, clock: list[float]
):
    lookup = CountingLookup(store)
    directory = Directory(lookup, ttl=60, size=2, clock=lambda: clock[0])
    known, _ = await make_integration(store, settings, name="known")
    await directory.lookup(known, "integration")
    stranger = uuid.uuid4().hex
    for _ in range(5):
        assert (await directory.lookup(stranger, "integration")).integration is None
    assert lookup.asked == [known, stranger]  # asked once while remembered
    for _ in range(50):  # a flood of made-up ids
        await directory.lookup(uuid.uuid4().hex, "integration")
    asked = len(lookup.asked)
    assert (await directory.lookup(known, "integration")).integration is not None
    assert len(lookup.asked) == asked  # still cached
    assert len(directory) == 3  # one known, two unknown: bounded
    clock[0] = 61
    await directory.lookup(known, "integration")
    assert len(lookup.asked) == asked + 1  # expired: asked again


# -- history pages ---------------------------------------------------------------------------


async def test_pages_stop_before_the_item_that_would_pass_the_bound(
    store: SqlStore, settings: Settings
):
    """Read straight from the store: the bound in bytes, at least one item, the watermark
    of the last item."""
    integration_id, token = await make_integration(store, settings, name="pages")
    conv = f"conv-{uuid.uuid4().hex[:8]}"
    sizes = [30_000, 30_000, 30_000, 90_000, 10]
    async with start_ingress(settings) as ingress:
        for i, size in enumerate(sizes):
            body = {
                "userId": "u",
                "messageId": f"{conv}-{i}",
                "conversationId": conv,
                "type": "text",
                "text": "x" * size,
            }
            status, _ = await ingress.post(integration_id, token, body)
            assert status == 200
    conversation = await store.find_conversation(integration_id, conv)
    assert conversation is not None
    scope: Scope = ("conversation", conversation)
    pages: list[tuple[int, bool]] = []
    after = None
    while True:
        page = await read_page(store, scope, after, 100, 70_000, item_json)
        if not page.chunks:
            break
        assert sum(map(len, page.chunks)) <= 70_000 or len(page.chunks) == 1
        pages.append((len(page.chunks), page.more))
        after = page.watermark
    # 30+30 (the next 30 would pass) | 30 (90 would) | 90, alone | the small one, the end
    assert pages == [(2, True), (1, True), (1, True), (1, False)]
    every = await read_page(store, scope, None, 100, 10_000_000, item_json)
    assert len(every.chunks) == 5
    assert every.watermark == after


async def test_a_long_page_is_read_from_the_store_in_parts(store: SqlStore, settings: Settings):
    integration_id, token = await make_integration(store, settings, name="long")
    conv = f"conv-{uuid.uuid4().hex[:8]}"
    async with start_ingress(settings) as ingress:
        for i in range(READ_ROWS + 5):
            body = {
                "userId": "u",
                "messageId": f"{conv}-{i}",
                "conversationId": conv,
                "type": "text",
                "text": "hi",
            }
            status, _ = await ingress.post(integration_id, token, body)
            assert status == 200
    conversation = await store.find_conversation(integration_id, conv)
    assert conversation is not None
    page = await read_page(store, ("conversation", conversation), None, 1000, 1_000_000, item_json)
    assert len(page.chunks) == READ_ROWS + 5
    assert not page.more
