"""Traces for operators: OpenTelemetry spans from the back end's POST to the webhook.

One trace follows a message across the three services, each reporting as
`<RELAY_OTLP_SERVICE_NAME>-<role>` (`relay-ingress`, `relay-bot-worker`,
`relay-delivery-worker`; `relay run` reports each of its roles under its own name, as if
they ran apart):

    ingress accept (server span on POST /webhooks/..., or a bot's push; its parent is the
    back end's `traceparent` if it sent one)
      └ publish (producer span; its context goes into the AMQP message's headers)
          └ bot turn (consumer span in the bot worker, parent from those headers)
              └ publish (each reply, from inside the turn)
                  └ delivery attempt (consumer span in the delivery worker; the webhook's
                    POST carries its `traceparent`)

The context travels as W3C Trace Context (`traceparent`, `tracestate`), in the AMQP headers
between services and in the HTTP headers at both ends. Spans carry ids (integration,
conversation, message), the attempt and the HTTP status: never a token, a secret or the text
of a message.

A service opens one `Tracing` at start (`Tracing.open`, from `relay.service.lifecycle`) and
closes it at stop, which sends what is still buffered. It holds a `TracerProvider` of its
own: the OpenTelemetry global provider is never set, and the tracer reaches its users as a
value (the broker carries its service's as `Broker.tracing`). The ingress opens the server
span (`Tracing.served`), the broker the producer span of each publish made inside a span
(`Tracing.producing`), the stage workers the consumer span around a message's handling and
settling (`Tracing.consumed`), and the webhook sender writes the current context into its
POST (`inject_current`). The SDK still reads its own `OTEL_*` variables
(`OTEL_EXPORTER_OTLP_HEADERS` for a collector's credentials, `OTEL_BSP_SCHEDULE_DELAY` for
how often spans are sent).

Without `RELAY_OTLP_ENDPOINT` tracing costs nothing: `NO_TRACING` starts no span, reads no
header and writes none, and the SDK is not even imported. A back end's `traceparent` is then
not passed on either: the webhook carries a `traceparent` only when the relay traces.

What has no live context starts a trace of its own, or none: a message the outbox sweep
publishes again after a crash was accepted by a request long gone,
so its publish starts no span and its bot turn begins a new trace (the AMQP headers of the
first publish are lost with the crash). A publish outside any span (a sweep, a renewal, a
replay from the CLI) leaves the headers it is given as they are: a renewed message keeps the
context it carried.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator, Mapping, MutableMapping
from typing import TYPE_CHECKING, Any

import structlog
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.propagators.textmap import Getter
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.types import AttributeValue

from relay.wire import TRACEPARENT_HEADER

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

    # Only for its type: the settings import the broker, whose publishes are traced.
    from relay.settings import Settings

log = structlog.get_logger(__name__)

# Span attributes, by what they say (the HTTP status as OpenTelemetry names it).
INTEGRATION_ID = "relay.integration_id"
CONVERSATION_ID = "relay.conversation_id"
MESSAGE_ID = "relay.message_id"
ATTEMPT = "relay.attempt"
HTTP_STATUS = "http.response.status_code"
OUTCOME = "relay.outcome"  # what became of a queue message (done, retry, dead...)

CLOSE_TIMEOUT = 5.0  # seconds a stopping service waits for its last spans to be sent
EXPORT_TIMEOUT = 5.0  # seconds one export to the collector may take
# The consumer span of each stage, by what the stage does to a message.
_CONSUMER_SPANS = {"inbound": "bot turn", "outbound": "delivery attempt"}

Attributes = Mapping[str, AttributeValue]
_PROPAGATOR = TraceContextTextMapPropagator()


class _HeaderGetter(Getter[Mapping[str, Any]]):
    """Reads HTTP headers (case-insensitive already) and AMQP headers (values may be bytes)."""

    def get(self, carrier: Mapping[str, Any], key: str) -> list[str] | None:
        value = carrier.get(key)
        if isinstance(value, bytes):
            value = value.decode("latin-1")
        return [value] if isinstance(value, str) else None

    def keys(self, carrier: Mapping[str, Any]) -> list[str]:
        return list(carrier.keys())


_GETTER = _HeaderGetter()
# What a span's scope is when tracing is off (reusable: it holds nothing).
_NO_SPAN = contextlib.nullcontext(trace.INVALID_SPAN)


def ids(
    integration_id: str | None = None,
    conversation_id: str | None = None,
    message_id: str | None = None,
    attempt: int | None = None,
) -> dict[str, AttributeValue]:
    """The span attributes of the ids given (those None are left out)."""
    given = {
        INTEGRATION_ID: integration_id,
        CONVERSATION_ID: conversation_id,
        MESSAGE_ID: message_id,
        ATTEMPT: attempt,
    }
    return {key: value for key, value in given.items() if value is not None}


def inject_current(carrier: MutableMapping[str, Any]) -> None:
    """Write the current span's `traceparent` (and `tracestate`) into `carrier`; nothing
    when no span is current (tracing is off, or nothing traced this work)."""
    if trace.get_current_span().get_span_context().is_valid:
        _PROPAGATOR.inject(carrier)


def note(attributes: Attributes) -> None:
    """Add attributes to the current span (nothing when none is recording): what is learnt
    inside it, such as a message's integration or what became of it."""
    span = trace.get_current_span()
    if span.is_recording():
        span.set_attributes(attributes)


def note_status(status: int) -> None:
    """Record an HTTP status on the current span (nothing when none is recording)."""
    note({HTTP_STATUS: status})


def _parent(headers: Mapping[str, Any]) -> Context | None:
    """The context a carrier holds; None (a new trace) when it holds none."""
    if TRACEPARENT_HEADER not in headers:
        return None
    return _PROPAGATOR.extract(headers, getter=_GETTER)


class Tracing:
    """A service's tracer, and its provider while open; `NO_TRACING` when off."""

    def __init__(
        self, tracer: trace.Tracer | None = None, provider: TracerProvider | None = None
    ) -> None:
        self._tracer = tracer
        self._provider = provider

    @classmethod
    def open(cls, settings: Settings, role: str) -> Tracing:
        """Tracing for the service `role` (`ingress`, `bot-worker`, `delivery-worker`):
        exporting to `RELAY_OTLP_ENDPOINT`, or `NO_TRACING` if it is empty."""
        if not settings.otlp_endpoint:
            return NO_TRACING
        service = f"{settings.otlp_service_name}-{role}"
        provider = _provider(settings, service)
        # Not the endpoint: its URL may hold the collector's credentials.
        log.info("tracing", service=service)
        return cls(provider.get_tracer("relay"), provider)

    @property
    def enabled(self) -> bool:
        """Whether spans are made (and exported)."""
        return self._tracer is not None

    def served(
        self, headers: Mapping[str, Any], name: str, attributes: Attributes
    ) -> contextlib.AbstractContextManager[trace.Span]:
        """A server span for a request with these `headers`, current while in scope; its
        parent is the caller's `traceparent` if any."""
        if self._tracer is None:
            return _NO_SPAN
        return self._tracer.start_as_current_span(
            name, context=_parent(headers), kind=trace.SpanKind.SERVER, attributes=attributes
        )

    def consumed(
        self, stage: str, headers: Mapping[str, Any] | None, attributes: Attributes
    ) -> contextlib.AbstractContextManager[trace.Span]:
        """The consumer span of a queue message of `stage` (the bot turn, the delivery
        attempt), current while in scope; its parent is in the message's AMQP `headers`."""
        if self._tracer is None:
            return _NO_SPAN
        name = _CONSUMER_SPANS.get(stage, f"process {stage}")
        return self._tracer.start_as_current_span(
            name,
            context=_parent(headers or {}),
            kind=trace.SpanKind.CONSUMER,
            attributes=attributes,
        )

    def producing(
        self, destination: str, headers: Mapping[str, Any] | None, message_id: str
    ) -> contextlib.AbstractContextManager[dict[str, Any]]:
        """The AMQP headers to publish with: `headers` and, inside a traced piece of work, a
        producer span's context (the span lasts while in scope). Outside any span, `headers`
        as they are: a publish of its own starts no trace."""
        carrier = dict(headers or {})
        if self._tracer is None or not trace.get_current_span().get_span_context().is_valid:
            return contextlib.nullcontext(carrier)
        return _producer_span(self._tracer, destination, carrier, message_id)

    async def close(self) -> None:
        """Send the spans still buffered (within `CLOSE_TIMEOUT`) and stop exporting."""
        if self._provider is None:
            return
        provider, self._provider, self._tracer = self._provider, None, None
        try:
            # The SDK's shutdown blocks on the export: off the event loop, and bounded.
            async with asyncio.timeout(CLOSE_TIMEOUT):
                await asyncio.to_thread(provider.shutdown)
        except TimeoutError:
            log.warning("tracing_close_timed_out", seconds=CLOSE_TIMEOUT)


NO_TRACING = Tracing()


@contextlib.contextmanager
def _producer_span(
    tracer: trace.Tracer, destination: str, carrier: dict[str, Any], message_id: str
) -> Iterator[dict[str, Any]]:
    """A producer span, current while in scope, its context written into `carrier`."""
    attributes = ids(message_id=message_id)
    name = f"publish {destination}"
    with tracer.start_as_current_span(name, kind=trace.SpanKind.PRODUCER, attributes=attributes):
        _PROPAGATOR.inject(carrier)
        yield carrier


def _provider(settings: Settings, service_name: str) -> TracerProvider:
    """A provider exporting in batches over OTLP/HTTP, sampling new traces at the ratio set
    and following a sampled parent's decision."""
    # Imported here: a relay that does not trace never loads the SDK.
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    provider = TracerProvider(
        sampler=ParentBased(TraceIdRatioBased(settings.trace_sample_ratio)),
        resource=Resource.create({SERVICE_NAME: service_name}),
    )
    endpoint = settings.otlp_endpoint.rstrip("/") + "/v1/traces"
    exporter = OTLPSpanExporter(endpoint=endpoint, timeout=EXPORT_TIMEOUT)
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider
