"""What `relay <service> --help` (and `relay prune --help`) says: the settings each reads.

Kept next to the command rather than derived from `Settings`, because what matters to an
operator is which of them a role uses; `tests/test_cli.py` checks every name exists.
"""

from __future__ import annotations

# Every service: where the broker and the store are, and how it stops.
_COMMON = (
    ("RELAY_AMQP_URL", "RabbitMQ (a cluster's nodes comma-separated)"),
    ("RELAY_DATABASE_URL", "sqlite:///file or postgresql://…"),
    ("RELAY_QUEUE_PREFIX", "prefix of every exchange and queue"),
    ("RELAY_PARTITIONS", "partition queues per stage"),
    ("RELAY_SHUTDOWN_TIMEOUT", "seconds to finish what is in hand after SIGTERM"),
    ("RELAY_STARTUP_WAIT", "seconds to keep trying the database at start"),
    ("RELAY_SECRET_KEYS", "Fernet keys sealing stored secrets; the first seals, all open"),
    ("RELAY_QUEUE_WATCH_INTERVAL", "seconds between refreshes of the queue gauges"),
    ("RELAY_MANAGEMENT_URL", "RabbitMQ's management API, for the quorum gauges"),
    ("RELAY_LOG_LEVEL", "debug, info, warning or error"),
    ("RELAY_LOG_FORMAT", "auto (console at a terminal, else JSON), console or json"),
)
_INGRESS = (
    ("RELAY_HTTP_HOST", "address to listen on (127.0.0.1)"),
    ("RELAY_HTTP_PORT", "port to listen on (8080): the API, /healthz, /readyz, /metrics"),
    ("RELAY_PUBLIC_URL", "how back ends reach this ingress (the base of webhookUrl)"),
    ("RELAY_MAX_BODY_BYTES", "request body limit"),
    ("RELAY_PUBLISH_TIMEOUT", "seconds to wait for the broker's confirm before a 503"),
    ("RELAY_RATE_LIMIT_PER_SECOND", "requests per integration per second (0: no limit)"),
    ("RELAY_RATE_LIMIT_BURST", "burst above that rate"),
    ("RELAY_AUTH_CACHE_SECONDS", "how long tokens and integrations are cached"),
    ("RELAY_OUTBOX_LEASE", "seconds before an unconfirmed message is published again"),
    ("RELAY_OUTBOX_INTERVAL", "seconds between outbox sweeps"),
    ("RELAY_READ_TOKEN_SECONDS", "lifetime of a conversation token whose mint names none"),
    ("RELAY_STREAM_KEEPALIVE", "longest silence on an event stream"),
    ("RELAY_STREAM_WRITE_TIMEOUT", "seconds a stream's reader may fall behind"),
    ("RELAY_STREAM_LIMIT", "event streams served at once"),
    ("RELAY_CHAT_PAGE", "serve the local chat page at /chat"),
)
_WORKERS = (
    ("RELAY_PRESENCE_INTERVAL", "seconds between heartbeats (partition sharing)"),
    ("RELAY_GENERATIONS_INTERVAL", "seconds between looks for other partition counts"),
    ("RELAY_STALL_SECONDS", "a partition whose oldest message waits longer is stalled"),
    ("RELAY_RETENTION_DAYS", "delete what is settled and older than this (0: keep all)"),
    ("RELAY_PRUNE_INTERVAL", "seconds between prunes (one process at a time prunes)"),
    ("RELAY_DLQ_MAX_AGE", "seconds a dead letter is kept (0: no bound)"),
    ("RELAY_DLQ_MAX_LENGTH", "dead letters kept per stage (0: no bound)"),
)
_BOT = (
    ("RELAY_BOT_WORKER_PORT", "port of /healthz, /readyz, /metrics (8081)"),
    ("RELAY_BOT", "the bot adapter: echo, http, botframework, or module:callable"),
    ("RELAY_BOT_URL", "the bot's endpoint (http, botframework)"),
    ("RELAY_BOT_MODULES", "modules an integration's own Python bot may come from (*: any)"),
    ("RELAY_BOT_TIMEOUT", "seconds a turn may take"),
    ("RELAY_BOT_CONCURRENCY", "conversations handled at once"),
    ("RELAY_BOT_RETRY_DELAYS", "seconds between attempts at a failing bot"),
    ("RELAY_BOTFRAMEWORK_APP_ID", "a Bot Framework bot's app id"),
    ("RELAY_BOTFRAMEWORK_APP_PASSWORD", "and its password"),
    ("RELAY_PUBLIC_URL", "base of the reply URL a bot answers later through"),
)
_DELIVERY = (
    ("RELAY_DELIVERY_WORKER_PORT", "port of /healthz, /readyz, /metrics (8082)"),
    ("RELAY_DELIVERY_CONCURRENCY", "conversations delivered at once"),
    ("RELAY_DELIVERY_RETRY_SCHEDULE", "seconds before each attempt"),
    ("RELAY_DELIVERY_DELAY_QUEUES", "TTLs of the outbound delay queues"),
    ("RELAY_DELIVERY_CONNECT_TIMEOUT", "seconds to connect to an endpoint"),
    ("RELAY_DELIVERY_TIMEOUT", "seconds an endpoint may take to answer"),
    ("RELAY_DELIVERY_MAX_AGE", "give up on a response older than this"),
    ("RELAY_DELIVERY_OVERLOAD_PENALTY", "least wait after a timeout or a 429"),
    ("RELAY_BREAKER_THRESHOLD", "failures that open an endpoint's circuit"),
    ("RELAY_BREAKER_COOLDOWN", "seconds an open circuit waits"),
    ("RELAY_ENDPOINT_CONCURRENCY", "requests in flight per endpoint"),
    ("RELAY_ALLOWED_ENDPOINT_NETWORKS", "subnets reachable despite the SSRF guard"),
    ("RELAY_HTTPS_ONLY", "refuse http:// endpoints"),
)
# `relay run`: whether its workers run in processes of their own, and their status ports then.
_RUN = (
    ("RELAY_RUN_PROCESSES", "auto (3 on several cores), 1 (one process) or 3 (one per role)"),
    ("RELAY_BOT_WORKER_PORT", "with 3: the bot worker's /healthz, /readyz, /metrics (a free one)"),
    ("RELAY_DELIVERY_WORKER_PORT", "with 3: the delivery worker's (a free one)"),
)

SERVICE_SETTINGS: dict[str, tuple[tuple[str, str], ...]] = {
    "ingress": _INGRESS + _COMMON,
    "bot-worker": _BOT + _WORKERS + _COMMON,
    "delivery-worker": _DELIVERY + _WORKERS + _COMMON,
    # The ingress's port (RELAY_HTTP_PORT) for everything, unless the workers run apart.
    "run": _RUN + _INGRESS + _BOT[1:] + _DELIVERY[1:] + _WORKERS + _COMMON,
    # `relay prune`: the age is its argument; the store is all it touches.
    "prune": (
        ("RELAY_DATABASE_URL", "sqlite:///file or postgresql://…"),
        ("RELAY_LOG_LEVEL", "of the log lines -v prints"),
    ),
}


def settings_epilog(role: str) -> str:
    """The settings a service reads, one per line, for its --help."""
    seen: set[str] = set()
    lines = ["settings (environment variables, or a .env file in the working folder):"]
    for name, meaning in SERVICE_SETTINGS[role]:
        if name not in seen:
            seen.add(name)
            lines.append(f"  {name:<34} {meaning}")
    return "\n".join(lines)
