"""Fair limits per tenant on a real ingress (both stores, the real broker): event streams per
token, per integration and per ingress; a stream's slot freed soon after its reader leaves;
`?wait` requests per integration and per ingress (the message accepted once either way);
history pages bounded in bytes; failed authentications limited per client address; an
integration's rate limit counted across ingresses.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import uuid
from collections.abc import AsyncIterator
from ipaddress import ip_network
from typing import Any

import aiohttp
import pytest

from relay import admin
from relay.service.app import METRICS_KEY
from relay.settings import Settings
from relay.store import SqlStore
from relay.wire import utcnow
from tests.helpers import (
    Ingress,
    Queues,
    eventually,
    make_integration,
    message,
    push_text,
    start_ingress,
)
from tests.sse import open_stream

Integration = tuple[str, str]


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def events_url(ingress: Ingress, integration_id: str, conversation: str | None = None) -> str:
    base = f"{ingress.url}/webhooks/{integration_id}"
    return f"{base}/conversations/{conversation}/events" if conversation else f"{base}/events"


async def sample(ingress: Ingress, name: str) -> float:
    """A sample of the ingress's /metrics (0 if absent)."""
    async with ingress.http.get(f"{ingress.url}/metrics") as answer:
        text = await answer.text()
    for line in text.splitlines():
        if line.startswith((name + " ", name + "{")):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def refusal(ingress: Ingress, url: str, headers: dict[str, str]) -> tuple[int, Any, str]:
    """GET a stream that should be refused: status, error, Retry-After."""
    async with ingress.http.get(url, headers=headers) as answer:
        assert answer.status != 200, "a stream was opened past a limit"
        return answer.status, (await answer.json())["error"], answer.headers.get("Retry-After", "")


async def accepted(ingress: Ingress, integration: Integration, body: dict[str, Any]) -> None:
    status, answer = await ingress.post(*integration, body)
    assert status == 200, answer


# -- event streams -------------------------------------------------------------------------


async def test_streams_are_capped_per_token_per_integration_and_per_ingress(
    settings: Settings, store: SqlStore
):
    """The probe's case: one read token's streams took the whole pool and another
    integration got 503. Now each limit is below the pool, and each refusal names it."""
    capped = settings.model_copy(
        update={"stream_limit": 5, "stream_limit_per_integration": 3, "stream_limit_per_token": 2}
    )
    first_id, first = await make_integration(store, settings, name="greedy")
    second = await make_integration(store, settings, name="other")
    conv = f"conv-{uuid.uuid4().hex[:8]}"
    async with start_ingress(capped) as ingress, contextlib.AsyncExitStack() as streams:
        await accepted(ingress, (first_id, first), message(uuid.uuid4().hex, conversationId=conv))

        async def hold(url: str, headers: dict[str, str]) -> None:
            await streams.enter_async_context(open_stream(ingress.http, url, headers))

        # Two streams on one token (its own conversation's, and the integration's): its share.
        await hold(events_url(ingress, first_id, conv), bearer(first))
        await hold(events_url(ingress, first_id), bearer(first))
        status, error, retry = await refusal(ingress, events_url(ingress, first_id), bearer(first))
        assert (status, error["details"]["limit"]) == (503, "stream_limit_per_token"), error
        assert error["code"] == "unavailable"
        assert "token" in error["message"]
        assert int(retry) >= 1
        assert first not in json.dumps(error)
        # A read token is a credential of its own, within the integration's share.
        read = await read_token(ingress, (first_id, first), conv)
        await hold(f"{events_url(ingress, first_id, conv)}?token={read}", {})
        _, another = await make_token(store, first_id)
        status, error, _ = await refusal(ingress, events_url(ingress, first_id), bearer(another))
        assert (status, error["details"]["limit"]) == (503, "stream_limit_per_integration")
        # Another integration still gets its streams, up to the ingress's pool.
        await hold(events_url(ingress, second[0]), bearer(second[1]))
        await hold(events_url(ingress, second[0]), bearer(second[1]))
        status, error, _ = await refusal(ingress, events_url(ingress, second[0]), bearer(second[1]))
        assert (status, error["details"]["limit"]) == (503, "stream_limit_per_token")
        _, third = await make_token(store, second[0])
        status, error, _ = await refusal(ingress, events_url(ingress, second[0]), bearer(third))
        assert (status, error["details"]["limit"]) == (503, "stream_limit")
        assert await sample(ingress, "relay_event_streams") == 5
        refused = 'relay_limit_refusals_total{limit="stream_limit_per_token"}'
        assert await sample(ingress, refused) == 2


async def make_token(store: SqlStore, integration_id: str) -> tuple[str, str]:
    token, _ = await admin.create_token(store, integration_id, "integration")
    return integration_id, token


async def read_token(ingress: Ingress, integration: Integration, conv: str) -> str:
    url = f"{ingress.url}/webhooks/{integration[0]}/conversations/{conv}/tokens"
    body = {"userId": "reader"}
    async with ingress.http.post(url, json=body, headers=bearer(integration[1])) as answer:
        assert answer.status == 201, await answer.text()
        token: str = (await answer.json())["token"]
        return token


@contextlib.asynccontextmanager
async def raw_stream(ingress: Ingress, path: str, token: str) -> AsyncIterator[socket.socket]:
    """A stream opened on a socket of its own (read up to its first bytes), closed at the end."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    port = int(ingress.url.rsplit(":", 1)[1])
    try:
        await loop.sock_connect(sock, ("127.0.0.1", port))
        request = f"GET {path} HTTP/1.1\r\nHost: h\r\nAuthorization: Bearer {token}\r\n\r\n"
        await loop.sock_sendall(sock, request.encode())
        head = await asyncio.wait_for(loop.sock_recv(sock, 4096), 10)
        assert head.startswith(b"HTTP/1.1 200"), head
        yield sock
    finally:
        sock.close()


async def test_a_stream_slot_is_freed_within_seconds_of_its_reader_leaving(
    settings: Settings, store: SqlStore
):
    """A reader that goes away while its stream is quiet gives its slot back within a few
    seconds, not at the next keep-alive (15 s)."""
    one = settings.model_copy(update={"stream_limit_per_token": 1, "stream_keepalive": 15.0})
    integration_id, token = await make_integration(store, settings, name="leaver")
    async with start_ingress(one) as ingress:
        url = events_url(ingress, integration_id)
        async with raw_stream(ingress, f"/webhooks/{integration_id}/events", token):
            status, error, _ = await refusal(ingress, url, bearer(token))
            assert (status, error["details"]["limit"]) == (503, "stream_limit_per_token")
        loop = asyncio.get_running_loop()
        left = loop.time()

        async def freed() -> bool:
            return await sample(ingress, "relay_event_streams") == 0

        await eventually(freed, timeout=5, interval=0.1)
        assert loop.time() - left < 5
        async with open_stream(ingress.http, events_url(ingress, integration_id), bearer(token)):
            pass


# -- ?wait -----------------------------------------------------------------------------------


async def test_waits_are_capped_and_a_message_past_the_cap_is_accepted_once_unwaited(
    settings: Settings, store: SqlStore, queues: Queues
):
    """No bot runs here, so every wait lasts its full time. Past its integration's share
    (or the ingress's), a `?wait` POST is accepted and answered at once, saying which
    limit; the message is queued exactly once, and repeating it later waits as usual."""
    capped = settings.model_copy(update={"wait_limit": 2, "wait_limit_per_integration": 1})
    first = await make_integration(store, settings, name="waiter")
    second = await make_integration(store, settings, name="waiter-2")
    third = await make_integration(store, settings, name="waiter-3")
    async with start_ingress(capped) as ingress:
        loop = asyncio.get_running_loop()
        waiting = asyncio.create_task(post_wait(ingress, first, "w-1", 4))

        async def parked(count: int) -> bool:
            return await sample(ingress, "relay_reply_waits_open") == count

        await eventually(lambda: parked(1))
        started = loop.time()
        status, answer, limited = await post_wait(ingress, first, "w-2", 4)
        assert loop.time() - started < 2
        assert (status, limited) == (200, "wait_limit_per_integration")
        assert answer["complete"] is False
        assert answer["responses"] == []
        assert answer["message"]["tags"]["id"] == "msg-w-2"
        # Another integration waits (its own share), until the ingress's pool is full.
        other = asyncio.create_task(post_wait(ingress, second, "w-3", 4))
        await eventually(lambda: parked(2))
        status, answer, limited = await post_wait(ingress, third, "w-4", 4)
        assert (status, limited) == (200, "wait_limit")
        for task in (waiting, other):
            status, answer, limited = await task
            assert (status, limited, answer["complete"]) == (200, None, False)
        # The refused wait, repeated with the same messageId once there is room: it waits.
        started = loop.time()
        status, answer, limited = await post_wait(ingress, first, "w-2", 1)
        assert (status, limited) == (200, None)
        assert loop.time() - started >= 0.9
    queued = await queues.take("inbound")
    ids = sorted(m["bundle"]["message"]["tags"]["id"] for m in queued)
    assert ids == ["msg-w-1", "msg-w-2", "msg-w-3", "msg-w-4"]


async def post_wait(
    ingress: Ingress, integration: Integration, n: str, seconds: float
) -> tuple[int, dict[str, Any], str | None]:
    """POST with ?wait: status, answer, and the limit that kept it from waiting (if any)."""
    async with ingress.http.post(
        f"{ingress.url}/webhooks/{integration[0]}?wait={seconds}",
        json=message(n, conversationId=f"conv-{n}"),
        headers=bearer(integration[1]),
    ) as answer:
        return answer.status, await answer.json(), answer.headers.get("Relay-Wait-Limited")


# -- history pages ---------------------------------------------------------------------------


async def test_history_pages_are_bounded_in_bytes_and_resume_after_their_last_item(
    settings: Settings, store: SqlStore
):
    """Five items of about 60 KB with a 150 KB page: pages of two, two and one, each
    ending at its last item's watermark; an item bigger than a page comes alone."""
    bounded = settings.model_copy(update={"history_page_bytes": 150_000})
    integration = await make_integration(store, settings, name="big-history")
    conv = f"conv-{uuid.uuid4().hex[:8]}"
    async with start_ingress(bounded) as ingress:
        for i in range(5):
            body = message(f"{conv}-{i}", conversationId=conv, text=f"{i}" + "x" * 60_000)
            await accepted(ingress, integration, body)
        pages, after = [], ""
        while True:
            size, page = await history_page(ingress, integration, conv, after)
            assert size <= 150_000 + 100
            if not page["messages"]:
                assert page["watermark"] == after
                break
            assert page["watermark"] == page["messages"][-1]["id"]
            pages.append([item["messageId"] for item in page["messages"]])
            after = page["watermark"]
        assert pages == [
            [f"msg-{conv}-0", f"msg-{conv}-1"],
            [f"msg-{conv}-2", f"msg-{conv}-3"],
            [f"msg-{conv}-4"],
        ]
    smaller = settings.model_copy(update={"history_page_bytes": 64 * 1024})
    async with start_ingress(smaller) as ingress:
        big = message(f"{conv}-big", conversationId=conv, text="y" * 100_000)
        await accepted(ingress, integration, big)
        _, page = await history_page(ingress, integration, conv, after)
        assert [item["messageId"] for item in page["messages"]] == [f"msg-{conv}-big"]


async def history_page(
    ingress: Ingress, integration: Integration, conv: str, after: str
) -> tuple[int, dict[str, Any]]:
    query = f"?limit=1000&after={after}" if after else "?limit=1000"
    path = f"/webhooks/{integration[0]}/conversations/{conv}/messages{query}"
    async with ingress.http.get(f"{ingress.url}{path}", headers=bearer(integration[1])) as answer:
        assert answer.status == 200, await answer.text()
        raw = await answer.read()
        return len(raw), json.loads(raw)


async def test_a_stream_of_big_items_sends_every_one_in_order(settings: Settings, store: SqlStore):
    """The stream's pages are bounded in bytes too: still every item, once, in order."""
    bounded = settings.model_copy(update={"history_page_bytes": 64 * 1024})
    integration = await make_integration(store, settings, name="big-stream")
    conv = f"conv-{uuid.uuid4().hex[:8]}"
    async with start_ingress(bounded) as ingress:
        for i in range(4):
            await accepted(
                ingress, integration, message(f"{conv}-{i}", conversationId=conv, text="z" * 50_000)
            )
        url = events_url(ingress, integration[0], conv)
        async with open_stream(ingress.http, url, bearer(integration[1])) as stream:
            events = await stream.take(4)
    assert [event.item["messageId"] for event in events] == [f"msg-{conv}-{i}" for i in range(4)]


async def test_a_held_back_stream_is_still_kept_alive(
    settings: Settings, store: SqlStore, database_url: str
):
    """While an open transaction holds new items back (PostgreSQL's horizon), the stream
    still writes its keep-alive comment and watches its reader."""
    if not database_url.startswith("postgresql"):
        pytest.skip("only PostgreSQL holds items back behind an open transaction")
    quick = settings.model_copy(update={"stream_keepalive": 0.3})
    integration = await make_integration(store, settings, name="held-back")
    conv = f"conv-{uuid.uuid4().hex[:8]}"
    async with start_ingress(quick) as ingress, store.driver.transaction() as holding:
        # A write keeps this transaction's id below every later one: their items wait.
        await holding.execute(
            "INSERT INTO leases (name, holder, held_until) VALUES (?, ?, ?)",
            f"hold-{conv}",
            "test",
            utcnow(),
        )
        await accepted(ingress, integration, message(conv, conversationId=conv))
        url = events_url(ingress, integration[0], conv)
        timeout = aiohttp.ClientTimeout(total=None)
        async with ingress.http.get(url, headers=bearer(integration[1]), timeout=timeout) as got:
            assert got.status == 200
            lines = []
            async with asyncio.timeout(5):
                while (line := await got.content.readline()) != b": keep-alive\n":
                    lines.append(line)
    assert not any(line.startswith(b"event:") for line in lines), "the item was held back"


# -- failed authentication ------------------------------------------------------------------


@pytest.fixture
async def strict(settings: Settings) -> AsyncIterator[Ingress]:
    """An ingress allowing three failed authentications per client, then one in 10 s."""
    limited = settings.model_copy(update={"auth_failure_rate": 0.1, "auth_failure_burst": 3})
    async with start_ingress(limited) as ingress:
        yield ingress


async def test_failed_authentications_are_limited_per_client_before_any_lookup(
    strict: Ingress, settings: Settings, store: SqlStore
):
    """Three wrong tokens (or unknown integrations) answer 401/404; then the client is
    answered 429 with Retry-After, even with a right token never seen here: it is refused
    before anything is looked up. Requests that succeed cost nothing, and a token that
    worked here lately still works (an attacker behind the same address, a proxy or a
    carrier's NAT, does not lock out the tenants whose tokens work)."""
    integration = await make_integration(store, settings, name="guarded")
    for _ in range(5):
        await accepted(strict, integration, message(uuid.uuid4().hex))  # successes: free
    status, _ = await strict.post(integration[0], "rly_wrong", message(1))
    assert status == 401
    status, _ = await strict.post(uuid.uuid4().hex, "rly_wrong", message(1))
    assert status == 404
    async with strict.http.get(events_url(strict, integration[0])) as answer:
        assert answer.status == 401
    await accepted(strict, integration, message(uuid.uuid4().hex))  # proven: still served
    fresh, _ = await admin.create_token(store, integration[0], "integration")
    async with strict.http.post(
        f"{strict.url}/webhooks/{integration[0]}", json=message(2), headers=bearer(fresh)
    ) as answer:
        assert answer.status == 429
        assert int(answer.headers["Retry-After"]) >= 1
        error = (await answer.json())["error"]
    assert error["code"] == "rate_limited"
    assert error["details"] == {"limit": "auth_failure_rate"}
    # The service's probes are never refused.
    async with strict.http.get(f"{strict.url}/healthz") as answer:
        assert answer.status == 200
    # (/metrics itself is refused to this client now: read it from the inside.)
    exposition = strict.server.app[METRICS_KEY].render().decode()
    assert 'relay_limit_refusals_total{limit="auth_failure_rate"} 1.0' in exposition


async def test_behind_a_trusted_proxy_each_forwarded_client_has_its_own_budget(
    settings: Settings, store: SqlStore
):
    """With the proxy trusted, the client is the right-most X-Forwarded-For entry that is
    not a proxy: one client's failures do not refuse another, and a client cannot escape
    its budget by writing entries of its own to the left."""
    proxied = settings.model_copy(
        update={
            "auth_failure_rate": 0.1,
            "auth_failure_burst": 2,
            "trusted_proxies": [ip_network("127.0.0.0/8"), ip_network("10.0.0.0/8")],
        }
    )
    integration = await make_integration(store, settings, name="proxied")
    async with start_ingress(proxied) as ingress:

        async def attempt(forwarded: str) -> int:
            headers = {"Authorization": "Bearer rly_wrong", "X-Forwarded-For": forwarded}
            status, _ = await ingress.post(integration[0], None, message(1), headers=headers)
            return status

        assert [await attempt("203.0.113.7") for _ in range(3)] == [401, 401, 429]
        assert await attempt("198.51.100.1, 203.0.113.7, 10.1.2.3") == 429
        assert await attempt("203.0.113.7, 198.51.100.1") == 401  # another client
        assert await attempt("2001:db8:1:2::1") == 401
        assert await attempt("2001:db8:1:2::2") == 401
        assert await attempt("2001:db8:1:2::3") == 429  # the same /64
    untrusted = settings.model_copy(update={"auth_failure_rate": 0.1, "auth_failure_burst": 2})
    async with start_ingress(untrusted) as ingress:
        statuses = []
        for n in range(3):
            headers = {"Authorization": "Bearer rly_wrong", "X-Forwarded-For": f"192.0.2.{n}"}
            status, _ = await ingress.post(integration[0], None, message(1), headers=headers)
            statuses.append(status)
        # Not a trusted proxy: what it forwards is ignored, the peer is the client.
        assert statuses == [401, 401, 429]


# -- the integration's rate limit -------------------------------------------------------------


async def test_the_rate_limit_is_counted_across_ingresses_per_integration(
    settings: Settings, store: SqlStore
):
    """Two ingresses on one store share an integration's bucket: its burst is spent across
    both, then both answer 429 with Retry-After and nothing is accepted. Another integration,
    and the same integration's bot pushes and reads, have buckets of their own."""
    limited = settings.model_copy(update={"rate_limit_per_second": 0.05, "rate_limit_burst": 3})
    first = await make_integration(store, settings, name="rate-limited")
    second = await make_integration(store, settings, name="rate-other")
    bot_token, _ = await admin.create_token(store, first[0], "bot")
    conv = f"conv-{uuid.uuid4().hex[:8]}"
    async with start_ingress(limited) as one, start_ingress(limited) as two:
        for n, ingress in enumerate([one, two, one]):
            await accepted(ingress, first, message(f"{conv}-{n}", conversationId=conv))
        conversation = await store.find_conversation(first[0], conv)
        assert conversation is not None
        for ingress in (one, two):
            async with ingress.http.post(
                f"{ingress.url}/webhooks/{first[0]}",
                json=message(f"{conv}-over", conversationId=conv),
                headers=bearer(first[1]),
            ) as answer:
                assert answer.status == 429
                assert 1 <= int(answer.headers["Retry-After"]) <= 20  # a token per 20 s
                error = (await answer.json())["error"]
            assert error["code"] == "rate_limited"
            await accepted(ingress, second, message(f"{conv}-{ingress.url}"))
            pushed = await push_text(ingress, conversation, bot_token, "hi")
            assert pushed["payload"] == {"text": "hi"}
        _, page = await history_page(one, first, conv, "")
    assert len(page["messages"]) == 5  # three accepted, two pushed: nothing over the limit
    assert await store.find_incoming(first[0], f"msg-{conv}-over") is None
