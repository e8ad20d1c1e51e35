"""What outside tools make of `/openapi.json`: a validator accepts it, a client generator makes a
working client of it (openapi-python-client, as a back end would), and `StorableValue` admits
what the input contract admits. tests/test_schemathesis.py fuzzes the server against it.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from openapi_schema_validator import OAS31Validator
from openapi_spec_validator import validate

from relay.ingress.openapi import openapi_document
from relay.ingress.openapi_contract import apply_contract
from relay.settings import Settings
from relay.store import SqlStore
from relay.wire.contract import MAX_INTEGER, MIN_INTEGER, json_problems
from tests.helpers import Ingress, make_integration

CLIENT = "relay_client"
EVENT_STREAM = "text/event-stream"


def test_the_document_and_its_examples_are_valid() -> None:
    document = openapi_document()
    validate(document)  # openapi-spec-validator: the OpenAPI 3.1 schema and its rules
    streams = [
        media
        for item in document["paths"].values()
        for operation in item.values()
        for answer in operation["responses"].values()
        for kind, media in answer.get("content", {}).items()
        if kind == EVENT_STREAM
    ]
    assert len(streams) == 2
    schemas = document["components"]["schemas"]
    for media in streams:
        named = media["schema"].get("$ref", "").rsplit("/", 1)[-1]
        event = schemas.get(named, media["schema"])  # one event, as schemathesis reads it
        assert event.get("required") == ["event", "id", "data"], event
        assert event["examples"]
        for sample in event["examples"]:
            _valid(document, event, sample)
            item = event["properties"]["data"]["contentSchema"]
            _valid(document, item, json.loads(sample["data"]))


def _valid(document: dict[str, Any], schema: dict[str, Any], value: Any) -> None:
    """`value` is valid against `schema`, a schema of `document` (its refs resolved there)."""
    OAS31Validator({**schema, "components": document["components"]}).validate(value)


def _json_values() -> st.SearchStrategy[Any]:
    # Floats with an integer value beyond 2**53 are left out: JSON Schema reads 1e300 as an
    # integer (out of range), Relay as a float (a float literal, accepted).
    scalars = (
        st.none()
        | st.booleans()
        | st.integers(min_value=-(2**70), max_value=2**70)
        | st.floats(allow_nan=False, allow_infinity=False, min_value=-(2**53), max_value=2**53)
        | st.text(alphabet=st.characters(codec="utf-8"), max_size=5)
    )
    keys = st.text(alphabet=st.characters(codec="utf-8"), max_size=3)
    return st.recursive(
        scalars,
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(keys, inner, max_size=3),
        max_leaves=12,
    )


@settings(max_examples=300, deadline=None)
@given(value=_json_values())
@example(value=MIN_INTEGER)
@example(value=MAX_INTEGER)
@example(value=[MIN_INTEGER - 1])
@example(value={"a": MAX_INTEGER + 1})
@example(value={"a\x00": 1})
@example(value=["\x00"])
def test_storable_value_admits_what_the_contract_admits(value: Any) -> None:
    document = openapi_document()
    storable = {"$ref": "#/components/schemas/StorableValue"}
    admitted = OAS31Validator({**storable, "components": document["components"]}).is_valid(value)
    assert admitted == (json_problems(value) == []), value


def _route_taking(schema: dict[str, Any]) -> dict[str, Any]:
    """A document of one route whose body has `schema`, as a later route's model might."""
    body = {"content": {"application/json": {"schema": schema}}}
    return {
        "paths": {"/x": {"post": {"requestBody": body, "responses": {}}}},
        "components": {"schemas": {}},
    }


@pytest.mark.parametrize(
    ("body", "valid"),
    [
        ({"name": "a", "n": 2**64 - 1, "url": "http://a/b", "any": [{"k": 1.5}], "more": {}}, True),
        ({"name": "a\x00"}, False),
        ({"n": 2**64}, False),
        ({"url": "http://a/\x00"}, False),
        ({"any": [{"k": "\x00"}]}, False),
        ({"more\x00": 1}, False),
        ({"more": [-(2**63) - 1]}, False),
        ({"kind": "b"}, True),
        ({"kind": "a"}, False),
        ({"kind": "b\x00"}, False),
    ],
)
def test_every_request_body_keeps_the_input_contract(body: dict[str, Any], valid: bool) -> None:
    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "n": {"type": "integer"},
            "url": {"type": "string", "pattern": "^https?://[^/]+"},
            "any": {"title": "Anything"},
            "kind": {"type": "string", "not": {"type": "string", "pattern": "^a"}},
        },
    }
    document = _route_taking(schema)
    apply_contract(document)
    assert OAS31Validator({**schema, "components": document["components"]}).is_valid(body) is valid


async def test_a_generated_client_sends_a_message_and_reads_the_history(
    ingress: Ingress, store: SqlStore, settings: Settings, tmp_path: Path
) -> None:
    async with ingress.http.get(f"{ingress.url}/openapi.json") as answer:
        (tmp_path / "openapi.json").write_bytes(await answer.read())
    report = await _generate(tmp_path)
    assert "Warning" not in report, report  # no schema, no operation left out
    integration_id, token = await make_integration(store, settings)
    with _imported(tmp_path) as client:
        post_message, history, models = (
            importlib.import_module(f"{CLIENT}.{name}")
            for name in ("api.default.post_message", "api.default.conversation_history", "models")
        )
        http = client.AuthenticatedClient(base_url=ingress.url, token=token)
        async with http:
            sent = await _send(post_message, models, http, integration_id)
            assert sent.conversation.tags.id == "conv-1"
            assert sent.message.tags.id == "msg-1"
            assert sent.message.payload.to_dict() == {"text": "hello", "sizes": [1, 2.5]}
            read = await history.asyncio(integration_id, "conv-1", client=http)
            assert isinstance(read, models.HistoryAnswer), read
            [item] = read.messages
            assert (item.message_id, item.direction, item.type_) == ("msg-1", "incoming", "text")
            assert item.payload == {"text": "hello", "sizes": [1, 2.5]}
            assert read.watermark == item.id
        async with client.AuthenticatedClient(base_url=ingress.url, token="rly_nope") as wrong:
            refused = await history.asyncio(integration_id, "conv-1", client=wrong)
        assert isinstance(refused, models.ErrorBody), refused
        assert refused.error.code == "unauthorized"


async def test_a_stream_checks_after_even_when_last_event_id_is_sent(
    ingress: Ingress, store: SqlStore, settings: Settings
) -> None:
    # The document gives `after` a pattern whether or not `Last-Event-ID` comes with it.
    integration_id, token = await make_integration(store, settings)
    headers = {"Authorization": f"Bearer {token}", "Last-Event-ID": "1.1"}
    url = f"{ingress.url}/webhooks/{integration_id}/events"
    async with ingress.http.get(url, params={"after": "no"}, headers=headers) as answer:
        assert answer.status == 400  # a stream would answer 200 at once (and never end)
        assert (await answer.json())["error"]["code"] == "invalid_query"


async def _generate(into: Path) -> str:
    """Run openapi-python-client on `into/openapi.json`; its output."""
    config = into / "generator.yml"
    config.write_text(json.dumps({"post_hooks": []}))  # no ruff run on the generated code
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "openapi_python_client",
        "generate",
        "--path",
        str(into / "openapi.json"),
        "--output-path",
        str(into / CLIENT),
        "--meta",
        "none",
        "--config",
        str(config),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        cwd=into,
    )
    out, _ = await asyncio.wait_for(process.communicate(), 60)
    report = out.decode(errors="replace")
    assert process.returncode == 0, report
    return report


@contextlib.contextmanager
def _imported(directory: Path) -> Iterator[ModuleType]:
    """The generated package, imported from `directory` (and forgotten afterwards: each store's
    run generates its own)."""
    sys.path.insert(0, str(directory))
    try:
        yield importlib.import_module(CLIENT)
    finally:
        sys.path.remove(str(directory))
        for name in [name for name in sys.modules if name.split(".")[0] == CLIENT]:
            del sys.modules[name]


async def _send(
    post_message: ModuleType, models: ModuleType, http: Any, integration_id: str
) -> Any:
    payload = models.StorableObject.from_dict({"text": "hello", "sizes": [1, 2.5]})
    body = models.InboundRequest(
        user_id="user-1",
        message_id="msg-1",
        conversation_id="conv-1",
        type_="text",
        text="hello",
        payload=payload,
    )
    sent = await post_message.asyncio(integration_id, client=http, body=body)
    assert isinstance(sent, models.MessageBundle), sent
    return sent
