"""Every hostile spelling of an internal address (tests/ssrf_forms.py) is refused where a
response URL comes in or is used: creating and changing an integration through the admin
API with the endpoint check, `relay integrations create`, and the delivery worker (dead at
the first attempt, never retried). The internal listener on 127.0.0.1 sees no connection.

The module's ingress and CLI allow 127.0.0.0/8 (as most of the suite does): these forms are
refused for how they are written or what they carry, not because loopback is off limits.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from relay import admin
from relay.auth import new_signing_secret
from relay.pipeline.dlq import DeadLetters
from relay.settings import Settings
from relay.store import DeadLetter, DeadLetterFilter, SqlStore
from tests.helpers import (
    Ingress,
    eventually,
    keeping_dead_letters,
    make_integration,
    message,
    push_text,
    start_delivery_worker,
)
from tests.helpers import admin_call as call
from tests.receivers import Receiver
from tests.ssrf_forms import INTERNAL, Listener, listening
from tests.test_cli import LOOPBACK_ALLOWED, relay


@pytest.fixture
async def internal() -> AsyncIterator[Listener]:
    async with listening() as listener:
        yield listener


async def names(store: SqlStore) -> list[str]:
    return [record.name for record in await store.list_integrations()]


@pytest.mark.parametrize("form", INTERNAL)
async def test_admin_api_create_refuses_the_endpoint(
    ingress: Ingress, admin_token: str, store: SqlStore, internal: Listener, form: str
) -> None:
    name = f"ssrf-create-{internal.port}"
    status, body = await call(
        ingress,
        "POST",
        "/integrations",
        admin_token,
        {"name": name, "responseUrl": internal.url(form), "verify": True},
    )
    assert status == 422, body
    assert "is refused" in body["error"]["message"]
    assert internal.connections == 0
    assert name not in await names(store)


@pytest.mark.parametrize("form", INTERNAL)
async def test_admin_api_patch_refuses_the_endpoint(
    ingress: Ingress,
    admin_token: str,
    store: SqlStore,
    settings: Settings,
    receiver: Receiver,
    internal: Listener,
    form: str,
) -> None:
    integration_id, _ = await make_integration(store, settings, response_url=receiver.url("ok"))
    status, body = await call(
        ingress,
        "PATCH",
        f"/integrations/{integration_id}",
        admin_token,
        {"responseUrl": internal.url(form), "verify": True},
    )
    assert status == 422, body
    assert "is refused" in body["error"]["message"]
    assert internal.connections == 0
    record = await store.get_integration(integration_id)
    assert record is not None
    assert record.response_url == receiver.url("ok")


@pytest.mark.parametrize("form", INTERNAL)
async def test_cli_create_refuses_the_endpoint(
    settings: Settings, store: SqlStore, internal: Listener, form: str
) -> None:
    name = f"ssrf-cli-{internal.port}"
    url = internal.url(form)
    run = await relay(
        settings, "integrations", "create", "--name", name, "--response-url", url,
        env=LOOPBACK_ALLOWED,
    )  # fmt: skip
    assert run.code == 1, run.out
    assert "is refused" in run.err
    assert "Traceback" not in run.err
    assert internal.connections == 0
    assert name not in await names(store)


@pytest.fixture(scope="module")
async def dead(settings: Settings) -> AsyncIterator[DeadLetters]:
    async with keeping_dead_letters(settings) as letters:
        yield letters


async def responded(ingress: Ingress, store: SqlStore, url: str) -> str:
    """An integration whose stored endpoint is `url` (as an older release may have kept
    it), with one bot response waiting for delivery; its id."""
    record = await store.create_integration("ssrf-stored", url, new_signing_secret())
    token, _ = await admin.create_token(store, record.id, "integration")
    _, sent = await ingress.post(record.id, token, message("ssrf"))
    bot_token, _ = await admin.create_token(store, record.id, "bot")
    await push_text(ingress, sent["conversation"]["id"], bot_token, "to an internal address")
    return record.id


async def dead_letters(dead: DeadLetters, ids: set[str]) -> dict[str, DeadLetter] | None:
    found = [
        letter
        for letter in await dead.page(DeadLetterFilter(stage="outbound"), 1000)
        if letter.integration_id in ids
    ]
    by_integration = {letter.integration_id: letter for letter in found}
    return by_integration if set(by_integration) == ids else None


async def test_delivery_refuses_every_form_at_the_first_attempt(
    ingress: Ingress,
    store: SqlStore,
    settings: Settings,
    dead: DeadLetters,
    internal: Listener,
) -> None:
    urls: dict[str, str | None] = {}  # integration id: the form's name
    for form in INTERNAL:
        urls[await responded(ingress, store, internal.url(str(form.values[0])))] = form.id
    guarded = settings.model_copy(update={"allowed_endpoint_networks": []})
    async with start_delivery_worker(guarded):
        letters = await eventually(lambda: dead_letters(dead, set(urls)), timeout=20)
    tried = {urls[i]: (letter.attempts, letter.reason) for i, letter in letters.items()}
    assert {form: attempts for form, (attempts, _) in tried.items()} == dict.fromkeys(
        urls.values(), 1
    ), tried
    assert not [reason for _, reason in tried.values() if reason.startswith("gave up")], tried
    assert internal.connections == 0
    for integration in urls:
        await dead.purge(DeadLetterFilter(integration_id=integration))
