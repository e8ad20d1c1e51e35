"""`relay.tracing` on its own: the context through HTTP and AMQP headers and back, the
sampling, and the path that costs nothing when tracing is off."""

from __future__ import annotations

import subprocess
import sys

import aiohttp
from aiohttp import web
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from relay.settings import Settings
from relay.tracing import (
    CONVERSATION_ID,
    HTTP_STATUS,
    MESSAGE_ID,
    NO_TRACING,
    OUTCOME,
    Tracing,
    ids,
    inject_current,
    note,
    note_status,
)
from relay.wire import TRACEPARENT_HEADER, TRACESTATE_HEADER
from tests.helpers import eventually
from tests.receivers import serving
from tests.test_traces import Collector, Exported, new_traceparent, serve_collector
from workers.bot.adapters.base import post_to_bot


def in_memory() -> tuple[Tracing, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return Tracing(provider.get_tracer("test"), provider), exporter


def hex_ids(span: trace.Span) -> tuple[str, str]:
    context = span.get_span_context()
    return f"{context.trace_id:032x}", f"{context.span_id:016x}"


async def test_the_context_goes_from_http_headers_through_amqp_headers_and_back():
    tracing, exporter = in_memory()
    traceparent, trace_id, backend_span = new_traceparent()
    incoming = {TRACEPARENT_HEADER: traceparent, TRACESTATE_HEADER: "vendor=1"}
    with (
        tracing.served(incoming, "POST /webhooks/{integrationId}", ids("int_1")) as accept,
        tracing.producing("inbound", {"x-relay-attempt": 0}, "m1") as amqp,
    ):
        published = trace.get_current_span()
    assert hex_ids(accept)[0] == trace_id
    assert amqp["x-relay-attempt"] == 0  # the headers given are kept
    assert amqp[TRACEPARENT_HEADER] == f"00-{trace_id}-{hex_ids(published)[1]}-01"
    assert amqp[TRACESTATE_HEADER] == "vendor=1"
    # AMQP header values may come back as bytes.
    delivered = {key: str(value).encode() for key, value in amqp.items()}
    with tracing.consumed("inbound", delivered, ids(conversation_id="c1")) as turn:
        webhook: dict[str, str] = {}
        inject_current(webhook)
        note_status(200)
        note({OUTCOME: "done"})
    assert webhook[TRACEPARENT_HEADER] == f"00-{trace_id}-{hex_ids(turn)[1]}-01"
    spans = {span.name: span for span in exporter.get_finished_spans()}
    assert set(spans) == {"POST /webhooks/{integrationId}", "publish inbound", "bot turn"}
    parents = {name: f"{span.parent.span_id:016x}" for name, span in spans.items() if span.parent}
    assert parents == {
        "POST /webhooks/{integrationId}": backend_span,
        "publish inbound": hex_ids(accept)[1],
        "bot turn": hex_ids(published)[1],
    }
    assert spans["publish inbound"].attributes == {MESSAGE_ID: "m1"}
    assert spans["bot turn"].attributes == {
        CONVERSATION_ID: "c1",
        HTTP_STATUS: 200,
        OUTCOME: "done",
    }
    assert spans["bot turn"].kind is trace.SpanKind.CONSUMER


async def test_without_a_traceparent_a_message_starts_a_trace_and_a_publish_alone_none():
    tracing, exporter = in_memory()
    with tracing.producing("outbound", {"a": 1}, "m1") as alone:
        pass
    assert alone == {"a": 1}  # a sweep's publish: nothing traced, nothing added
    with tracing.consumed("outbound", None, {}) as attempt:
        assert attempt.get_span_context().is_valid
    (span,) = exporter.get_finished_spans()
    assert span.name == "delivery attempt"
    assert span.parent is None


async def test_off_it_makes_no_span_and_reads_or_writes_no_header():
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    assert settings.otlp_endpoint == ""
    tracing = Tracing.open(settings, "ingress")
    assert tracing is NO_TRACING
    assert not tracing.enabled
    traceparent, _, _ = new_traceparent()
    with tracing.served({TRACEPARENT_HEADER: traceparent}, "POST", {}) as span:
        assert not span.get_span_context().is_valid
        with tracing.producing("inbound", {"a": 1}, "m1") as amqp:
            headers: dict[str, str] = {}
            inject_current(headers)
    assert amqp == {"a": 1}
    assert headers == {}
    with tracing.consumed("outbound", {TRACEPARENT_HEADER: traceparent}, {}) as span:
        assert not span.get_span_context().is_valid
    await tracing.close()


def test_off_the_sdk_is_not_even_loaded():
    code = (
        "import sys, relay.ingress.app, workers.bot.service, workers.delivery.service\n"
        "assert not [m for m in sys.modules if m.startswith('opentelemetry.sdk')]\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


async def test_new_traces_are_sampled_at_the_ratio_and_a_sampled_parent_is_followed():
    async with serve_collector() as collector:
        settings = Settings(  # type: ignore[call-arg]
            _env_file=None, otlp_endpoint=collector.base, trace_sample_ratio=0
        )
        tracing = Tracing.open(settings, "bot-worker")
        with tracing.consumed("inbound", {}, {}) as unsampled:
            assert not unsampled.is_recording()
        traceparent, trace_id, _ = new_traceparent()
        with tracing.consumed("inbound", {TRACEPARENT_HEADER: traceparent}, {}) as followed:
            assert followed.is_recording()
        await tracing.close()  # sends what is buffered
        (span,) = await eventually(lambda: _spans(collector))
    assert (span.service, span.name, span.trace_id) == ("relay-bot-worker", "bot turn", trace_id)


async def _spans(collector: Collector) -> list[Exported]:
    return collector.spans


async def test_a_bot_is_posted_the_turns_traceparent_and_nothing_outside_a_turn():
    """An HTTP bot that traces joins the message's trace; outside a span (or with tracing
    off) the POST carries no traceparent."""
    seen: list[str | None] = []

    async def bot(request: web.Request) -> web.Response:
        seen.append(request.headers.get(TRACEPARENT_HEADER))
        return web.json_response({"responses": []})

    app = web.Application()
    app.router.add_post("/bot", bot)
    tracing, _ = in_memory()
    async with serving(app) as base, aiohttp.ClientSession() as http:
        url = f"{base}/bot"
        with tracing.consumed("inbound", {}, ids(conversation_id="c1")) as turn:
            await post_to_bot(http, url, {"text": "hi"}, {"X-Bot": "1"})
        await post_to_bot(http, url, {"text": "hi"})
        with NO_TRACING.consumed("inbound", {}, {}):
            await post_to_bot(http, url, {"text": "hi"})
    trace_id, span_id = hex_ids(turn)
    flags = f"{int(turn.get_span_context().trace_flags):02x}"
    assert seen == [f"00-{trace_id}-{span_id}-{flags}", None, None]
