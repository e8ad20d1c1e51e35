"""One frozen configuration for every Relay service, read from `RELAY_*` variables and `.env`."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from typing import Annotated, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from relay.broker.addresses import parse_addresses
from relay.store.secrets import SecretBox

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class Settings(BaseSettings):
    """Relay configuration. Built once in `main()` and passed down; never read at import time."""

    model_config = SettingsConfigDict(
        env_prefix="RELAY_", env_file=".env", extra="ignore", frozen=True
    )

    amqp_url: str = "amqp://guest:guest@127.0.0.1:5672/"
    database_url: str = "sqlite:///relay.db"
    http_host: str = "127.0.0.1"
    http_port: int = Field(default=8080, ge=0, le=65535)
    public_url: str = ""
    bot: str = "echo"
    bot_url: str = ""
    allowed_endpoint_networks: Annotated[list[Network], NoDecode] = Field(default_factory=list)

    # Connections each process may hold to PostgreSQL (max_connections is shared by all).
    database_pool_size: int = Field(default=10, ge=1, le=1000)
    # How long a service keeps trying to reach its database at start before giving up.
    startup_wait: float = Field(default=60.0, ge=0)
    queue_prefix: str = Field(default="relay", pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    partitions: int = Field(default=8, ge=1, le=256)
    # At most 4 MiB: an envelope holds a body's text about twice, and RabbitMQ 4 refuses
    # messages over 16 MiB by default.
    max_body_bytes: int = Field(default=256 * 1024, ge=1024, le=4 * 1024 * 1024)
    publish_timeout: float = Field(default=5.0, gt=0)
    # A pending (unconfirmed) inbound message older than this is taken over by the outbox sweeper.
    outbox_lease: float = Field(default=30.0, gt=0)
    outbox_interval: float = Field(default=5.0, gt=0)
    rate_limit_per_second: float = Field(default=100.0, ge=0)
    rate_limit_burst: int = Field(default=200, ge=1)
    auth_cache_seconds: float = Field(default=5.0, ge=0)
    shutdown_timeout: float = Field(default=15.0, gt=0)
    # Workers announce themselves this often; each then keeps its fair share of partitions.
    presence_interval: float = Field(default=2.0, gt=0)
    # How often a worker service looks for partition counts other services run with.
    generations_interval: float = Field(default=5.0, gt=0)
    # A partition whose oldest message held unstarted is older than this is reported as
    # stalled (metric, /readyz, an error log line).
    stall_seconds: float = Field(default=60.0, gt=0)
    # Every service refreshes its queue gauges (depth, consumers, dead letters) this often.
    queue_watch_interval: float = Field(default=15.0, gt=0)
    # RabbitMQ's management API (http://user:pass@host:15672/vhost), for unacked counts.
    management_url: str = ""
    # The bot worker: its own port for /healthz, /readyz, /metrics when run on its own.
    bot_worker_port: int = Field(default=8081, ge=0, le=65535)
    bot_timeout: float = Field(default=10.0, gt=0)
    bot_concurrency: int = Field(default=32, ge=1, le=1024)
    # Turns of one integration's bot in flight at once, so that a slow bot cannot take every
    # one of the worker's turns from the other integrations' bots.
    bot_integration_concurrency: int = Field(default=16, ge=1, le=1024)
    # The Python modules an integration's own bot (`module:function`, named through the admin
    # API) may come from, comma-separated: each a module with its submodules; `*`: any.
    # RELAY_BOT and the `relay.bots` entry points are the operator's own, always allowed.
    bot_modules: Annotated[list[str], NoDecode] = Field(default_factory=lambda: ["*"])
    # Waits between attempts at a failing bot; after the last one, the dead-letter queue.
    bot_retry_delays: Annotated[list[float], NoDecode] = Field(
        default_factory=lambda: [1.0, 5.0, 30.0]
    )
    # The delivery worker.
    delivery_worker_port: int = Field(default=8082, ge=0, le=65535)
    delivery_connect_timeout: float = Field(default=5.0, gt=0)
    delivery_timeout: float = Field(default=15.0, gt=0)
    delivery_concurrency: int = Field(default=64, ge=1, le=4096)
    # Wait before each attempt: immediately, 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 10 h.
    delivery_retry_schedule: Annotated[list[float], NoDecode] = Field(
        default_factory=lambda: [0.0, 5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 36000.0]
    )
    # The fixed TTLs of the outbound delay queues; any wait is made of hops through them.
    delivery_delay_queues: Annotated[list[float], NoDecode] = Field(
        default_factory=lambda: [1.0, 5.0, 30.0, 300.0, 1800.0, 7200.0]
    )
    delivery_max_age: float = Field(default=3 * 24 * 3600, gt=0)
    # After a timeout or a 429, wait at least this long: the endpoint is struggling.
    delivery_overload_penalty: float = Field(default=30.0, ge=0)
    breaker_threshold: int = Field(default=5, ge=1)
    breaker_cooldown: float = Field(default=30.0, gt=0)
    endpoint_concurrency: int = Field(default=8, ge=1)
    https_only: bool = False
    # Bot Framework: the bot's app id and password (empty for a bot in no-auth mode).
    botframework_app_id: str = ""
    botframework_app_password: str = ""
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # Log lines for people (coloured, aligned) or for machines (JSON), the same fields either
    # way; `auto` picks the console form when the stream is a terminal.
    log_format: Literal["auto", "console", "json"] = "auto"
    # Traces over OTLP/HTTP (`relay.tracing`): the collector's base URL (its /v1/traces is
    # posted to), empty to trace nothing at no cost; the name each service reports, suffixed
    # with its role; the share of new traces sampled (a back end's sampled parent is kept).
    otlp_endpoint: str = ""
    otlp_service_name: str = Field(default="relay", pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    trace_sample_ratio: float = Field(default=1.0, ge=0, le=1)
    # The conversation API (`relay.ingress.conversations`): a conversation token's lifetime
    # when its mint names none (`relay.ingress.conversation_tokens`), the longest silence on
    # an event stream, how long a write to a stream may wait for its reader before the
    # stream is dropped, and how many streams one ingress serves.
    read_token_seconds: float = Field(default=3600.0, gt=0)
    stream_keepalive: float = Field(default=15.0, gt=0, le=15.0)
    stream_write_timeout: float = Field(default=10.0, gt=0)
    stream_limit: int = Field(default=1000, ge=1)
    # Fair shares of one ingress (`relay.ingress.limits`): event streams per integration and
    # per credential (integration token or conversation token), concurrent `?wait` requests per
    # ingress and per integration, and the bytes of one history page.
    stream_limit_per_integration: int = Field(default=100, ge=1)
    stream_limit_per_token: int = Field(default=10, ge=1)
    wait_limit: int = Field(default=1000, ge=1)
    wait_limit_per_integration: int = Field(default=100, ge=1)
    history_page_bytes: int = Field(default=1024 * 1024, ge=64 * 1024)
    # Requests that fail authentication, per client address: a token bucket (0: no limit).
    auth_failure_rate: float = Field(default=5.0, ge=0)
    auth_failure_burst: int = Field(default=50, ge=1)
    # Proxies whose X-Forwarded-For names the client (else the peer address is the client).
    trusted_proxies: Annotated[list[Network], NoDecode] = Field(default_factory=list)
    # Integrations (with their token hashes) one process keeps in memory, least recent first out.
    directory_cache_size: int = Field(default=10_000, ge=1)
    # Seconds a client may take to send a request's headers, and may pause while sending its
    # body.
    header_read_timeout: float = Field(default=10.0, gt=0)
    body_read_timeout: float = Field(default=30.0, gt=0)
    # Seconds a kept-alive connection may stay silent between requests (above a proxy's own
    # idle timeout, so that the proxy closes first).
    keepalive_timeout: float = Field(default=75.0, gt=0)
    # Secrets at rest (`relay.store.secrets`): Fernet keys, comma-separated, the first encrypts
    # and every one decrypts (empty: secrets are stored as they are).
    secret_keys: Annotated[list[SecretStr], NoDecode] = Field(default_factory=list)
    # /metrics: behind this bearer token when set; on a port of its own when set (and then
    # not on the service's own port).
    metrics_token: SecretStr = SecretStr("")
    metrics_port: int | None = Field(default=None, ge=0, le=65535)
    # The admin API and /console: off, or on a listener of their own (RELAY_ADMIN_PORT).
    admin_enabled: bool = True
    admin_port: int | None = Field(default=None, ge=0, le=65535)
    # `relay run` serves a local chat page at /chat (`make run` turns it on).
    chat_page: bool = False
    # `relay run`: `3` runs the bot worker and the delivery worker in processes of their own
    # beside the ingress, so that every core works (a worker that exits is started again);
    # `1` runs all three in one process; `auto` is 3 where the process may use several cores.
    run_processes: Literal["auto", "1", "3"] = "auto"
    # Retention (`relay.admin.retention`): what is settled and older than this many days goes (0:
    # kept for ever), pruned by the worker services' janitor every `prune_interval` seconds.
    retention_days: int = Field(default=30, ge=0)
    prune_interval: float = Field(default=3600.0, gt=0)
    # Dead letters older than `dlq_max_age` seconds, or beyond `dlq_max_length` per stage, are
    # expired by the janitor, each counted and logged with its ids (0: no bound).
    dlq_max_age: float = Field(default=14 * 24 * 3600.0, ge=0)
    dlq_max_length: int = Field(default=100_000, ge=0)

    @field_validator(
        "allowed_endpoint_networks",
        "trusted_proxies",
        "secret_keys",
        "bot_modules",
        "bot_retry_delays",
        "delivery_retry_schedule",
        "delivery_delay_queues",
        mode="before",
    )
    @classmethod
    def _split_commas(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("bot_retry_delays", "delivery_delay_queues")
    @classmethod
    def _positive_delays(cls, value: list[float]) -> list[float]:
        if not value or any(delay <= 0 for delay in value):
            raise ValueError("must be one or more positive numbers of seconds")
        return value

    @field_validator("delivery_retry_schedule")
    @classmethod
    def _schedule(cls, value: list[float]) -> list[float]:
        if not value or any(delay < 0 for delay in value):
            raise ValueError("must be one or more numbers of seconds, 0 or more")
        return value

    @field_validator("secret_keys")
    @classmethod
    def _fernet_keys(cls, value: list[SecretStr]) -> list[SecretStr]:
        SecretBox.of(value)  # a key that is not one is refused by its place, never shown
        return value

    @field_validator("database_url")
    @classmethod
    def _known_database(cls, value: str) -> str:
        if not value.startswith(("sqlite://", "postgresql://", "postgres://")):
            raise ValueError("must start with sqlite:// or postgresql://")
        return value

    @field_validator("amqp_url")
    @classmethod
    def _amqp_addresses(cls, value: str) -> str:
        parse_addresses(value)  # a cluster's nodes, comma-separated: see relay.broker.addresses
        return value

    @model_validator(mode="after")
    def _lease_outlives_publish(self) -> Settings:
        # A lease shorter than a publish could hand a message being published to the outbox.
        if self.outbox_lease <= 2 * self.publish_timeout:
            raise ValueError("RELAY_OUTBOX_LEASE must be more than twice RELAY_PUBLISH_TIMEOUT")
        return self

    @property
    def public_base_url(self) -> str:
        """How others reach the ingress: RELAY_PUBLIC_URL, or http://{host}:{port}."""
        return (self.public_url or f"http://{self.http_host}:{self.http_port}").rstrip("/")


def describe_error(error: ValidationError) -> str:
    """Render a settings validation error as one line per bad variable."""
    lines = ["invalid configuration:"]
    for item in error.errors():
        field = str(item["loc"][0]) if item["loc"] else ""
        name = f"RELAY_{field.upper()}" if field else "settings"
        # URLs may carry passwords, and keys and tokens are secrets: never echo them.
        secret = field.endswith(("_url", "_keys", "_token", "_password", "_secret"))
        shown = "" if not field or secret else f" (got {item.get('input')!r})"
        lines.append(f"  {name}: {item['msg']}{shown}")
    return "\n".join(lines)


def allows_bot_module(allowed: Sequence[str], adapter: str) -> bool:
    """Whether RELAY_BOT_MODULES (`allowed`) lets an integration name the bot `adapter`: a
    built-in adapter or an entry point's name always; `module:function` if its module is one
    allowed, or inside one."""
    module, colon, _ = adapter.partition(":")
    if not colon or "*" in allowed:
        return True
    return any(module == name or module.startswith(f"{name}.") for name in allowed)
