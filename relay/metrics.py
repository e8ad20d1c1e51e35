"""Prometheus metrics of a service, in a registry of its own (no process-global state).

`Metrics` names every metric with its type; the functions below it define them, one per part
of the relay, so the help texts of a part read together.
"""

from __future__ import annotations

from collections.abc import Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
# Ages run from milliseconds (a fast turn) to hours (an endpoint down for a while).
_AGE_BUCKETS = (*_LATENCY_BUCKETS, 30, 60, 300, 1800, 7200)


class Metrics:
    """Every metric Relay exports; each service creates one and serves it on `/metrics`."""

    http_requests: Counter
    http_latency: Histogram
    publish_latency: Histogram
    published: Counter
    unpublishable: Counter
    inbound: Counter
    consumed: Counter
    bot_latency: Histogram
    bot_failures: Counter
    delivery_attempts: Counter
    delivery_latency: Histogram
    response_age: Histogram
    end_to_end: Histogram
    message_age: Histogram
    partitions_held: Gauge
    oldest_unstarted: Gauge
    breaker_state: Gauge
    delivery_paced: Counter
    responses_expired: Counter
    queue_messages: Gauge
    queue_consumers: Gauge
    queue_members: Gauge
    queue_members_online: Gauge
    queue_quorum_lost: Gauge
    dead_letters: Gauge
    dead_letters_kept: Counter
    dead_letters_expired: Counter
    pruned: Counter
    streams_open: Gauge
    streams_dropped: Counter
    waits: Counter
    waits_open: Gauge
    limit_refusals: Counter
    read_timeouts: Counter

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        _edge(self)
        _stages(self)
        _queues(self)
        _limits(self)

    def render(self) -> bytes:
        """The exposition text."""
        return generate_latest(self.registry)


def _counter(m: Metrics, name: str, text: str, labels: Sequence[str] = ()) -> Counter:
    return Counter(name, text, labels, registry=m.registry)


def _gauge(m: Metrics, name: str, text: str, labels: Sequence[str] = ()) -> Gauge:
    return Gauge(name, text, labels, registry=m.registry)


def _histogram(
    m: Metrics,
    name: str,
    text: str,
    labels: Sequence[str] = (),
    buckets: Sequence[float] = _LATENCY_BUCKETS,
) -> Histogram:
    return Histogram(name, text, labels, buckets=buckets, registry=m.registry)


def _edge(m: Metrics) -> None:
    """The HTTP edge and the publishes into the pipeline."""
    m.http_requests = _counter(
        m,
        "relay_http_requests",
        "HTTP requests served, by route and status.",
        ["method", "route", "status"],
    )
    m.http_latency = _histogram(
        m,
        "relay_http_request_seconds",
        "Time to answer an HTTP request.",
        ["method", "route"],
    )
    m.publish_latency = _histogram(
        m,
        "relay_publish_seconds",
        "Publish to the broker until its confirm.",
        ["stage"],
    )
    m.published = _counter(
        m,
        "relay_messages_published",
        "Messages confirmed by the broker, by stage.",
        ["stage"],
    )
    m.unpublishable = _counter(
        m,
        "relay_messages_unpublishable",
        "Stored messages that could never be published as they are (a bad row), ended "
        "dead with their reason, by stage.",
        ["stage"],
    )
    m.inbound = _counter(
        m,
        "relay_inbound_messages",
        "Inbound messages by outcome (accepted, duplicate, conflict, unavailable).",
        ["outcome"],
    )


def _stages(m: Metrics) -> None:
    """The bot and delivery stages: what workers take, hold and send."""
    m.consumed = _counter(
        m,
        "relay_messages_consumed",
        "Messages taken from a stage, by outcome.",
        ["stage", "outcome"],
    )
    m.bot_latency = _histogram(
        m,
        "relay_bot_seconds",
        "Time the bot took for one turn.",
    )
    m.bot_failures = _counter(
        m,
        "relay_bot_failures",
        "Bot turns that failed (timeout, error, 5xx).",
    )
    m.delivery_attempts = _counter(
        m,
        "relay_delivery_attempts",
        "Delivery attempts by outcome and status class.",
        ["outcome", "status_class"],
    )
    m.delivery_latency = _histogram(
        m,
        "relay_delivery_seconds",
        "Time of one POST to a response endpoint.",
    )
    m.response_age = _histogram(
        m,
        "relay_response_age_seconds",
        "From a response's creation to its 2xx delivery.",
        buckets=_AGE_BUCKETS,
    )
    m.end_to_end = _histogram(
        m,
        "relay_end_to_end_seconds",
        "From the ingress accepting a user's message to the 2xx delivery of a response.",
        buckets=_AGE_BUCKETS,
    )
    m.message_age = _histogram(
        m,
        "relay_message_age_seconds",
        "Age of a message when a worker takes it (from its creation; retries included).",
        ["stage"],
        buckets=_AGE_BUCKETS,
    )
    m.partitions_held = _gauge(
        m,
        "relay_partitions_held",
        "Partitions of the stage this worker is the active consumer of.",
        ["stage"],
    )
    m.oldest_unstarted = _gauge(
        m,
        "relay_partition_oldest_unstarted_seconds",
        "Age of the oldest message this worker holds of the partition without having "
        "started it (0 when none): one that keeps growing is a stalled partition.",
        ["stage", "partition"],
    )
    m.breaker_state = _gauge(
        m,
        "relay_endpoint_circuit",
        "Circuit of each endpoint: 0 closed, 1 half open, 2 open.",
        ["endpoint"],
    )
    m.delivery_paced = _counter(
        m,
        "relay_delivery_paced",
        "Responses that waited for their integration's pace (deliveryRate): briefly in their"
        " lane (lane), or in the delay queues (queue).",
        ["wait"],
    )
    m.responses_expired = _counter(
        m,
        "relay_responses_expired",
        "Responses dropped undelivered past their type's time to live (expiringTypes).",
        ["type"],
    )


def _queues(m: Metrics) -> None:
    """The queues as last looked at, dead letters and retention."""
    m.queue_messages = _gauge(
        m,
        "relay_queue_messages",
        "Messages ready in each relay queue (as of the last look).",
        ["stage", "queue"],
    )
    m.queue_consumers = _gauge(
        m,
        "relay_queue_consumers",
        "Active consumers of each relay queue (as of the last look).",
        ["stage", "queue"],
    )
    m.queue_members = _gauge(
        m,
        "relay_queue_members",
        "Member nodes of each quorum queue (management API, as of the last look).",
        ["stage", "queue"],
    )
    m.queue_members_online = _gauge(
        m,
        "relay_queue_members_online",
        "Member nodes of each quorum queue that are up (management API).",
        ["stage", "queue"],
    )
    m.queue_quorum_lost = _gauge(
        m,
        "relay_queue_quorum_lost",
        "1 while a quorum queue has no majority of its members up: it is unavailable.",
        ["stage", "queue"],
    )
    m.dead_letters = _gauge(
        m,
        "relay_dead_letters",
        "Dead letters kept in the store, by stage (as of the last look).",
        ["stage"],
    )
    m.dead_letters_kept = _counter(
        m,
        "relay_dead_letters_kept",
        "Dead letters taken off a dead-letter queue into the store, by stage and cause:"
        " relay (a stage gave up on it, with its reason) or broker (the broker"
        " dead-lettered it past its delivery limit: a message returned too often).",
        ["stage", "cause"],
    )
    m.dead_letters_expired = _counter(
        m,
        "relay_dead_letters_expired",
        "Dead letters removed for being older than RELAY_DLQ_MAX_AGE (reason age) or"
        " beyond RELAY_DLQ_MAX_LENGTH (reason length), each logged with its ids.",
        ["stage", "reason"],
    )
    m.pruned = _counter(
        m,
        "relay_pruned_rows",
        "Rows deleted by retention (RELAY_RETENTION_DAYS), by kind.",
        ["kind"],
    )


def _limits(m: Metrics) -> None:
    """The conversation API's streams and waits, and the fair-share limits."""
    m.streams_open = _gauge(
        m,
        "relay_event_streams",
        "Event streams this ingress serves now (conversation API).",
    )
    m.streams_dropped = _counter(
        m,
        "relay_event_streams_dropped",
        "Event streams closed by the ingress, by reason (slow: the reader did not keep up;"
        " full: over a stream limit, named in relay_limit_refusals; revoked: its conversation"
        " token was revoked or expired; stopping).",
        ["reason"],
    )
    m.waits = _counter(
        m,
        "relay_reply_waits",
        "POSTs with ?wait, by whether the bot turn settled in time.",
        ["complete"],
    )
    m.waits_open = _gauge(
        m,
        "relay_reply_waits_open",
        "POSTs with ?wait this ingress holds now, waiting for their bot turn.",
    )
    m.limit_refusals = _counter(
        m,
        "relay_limit_refusals",
        "Requests refused (or, for ?wait, answered without waiting) because of a fair-share"
        " limit, by the setting that sets it (stream_limit, stream_limit_per_integration,"
        " stream_limit_per_token, wait_limit, wait_limit_per_integration,"
        " auth_failure_rate).",
        ["limit"],
    )
    m.read_timeouts = _counter(
        m,
        "relay_http_read_timeouts",
        "Requests not received in time: connections closed for their headers"
        " (RELAY_HEADER_READ_TIMEOUT), requests answered 408 for their body"
        " (RELAY_BODY_READ_TIMEOUT).",
        ["phase"],
    )
