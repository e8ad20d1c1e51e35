"""Secrets at rest (`relay.store.secrets`), on both stores: with RELAY_SECRET_KEYS set no
signing or bot secret is stored in plain text, and reads give them back; rows written
before keys were set still read, and `relay secrets reencrypt` seals them; a key rotates
out (the new key first, reencrypt, the old key removed); a secret no key opens fails naming
its integration, never the secret, and no other integration. Deliveries are signed with the
sealed secret, by a delivery worker in this process and by `relay run`."""

from __future__ import annotations

import json
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.fernet import Fernet
from standardwebhooks import Webhook

from relay import admin
from relay.auth import new_signing_secret
from relay.settings import Settings
from relay.store import SecretBox, SecretUnreadable, SqlStore
from relay.store.secrets import MARK, new_key
from relay.wire import utcnow
from tests.fleet import fleet
from tests.helpers import (
    Ingress,
    eventually,
    integration_columns,
    keyed,
    make_integration,
    message,
    push_text,
    start_delivery_worker,
)
from tests.receivers import Hit, Receiver
from tests.test_cli import relay

OLD_KEY, NEW_KEY = new_key(), new_key()


async def stored(store: SqlStore, integration_id: str) -> dict[str, Any]:
    """The secret columns of an integration as the database holds them."""
    return await integration_columns(
        store, integration_id, "signing_secret", "previous_secret", "bot_secret"
    )


def naming(problems: list[str], integration_id: str) -> list[str]:
    return [line for line in problems if integration_id in line]


async def test_with_keys_no_secret_is_stored_in_plain_text(database_url: str):
    first, second = new_signing_secret(), new_signing_secret()
    async with keyed(database_url, OLD_KEY) as store:
        record = await store.create_integration("sealed", "http://127.0.0.1:9/", first)
        await store.rotate_secret(record.id, second, utcnow() + timedelta(hours=1))
        bot = await store.bot_secret(record.id)
        raw = await stored(store, record.id)
        for column, value in raw.items():
            assert value.startswith(MARK), column
            for secret in (first.removeprefix("whsec_"), second.removeprefix("whsec_"), bot):
                assert secret not in value, column
        read = await store.get_integration(record.id)
        assert read is not None
        assert read.signing_secrets(utcnow()) == [second, first]
        assert await store.bot_secret(record.id) == bot
        [listed] = [r for r in await store.list_integrations() if r.id == record.id]
        assert listed == read
        assert second not in repr(read)


async def test_rows_from_before_keys_still_read_and_reencrypt_seals_them(
    store: SqlStore, database_url: str
):
    secret = new_signing_secret()
    record = await store.create_integration("plain", "http://127.0.0.1:9/", secret)
    bot = await store.bot_secret(record.id)
    assert (await stored(store, record.id))["signing_secret"] == secret  # as before: no keys
    async with keyed(database_url, OLD_KEY) as sealing:
        before = await sealing.get_integration(record.id)
        assert before is not None
        assert before.signing_secret == secret
        done = await sealing.reseal_secrets()
        assert naming(done.unreadable, record.id) == []
        raw = await stored(sealing, record.id)
        assert raw["signing_secret"].startswith(MARK)
        assert raw["bot_secret"].startswith(MARK)
        assert await sealing.get_integration(record.id) == before
        assert await sealing.bot_secret(record.id) == bot
    # A process without the key now cannot sign for it, and says whose secret it is.
    unkeyed = await store.get_integration(record.id)
    assert unkeyed is not None
    with pytest.raises(SecretUnreadable, match=record.id) as refused:
        unkeyed.signing_secrets(utcnow())
    assert "RELAY_SECRET_KEYS is empty" in str(refused.value)
    assert secret.removeprefix("whsec_") not in str(refused.value)


async def test_a_key_rotates_out_new_key_first_then_reencrypt_then_the_old_key_goes(
    database_url: str,
):
    first, second = new_signing_secret(), new_signing_secret()
    async with keyed(database_url, OLD_KEY) as old:
        record = await old.create_integration("rotating", "http://127.0.0.1:9/", first)
        await old.rotate_secret(record.id, second, utcnow() + timedelta(hours=1))
        bot = await old.bot_secret(record.id)
    async with keyed(database_url, NEW_KEY, OLD_KEY) as both:
        read = await both.get_integration(record.id)
        assert read is not None
        assert read.signing_secrets(utcnow()) == [second, first]
        done = await both.reseal_secrets()
        assert done.count >= 3
        assert naming(done.unreadable, record.id) == []
        for column, value in (await stored(both, record.id)).items():
            # sealed with the new key: it alone opens it
            assert Fernet(NEW_KEY).decrypt(value.removeprefix(MARK).encode()), column
    async with keyed(database_url, NEW_KEY) as new:
        again = await new.get_integration(record.id)
        assert again is not None
        assert again.signing_secrets(utcnow()) == [second, first]
        assert await new.bot_secret(record.id) == bot
    async with keyed(database_url, OLD_KEY) as removed:
        gone = await removed.get_integration(record.id)
        assert gone is not None
        assert gone.secret_unreadable is not None
        with pytest.raises(SecretUnreadable, match=record.id):
            await removed.bot_secret(record.id)


async def test_a_secret_no_key_opens_fails_naming_its_integration_and_no_other(
    database_url: str,
):
    lost_key = new_key()
    lost_secret, kept_secret = new_signing_secret(), new_signing_secret()
    async with keyed(database_url, lost_key) as before:
        lost = await before.create_integration("lost", "http://127.0.0.1:9/", lost_secret)
        lost_bot = await before.bot_secret(lost.id)
    async with keyed(database_url, NEW_KEY) as store:
        kept = await store.create_integration("kept", "http://127.0.0.1:9/", kept_secret)
        listed = {record.id: record for record in await store.list_integrations()}
        assert listed[kept.id].signing_secrets(utcnow()) == [kept_secret]
        with pytest.raises(SecretUnreadable) as signing:
            listed[lost.id].signing_secrets(utcnow())
        with pytest.raises(SecretUnreadable) as replying:
            await store.bot_secret(lost.id)
        for error, secret in ((signing, lost_secret), (replying, lost_bot)):
            text = str(error.value)
            assert lost.id in text
            assert "cannot be decrypted" in text
            assert secret.removeprefix("whsec_") not in text
        # Read and listed all the same: it still authenticates; only signing fails.
        assert await store.get_integration(lost.id) == listed[lost.id]
        done = await store.reseal_secrets()
        assert len(naming(done.unreadable, lost.id)) == 2  # its signing and bot secrets
        assert naming(done.unreadable, kept.id) == []
        # A rotation gives it a secret that signs again (the unreadable one is left out).
        fresh = new_signing_secret()
        await store.rotate_secret(lost.id, fresh, utcnow() + timedelta(hours=1))
        rotated = await store.get_integration(lost.id)
        assert rotated is not None
        assert rotated.signing_secrets(utcnow()) == [fresh]


def test_a_bad_key_is_refused_by_its_position_never_its_value():
    with pytest.raises(ValueError, match="key 2 is not a Fernet key") as refused:
        SecretBox.of([OLD_KEY, "not-a-key-SECRETCANARY"])
    assert "SECRETCANARY" not in str(refused.value)
    assert SecretBox.of([]).seal("whsec_x") == "whsec_x"


async def test_the_cli_seals_what_it_writes_and_reencrypts_for_a_key_rotation(
    settings: Settings, store: SqlStore, database_url: str
):
    made = await relay(settings, "secrets", "new-key")
    assert made.code == 0
    key = made.out.strip()
    Fernet(key)  # a key Fernet takes
    keys = {"RELAY_SECRET_KEYS": key}
    run = await relay(
        settings,
        "integrations",
        "create",
        "--name",
        "cli-sealed",
        "--response-url",
        "http://127.0.0.1:9/",
        "--no-verify",
        env=keys,
    )
    assert run.code == 0, run.err
    created = json.loads(run.out)
    raw = await stored(store, created["id"])
    assert raw["signing_secret"].startswith(MARK)
    assert created["signingSecret"].removeprefix("whsec_") not in raw["signing_secret"]
    shown = await relay(settings, "integrations", "show", created["id"], env=keys)
    assert shown.code == 0, shown.err

    newer = new_key()
    rotated = await relay(
        settings, "secrets", "reencrypt", env={"RELAY_SECRET_KEYS": f"{newer},{key}"}
    )
    assert "re-encrypted" in rotated.out
    assert naming(rotated.err.splitlines(), created["id"]) == []
    async with keyed(database_url, newer) as new:
        record = await new.get_integration(created["id"])
        assert record is not None
        assert record.signing_secret == created["signingSecret"]
    # With the old key alone the integration's secret is unreadable: reencrypt says whose.
    stale = await relay(settings, "secrets", "reencrypt", env=keys)
    assert stale.code == 1
    [line] = naming(stale.err.splitlines(), created["id"])
    assert line.startswith("error: the signing secret of integration")
    assert created["signingSecret"].removeprefix("whsec_") not in stale.out + stale.err
    # An empty key list is the command's refusal (1); a bad key, the configuration's (2).
    for env, expected, code in [
        ({"RELAY_SECRET_KEYS": ""}, "RELAY_SECRET_KEYS is empty", 1),
        ({"RELAY_SECRET_KEYS": "SECRETCANARY"}, "key 1 is not a Fernet key", 2),
    ]:
        refused = await relay(settings, "secrets", "reencrypt", env=env)
        assert refused.code == code
        assert expected in refused.err
        assert "SECRETCANARY" not in refused.err
        assert "Traceback" not in refused.err


async def test_a_delivery_worker_signs_with_the_sealed_secret(
    ingress: Ingress, store: SqlStore, settings: Settings, receiver: Receiver, database_url: str
):
    path = f"sealed-{uuid.uuid4().hex[:8]}"  # the receiver serves both stores' runs
    integration_id, token = await make_integration(store, settings, response_url=receiver.on(path))
    async with keyed(database_url, OLD_KEY) as sealing:
        await sealing.reseal_secrets()
        record = await sealing.get_integration(integration_id)
    assert record is not None
    assert (await stored(store, integration_id))["signing_secret"].startswith(MARK)
    _, sent = await ingress.post(integration_id, token, message("sealed"))
    bot_token, _ = await admin.create_token(store, integration_id, "bot")
    await push_text(ingress, sent["conversation"]["id"], bot_token, "sealed")
    async with start_delivery_worker(settings, wrap=keyed_as(database_url, OLD_KEY)):
        [hit] = await eventually(lambda: hits(receiver, path, 1), timeout=20)
    assert Webhook(record.signing_secret).verify(hit.raw, hit.headers) == hit.body


def keyed_as(database_url: str, *keys: str) -> Any:
    """For `start_delivery_worker(wrap=...)`: the worker's store, with these keys."""

    def wrap(opened: SqlStore) -> SqlStore:
        opened.keep_secrets_with(SecretBox.of(keys))
        return opened

    return wrap


async def hits(receiver: Receiver, path: str, count: int) -> list[Hit]:
    got = receiver.at(path)
    return got if len(got) >= count else []


@pytest.mark.timeout(120)
async def test_relay_run_with_keys_signs_replies_and_one_lost_key_holds_up_no_one(
    settings: Settings, store: SqlStore, receiver: Receiver, database_url: str, tmp_path: Path
):
    lost_key, run = new_key(), uuid.uuid4().hex[:8]
    async with keyed(database_url, lost_key) as before:
        lost = await admin.create_integration(
            before, settings, "lost", receiver.on(f"lost-{run}"), verify=False
        )
        lost_token, _ = await admin.create_token(before, lost.id, "integration")
    async with keyed(database_url, NEW_KEY) as sealing:
        kept = await admin.create_integration(
            sealing, settings, "kept", receiver.on(f"kept-{run}"), verify=False
        )
        kept_token, _ = await admin.create_token(sealing, kept.id, "integration")
    async with fleet(settings, env={"RELAY_SECRET_KEYS": NEW_KEY}, logs=tmp_path) as services:
        running = await services.start("run")
        for integration, token in ((lost, lost_token), (kept, kept_token)):
            async with services.http.post(
                f"{running.url}/webhooks/{integration.id}",
                json=message("run", conversationId=f"conv-{integration.name}"),
                headers={"Authorization": f"Bearer {token}"},
            ) as answer:
                assert answer.status == 200, await answer.text()  # accepted, either way
        # The echo bot answers twice (its reply token signed with the sealed bot secret).
        delivered = await eventually(lambda: hits(receiver, f"kept-{run}", 2), timeout=30)
        for hit in delivered:
            assert Webhook(kept.signing_secret).verify(hit.raw, hit.headers) == hit.body

        async def told() -> list[str]:
            return [
                line
                for line in running.lines()
                if lost.id in line and "cannot be decrypted" in line
            ]

        await eventually(told, timeout=15)
        assert running.running
    assert receiver.at(f"lost-{run}") == []
    assert (await stored(store, kept.id))["bot_secret"].startswith(MARK)
    output = "\n".join(running.lines())
    for secret in (lost.signing_secret, kept.signing_secret):
        assert secret.removeprefix("whsec_") not in output
