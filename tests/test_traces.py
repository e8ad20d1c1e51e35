"""One message's trace across the three services, as an operator's collector receives it.

`relay ingress`, `relay bot-worker` and `relay delivery-worker` run as processes exporting
over OTLP/HTTP to a collector in this test (`serve_collector`: it decodes what it is sent
with OpenTelemetry's own protobuf messages). A back end's POST with a `traceparent` must give
one tree under it: accept → publish → bot turn → publish of the reply → delivery attempt,
each span from its own service, and the webhook must carry the attempt's `traceparent`.
Without `RELAY_OTLP_ENDPOINT` nothing is exported and the webhook carries no `traceparent`
(the relay does not pass the back end's on when it does not trace).
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

from relay.settings import Settings
from relay.store import SqlStore
from relay.tracing import ATTEMPT, HTTP_STATUS, INTEGRATION_ID, MESSAGE_ID
from tests.helpers import eventually, make_integration, message, until_ready
from tests.receivers import Hit, Receiver, serving
from tests.test_cli import free_port, relay_processes

SPAN_SERVER, SPAN_PRODUCER, SPAN_CONSUMER = 2, 4, 5  # opentelemetry.proto's Span.SpanKind
# The spans of one message with one reply: accept and publish, turn and reply, attempt.
EXPECTED_SERVICES = sorted(
    ["relay-ingress"] * 2 + ["relay-bot-worker"] * 2 + ["relay-delivery-worker"]
)


@dataclass(frozen=True)
class Exported:
    """One span as the collector received it (ids in hex, as in a `traceparent`)."""

    service: str
    name: str
    kind: int
    trace_id: str
    span_id: str
    parent_id: str
    attributes: dict[str, Any]


@dataclass
class Collector:
    """An OTLP/HTTP trace collector on 127.0.0.1: what it was sent, span by span."""

    base: str = ""
    spans: list[Exported] = field(default_factory=list)

    def of_trace(self, trace_id: str) -> list[Exported]:
        return [span for span in self.spans if span.trace_id == trace_id]


def _value(value: AnyValue) -> Any:
    return getattr(value, value.WhichOneof("value") or "string_value")


def _attributes(pairs: Any) -> dict[str, Any]:
    return {pair.key: _value(pair.value) for pair in pairs if isinstance(pair, KeyValue)}


def _received(request: ExportTraceServiceRequest) -> list[Exported]:
    spans = []
    for resource_spans in request.resource_spans:
        service = _attributes(resource_spans.resource.attributes).get("service.name", "")
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                spans.append(
                    Exported(
                        service,
                        span.name,
                        span.kind,
                        span.trace_id.hex(),
                        span.span_id.hex(),
                        span.parent_span_id.hex(),
                        _attributes(span.attributes),
                    )
                )
    return spans


@contextlib.asynccontextmanager
async def serve_collector() -> AsyncIterator[Collector]:
    """A collector accepting `POST /v1/traces` (protobuf) until the block ends."""
    collector = Collector()

    async def export(request: web.Request) -> web.Response:
        sent = ExportTraceServiceRequest()
        sent.ParseFromString(await request.read())
        collector.spans.extend(_received(sent))
        answer = ExportTraceServiceResponse().SerializeToString()
        return web.Response(body=answer, content_type="application/x-protobuf")

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/v1/traces", export)
    async with serving(app) as base:
        collector.base = base
        yield collector


def new_traceparent() -> tuple[str, str, str]:
    """A back end's sampled `traceparent`: (header, trace id, span id)."""
    trace_id, span_id = uuid.uuid4().hex, os.urandom(8).hex()
    return f"00-{trace_id}-{span_id}-01", trace_id, span_id


async def post_when_ready(
    port: int, integration_id: str, token: str, body: dict[str, Any], traceparent: str
) -> dict[str, Any]:
    """POST the message once the ingress is ready (one request: one accept span); its answer."""
    async with aiohttp.ClientSession() as http:
        await until_ready(http, f"http://127.0.0.1:{port}", timeout=60, interval=0.2)
        async with http.post(
            f"http://127.0.0.1:{port}/webhooks/{integration_id}",
            json=body,
            headers={"Authorization": f"Bearer {token}", "traceparent": traceparent},
        ) as answer:
            assert answer.status == 200, await answer.text()
            taken: dict[str, Any] = await answer.json()
            return taken


def one_of(spans: list[Exported], service: str, kind: int, parent: str) -> Exported:
    """The single span of `service` of this kind under `parent`."""
    found = [s for s in spans if s.service == service and s.kind == kind and s.parent_id == parent]
    assert len(found) == 1, (service, kind, parent, spans)
    return found[0]


async def test_one_message_is_one_trace_across_the_three_services(
    settings: Settings, store: SqlStore, receiver: Receiver
):
    receiver.hits.clear()
    integration_id, token = await make_integration(
        store, settings, response_url=receiver.url("traced")
    )
    traceparent, trace_id, backend_span = new_traceparent()
    port = free_port()
    async with serve_collector() as collector:
        env = {
            "RELAY_OTLP_ENDPOINT": collector.base,
            "OTEL_BSP_SCHEDULE_DELAY": "100",  # milliseconds: spans arrive while the test waits
            "RELAY_ALLOWED_ENDPOINT_NETWORKS": "127.0.0.0/8",
            "RELAY_LOG_LEVEL": "warning",
        }
        async with (
            relay_processes(settings, "ingress", 1, {**env, "RELAY_HTTP_PORT": str(port)}),
            relay_processes(
                settings, "bot-worker", 1, {**env, "RELAY_BOT": "bench.bots:one_reply"}
            ),
            relay_processes(settings, "delivery-worker", 1, env),
        ):
            body = message("traced", conversationId="traced", text="a secret text")
            answer = await post_when_ready(port, integration_id, token, body, traceparent)
            hits: list[Hit] = await eventually(lambda: _at(receiver, "traced"), timeout=60)

            async def whole() -> list[Exported] | None:
                # Each service sends its spans in its own time: wait for all of them.
                spans = collector.of_trace(trace_id)
                services = sorted(span.service for span in spans)
                return spans if services == EXPECTED_SERVICES else None

            try:
                spans = await eventually(whole, timeout=30)
            except AssertionError:
                print("spans of the trace:", *collector.of_trace(trace_id), sep="\n")
                raise
    accept = one_of(spans, "relay-ingress", SPAN_SERVER, backend_span)
    assert accept.name == "POST /webhooks/{integrationId}"
    assert accept.attributes[INTEGRATION_ID] == integration_id
    assert accept.attributes[HTTP_STATUS] == 200
    published = one_of(spans, "relay-ingress", SPAN_PRODUCER, accept.span_id)
    assert published.attributes[MESSAGE_ID] == answer["message"]["id"]
    turn = one_of(spans, "relay-bot-worker", SPAN_CONSUMER, published.span_id)
    assert turn.name == "bot turn"
    reply = one_of(spans, "relay-bot-worker", SPAN_PRODUCER, turn.span_id)
    attempt = one_of(spans, "relay-delivery-worker", SPAN_CONSUMER, reply.span_id)
    assert attempt.name == "delivery attempt"
    assert attempt.attributes[ATTEMPT] == 0
    assert attempt.attributes[HTTP_STATUS] == 200
    # The webhook carries the attempt's context: the back end can follow its own trace.
    assert hits[0].headers["traceparent"] == f"00-{trace_id}-{attempt.span_id}-01"
    # Ids and statuses only: never the text of a message, never a token.
    told = " ".join(str(v) for s in spans for v in s.attributes.values())
    assert "secret text" not in told
    assert token not in told


async def test_without_an_endpoint_nothing_is_exported_and_the_webhook_has_no_traceparent(
    settings: Settings, store: SqlStore, receiver: Receiver
):
    receiver.hits.clear()
    integration_id, token = await make_integration(
        store, settings, response_url=receiver.url("untraced")
    )
    traceparent, _, _ = new_traceparent()
    port = free_port()
    async with serve_collector() as collector:
        env = {
            # The SDK's own variables point at the collector: the relay must not heed them.
            "OTEL_EXPORTER_OTLP_ENDPOINT": collector.base,
            "OTEL_BSP_SCHEDULE_DELAY": "100",
            "RELAY_HTTP_PORT": str(port),
            "RELAY_ALLOWED_ENDPOINT_NETWORKS": "127.0.0.0/8",
            "RELAY_BOT": "bench.bots:one_reply",
            "RELAY_LOG_LEVEL": "warning",
        }
        async with relay_processes(settings, "run", 1, env):
            body = message("untraced", conversationId="untraced")
            await post_when_ready(port, integration_id, token, body, traceparent)
            hits: list[Hit] = await eventually(lambda: _at(receiver, "untraced"), timeout=60)
        # The process has stopped: whatever it would have sent, it has sent.
        assert collector.spans == []
    assert "traceparent" not in hits[0].headers
    assert "tracestate" not in hits[0].headers


async def _at(receiver: Receiver, path: str) -> list[Hit]:
    return receiver.at(path)
