"""Prometheus metrics of a service, in a registry of its own (no process-global state)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class Metrics:
    """Every metric Relay exports; each service creates one and serves it on `/metrics`."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.http_requests = Counter(
            "relay_http_requests",
            "HTTP requests served, by route and status.",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.http_latency = Histogram(
            "relay_http_request_seconds",
            "Time to answer an HTTP request.",
            ["method", "route"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.publish_latency = Histogram(
            "relay_publish_seconds",
            "Publish to the broker until its confirm.",
            ["stage"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.published = Counter(
            "relay_messages_published",
            "Messages confirmed by the broker, by stage.",
            ["stage"],
            registry=self.registry,
        )
        self.unpublishable = Counter(
            "relay_messages_unpublishable",
            "Stored messages that could never be published as they are (a bad row), ended "
            "dead with their reason, by stage.",
            ["stage"],
            registry=self.registry,
        )
        self.inbound = Counter(
            "relay_inbound_messages",
            "Inbound messages by outcome (accepted, duplicate, conflict, unavailable).",
            ["outcome"],
            registry=self.registry,
        )

        self.consumed = Counter(
            "relay_messages_consumed",
            "Messages taken from a stage, by outcome.",
            ["stage", "outcome"],
            registry=self.registry,
        )
        self.bot_latency = Histogram(
            "relay_bot_seconds",
            "Time the bot took for one turn.",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.bot_failures = Counter(
            "relay_bot_failures",
            "Bot turns that failed (timeout, error, 5xx).",
            registry=self.registry,
        )

        self.delivery_attempts = Counter(
            "relay_delivery_attempts",
            "Delivery attempts by outcome and status class.",
            ["outcome", "status_class"],
            registry=self.registry,
        )
        self.delivery_latency = Histogram(
            "relay_delivery_seconds",
            "Time of one POST to a response endpoint.",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.response_age = Histogram(
            "relay_response_age_seconds",
            "From a response's creation to its 2xx delivery.",
            buckets=(*_LATENCY_BUCKETS, 30, 60, 300, 1800, 7200),
            registry=self.registry,
        )
        self.end_to_end = Histogram(
            "relay_end_to_end_seconds",
            "From the ingress accepting a user's message to the 2xx delivery of a response.",
            buckets=(*_LATENCY_BUCKETS, 30, 60, 300, 1800, 7200),
            registry=self.registry,
        )
        self.message_age = Histogram(
            "relay_message_age_seconds",
            "Age of a message when a worker takes it (from its creation; retries included).",
            ["stage"],
            buckets=(*_LATENCY_BUCKETS, 30, 60, 300, 1800, 7200),
            registry=self.registry,
        )
        self.partitions_held = Gauge(
            "relay_partitions_held",
            "Partitions of the stage this worker is the active consumer of.",
            ["stage"],
            registry=self.registry,
        )
        self.oldest_unstarted = Gauge(
            "relay_partition_oldest_unstarted_seconds",
            "Age of the oldest message this worker holds of the partition without having "
            "started it (0 when none): one that keeps growing is a stalled partition.",
            ["stage", "partition"],
            registry=self.registry,
        )
        self.queue_messages = Gauge(
            "relay_queue_messages",
            "Messages ready in each relay queue (as of the last look).",
            ["stage", "queue"],
            registry=self.registry,
        )
        self.queue_consumers = Gauge(
            "relay_queue_consumers",
            "Active consumers of each relay queue (as of the last look).",
            ["stage", "queue"],
            registry=self.registry,
        )
        self.queue_members = Gauge(
            "relay_queue_members",
            "Member nodes of each quorum queue (management API, as of the last look).",
            ["stage", "queue"],
            registry=self.registry,
        )
        self.queue_members_online = Gauge(
            "relay_queue_members_online",
            "Member nodes of each quorum queue that are up (management API).",
            ["stage", "queue"],
            registry=self.registry,
        )
        self.queue_quorum_lost = Gauge(
            "relay_queue_quorum_lost",
            "1 while a quorum queue has no majority of its members up: it is unavailable.",
            ["stage", "queue"],
            registry=self.registry,
        )
        self.dead_letters = Gauge(
            "relay_dead_letters",
            "Dead letters kept in the store, by stage (as of the last look).",
            ["stage"],
            registry=self.registry,
        )
        self.dead_letters_kept = Counter(
            "relay_dead_letters_kept",
            "Dead letters taken off a dead-letter queue into the store, by stage and cause:"
            " relay (a stage gave up on it, with its reason) or broker (the broker"
            " dead-lettered it past its delivery limit: a message returned too often).",
            ["stage", "cause"],
            registry=self.registry,
        )
        self.dead_letters_expired = Counter(
            "relay_dead_letters_expired",
            "Dead letters removed for being older than RELAY_DLQ_MAX_AGE (reason age) or"
            " beyond RELAY_DLQ_MAX_LENGTH (reason length), each logged with its ids.",
            ["stage", "reason"],
            registry=self.registry,
        )
        self.pruned = Counter(
            "relay_pruned_rows",
            "Rows deleted by retention (RELAY_RETENTION_DAYS), by kind.",
            ["kind"],
            registry=self.registry,
        )
        self.streams_open = Gauge(
            "relay_event_streams",
            "Event streams this ingress serves now (conversation API).",
            registry=self.registry,
        )
        self.streams_dropped = Counter(
            "relay_event_streams_dropped",
            "Event streams closed by the ingress, by reason (slow: the reader did not keep up;"
            " full: over a stream limit, named in relay_limit_refusals; stopping).",
            ["reason"],
            registry=self.registry,
        )
        self.waits = Counter(
            "relay_reply_waits",
            "POSTs with ?wait, by whether the bot turn settled in time.",
            ["complete"],
            registry=self.registry,
        )
        self.waits_open = Gauge(
            "relay_reply_waits_open",
            "POSTs with ?wait this ingress holds now, waiting for their bot turn.",
            registry=self.registry,
        )
        self.limit_refusals = Counter(
            "relay_limit_refusals",
            "Requests refused (or, for ?wait, answered without waiting) because of a fair-share"
            " limit, by the setting that sets it (stream_limit, stream_limit_per_integration,"
            " stream_limit_per_token, wait_limit, wait_limit_per_integration,"
            " auth_failure_rate).",
            ["limit"],
            registry=self.registry,
        )
        self.read_timeouts = Counter(
            "relay_http_read_timeouts",
            "Requests not received in time: connections closed for their headers"
            " (RELAY_HEADER_READ_TIMEOUT), requests answered 408 for their body"
            " (RELAY_BODY_READ_TIMEOUT).",
            ["phase"],
            registry=self.registry,
        )
        self.breaker_state = Gauge(
            "relay_endpoint_circuit",
            "Circuit of each endpoint: 0 closed, 1 half open, 2 open.",
            ["endpoint"],
            registry=self.registry,
        )

    def render(self) -> bytes:
        """The exposition text."""
        return generate_latest(self.registry)
