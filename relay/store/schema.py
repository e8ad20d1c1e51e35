"""Versioned schema, written once for both dialects.

Each entry of `MIGRATIONS_TEMPLATE` is one schema version; append, never edit a released entry.
`{ts}` is the timestamp type of the dialect.
"""

from __future__ import annotations

from relay.store.driver import Driver

_TYPES = {
    "postgresql": {"ts": "TIMESTAMPTZ"},
    "sqlite": {"ts": "TEXT"},
}

_V1 = """
CREATE TABLE integrations (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    response_url TEXT NOT NULL,
    signing_secret TEXT NOT NULL,
    created_at {ts} NOT NULL,
    disabled_at {ts}
);
CREATE TABLE tokens (
    id TEXT PRIMARY KEY,
    integration_id TEXT NOT NULL REFERENCES integrations(id) ON DELETE CASCADE,
    kind TEXT NOT NULL,
    token_hash TEXT NOT NULL UNIQUE,
    prefix TEXT NOT NULL,
    created_at {ts} NOT NULL,
    revoked_at {ts}
);
CREATE INDEX tokens_integration ON tokens (integration_id, kind);
CREATE TABLE users (
    id TEXT PRIMARY KEY,
    integration_id TEXT NOT NULL REFERENCES integrations(id) ON DELETE CASCADE,
    external_id TEXT NOT NULL,
    created_at {ts} NOT NULL,
    updated_at {ts} NOT NULL,
    UNIQUE (integration_id, external_id)
);
CREATE TABLE conversations (
    id TEXT PRIMARY KEY,
    integration_id TEXT NOT NULL REFERENCES integrations(id) ON DELETE CASCADE,
    external_id TEXT NOT NULL,
    created_at {ts} NOT NULL,
    updated_at {ts} NOT NULL,
    UNIQUE (integration_id, external_id)
);
CREATE TABLE messages (
    id TEXT PRIMARY KEY,
    integration_id TEXT NOT NULL REFERENCES integrations(id) ON DELETE CASCADE,
    external_id TEXT,
    -- No cascade: removing an unused user or conversation must fail, not take messages along.
    conversation_id TEXT NOT NULL REFERENCES conversations(id),
    user_id TEXT NOT NULL REFERENCES users(id),
    direction TEXT NOT NULL,
    type TEXT NOT NULL,
    text TEXT NOT NULL,
    payload TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    state TEXT NOT NULL,
    lease_until {ts},
    lease_owner TEXT,
    request_id TEXT,
    created_at {ts} NOT NULL,
    updated_at {ts} NOT NULL,
    UNIQUE (integration_id, external_id)
);
CREATE INDEX messages_conversation ON messages (conversation_id);
CREATE INDEX messages_user ON messages (user_id);
CREATE INDEX messages_pending ON messages (state, lease_until);
"""

# Bot replies: per-conversation sequence numbers, links to what they answer, idempotency of
# pushed replies, and "the bot's replies are stored" for inbound messages.
_V2 = """
ALTER TABLE conversations ADD COLUMN next_sequence INTEGER NOT NULL DEFAULT 0;
ALTER TABLE integrations ADD COLUMN bot_secret TEXT;
ALTER TABLE messages ADD COLUMN sequence INTEGER;
ALTER TABLE messages ADD COLUMN reply_to TEXT;
ALTER TABLE messages ADD COLUMN handled_at {ts};
ALTER TABLE messages ADD COLUMN idempotency_key TEXT;
CREATE UNIQUE INDEX messages_idempotency ON messages (conversation_id, idempotency_key);
CREATE INDEX messages_reply_to ON messages (reply_to)
"""

# Delivery: secret rotation with a grace period, and the log of every delivery attempt.
_V3 = """
ALTER TABLE integrations ADD COLUMN previous_secret TEXT;
ALTER TABLE integrations ADD COLUMN previous_secret_until {ts};
CREATE TABLE delivery_attempts (
    id TEXT PRIMARY KEY,
    delivery_id TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    integration_id TEXT NOT NULL,
    message_id TEXT NOT NULL,
    status INTEGER,
    latency_ms DOUBLE PRECISION,
    error TEXT,
    next_attempt_at {ts},
    response_body TEXT,
    created_at {ts} NOT NULL
);
CREATE INDEX delivery_attempts_delivery ON delivery_attempts (delivery_id, created_at)
"""

# Order across workers: a worker meeting a conversation asks which of its messages still wait
# for a retry (responses: by their attempt log; inbound messages: `retry_at`, and `dead_at`
# once dead-lettered).
_V4 = """
CREATE INDEX delivery_attempts_message ON delivery_attempts (message_id, created_at);
ALTER TABLE messages ADD COLUMN retry_at {ts};
ALTER TABLE messages ADD COLUMN dead_at {ts}
"""

# Partition counts that change on a running system (relay.pipeline.generations): the
# count each message was published under, the count each conversation is published under
# per stage (NULL: whichever the publisher has), and every count in use.
_V5 = """
ALTER TABLE messages ADD COLUMN partitions INTEGER;
ALTER TABLE conversations ADD COLUMN inbound_partitions INTEGER;
ALTER TABLE conversations ADD COLUMN outbound_partitions INTEGER;
CREATE TABLE partition_counts (
    partitions INTEGER PRIMARY KEY,
    seen_at {ts} NOT NULL
)
"""

# The conversation API's history (relay.store.sql.history): each message stamped once, when
# it becomes visible, with where it sits in the order of visibility. Rows written before
# keep the order they were made in. PostgreSQL: the writing transaction's id and a sequence
# (what is older than every transaction still running is final); SQLite: a counter of
# writing statements and the rowid (its writers take turns).
_V6 = {
    "postgresql": """
CREATE SEQUENCE message_items;
ALTER TABLE messages ADD COLUMN txid BIGINT;
ALTER TABLE messages ADD COLUMN item BIGINT;
UPDATE messages SET txid = 0, item = numbered.n FROM (
    SELECT id, row_number() OVER (ORDER BY created_at, COALESCE(sequence, 0), id) AS n
    FROM messages WHERE direction = 'outgoing' OR state = 'queued'
) AS numbered WHERE messages.id = numbered.id;
SELECT setval('message_items', (SELECT COALESCE(MAX(item), 0) + 1 FROM messages), false);
CREATE INDEX messages_conversation_items ON messages (conversation_id, txid, item);
CREATE INDEX messages_integration_items ON messages (integration_id, txid, item)
""",
    "sqlite": """
ALTER TABLE messages ADD COLUMN txid INTEGER;
ALTER TABLE messages ADD COLUMN item INTEGER;
UPDATE messages SET txid = numbered.n FROM (
    SELECT id, row_number() OVER (ORDER BY created_at, COALESCE(sequence, 0), id) AS n
    FROM messages WHERE direction = 'outgoing' OR state = 'queued'
) AS numbered WHERE messages.id = numbered.id;
CREATE INDEX messages_conversation_items ON messages (conversation_id, txid);
CREATE INDEX messages_integration_items ON messages (integration_id, txid);
CREATE INDEX messages_items ON messages (txid)
""",
}

# The admin API's tokens: an operator's, of no integration (hashed like the others).
_V7 = """
CREATE TABLE admin_tokens (
    id TEXT PRIMARY KEY,
    token_hash TEXT NOT NULL UNIQUE,
    prefix TEXT NOT NULL,
    created_at {ts} NOT NULL,
    revoked_at {ts}
)
"""

# Retention (relay.store.sql.retention): a lease per named job, so that one process at a
# time prunes, and the indexes its batches read oldest first (by creation; users and
# conversations by id too, as it pages through them).
_V8 = """
CREATE TABLE leases (
    name TEXT PRIMARY KEY,
    holder TEXT NOT NULL,
    held_until {ts} NOT NULL
);
CREATE INDEX messages_created ON messages (created_at);
CREATE INDEX delivery_attempts_created ON delivery_attempts (created_at);
CREATE INDEX conversations_updated ON conversations (updated_at, id);
CREATE INDEX users_updated ON users (updated_at, id)
"""

# Dead letters (relay.pipeline.dlq): kept here, the dead-letter queues only carry them here, so
# that listing one never takes it off a queue. A letter is known by its stage and id (a relay
# message id, or a delivery id); `dead_at` is unix seconds, the order listings page in;
# `deaths` counts its deaths, so that a replay forgets only the death it replayed.
_V9 = """
CREATE TABLE dead_letters (
    stage TEXT NOT NULL,
    id TEXT NOT NULL,
    deaths INTEGER NOT NULL,
    integration_id TEXT NOT NULL,
    conversation_id TEXT NOT NULL,
    reason TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    last_status INTEGER,
    dead_at BIGINT NOT NULL,
    body TEXT NOT NULL,
    PRIMARY KEY (stage, id)
);
CREATE INDEX dead_letters_order ON dead_letters (dead_at, stage, id);
CREATE INDEX dead_letters_stage ON dead_letters (stage, dead_at, id);
CREATE INDEX dead_letters_integration ON dead_letters (integration_id, dead_at, stage, id)
"""

# Inbound order (relay.store.sql.new_messages): each incoming message numbered in its conversation
# by the statement that writes it, from the conversation's counter (the last number given).
# Numbers only grow: a message discarded, or a messageId found there already, leaves a gap.
# Rows written before stay unnumbered (NULL): no check, like the envelopes of before.
_V10 = """
ALTER TABLE conversations ADD COLUMN inbound_sequence INTEGER NOT NULL DEFAULT 0;
ALTER TABLE messages ADD COLUMN inbound_sequence INTEGER
"""

# A bot per integration (relay.store.sql.integrations): the adapter it names (NULL: the
# deployment's RELAY_BOT), the adapter's URL, and its credentials as one sealed JSON object.
_V11 = """
ALTER TABLE integrations ADD COLUMN bot_adapter TEXT;
ALTER TABLE integrations ADD COLUMN bot_url TEXT;
ALTER TABLE integrations ADD COLUMN bot_credentials TEXT
"""

# Per-integration delivery options (relay.store.sql.integrations): where operations events
# go, the pace of deliveries (responses per second and burst; NULL: unpaced), and the
# seconds after which an undelivered response of a type is dropped (JSON; NULL: the default,
# typing after 30 s). Conversation tokens (relay.store.sql.conversation_tokens): what a
# browser holds for one user of one conversation, stored as a hash, as integration tokens.
_V12 = """
ALTER TABLE integrations ADD COLUMN operations_url TEXT;
ALTER TABLE integrations ADD COLUMN delivery_rate DOUBLE PRECISION;
ALTER TABLE integrations ADD COLUMN delivery_burst INTEGER;
ALTER TABLE integrations ADD COLUMN expiring_types TEXT;
CREATE TABLE conversation_tokens (
    id TEXT PRIMARY KEY,
    integration_id TEXT NOT NULL REFERENCES integrations(id) ON DELETE CASCADE,
    conversation_external_id TEXT NOT NULL,
    user_external_id TEXT NOT NULL,
    scope TEXT NOT NULL,
    token_hash TEXT NOT NULL UNIQUE,
    prefix TEXT NOT NULL,
    expires_at {ts} NOT NULL,
    created_at {ts} NOT NULL,
    revoked_at {ts}
);
CREATE INDEX conversation_tokens_conversation
    ON conversation_tokens (integration_id, conversation_external_id)
"""

# Token buckets shared by every process on the store (relay.store.sql.rate_buckets): the
# ingress's rate limit per integration across ingresses, the delivery pace per integration
# across delivery workers. `stamp` is a Unix time (seconds), as the processes' clocks say.
_V13 = """
CREATE TABLE rate_buckets (
    key TEXT PRIMARY KEY,
    tokens DOUBLE PRECISION NOT NULL,
    stamp DOUBLE PRECISION NOT NULL
)
"""

# A version is one script for both dialects, or one per dialect.
MIGRATIONS_TEMPLATE: list[str | dict[str, str]] = [
    _V1,
    _V2,
    _V3,
    _V4,
    _V5,
    _V6,
    _V7,
    _V8,
    _V9,
    _V10,
    _V11,
    _V12,
    _V13,
]


def migrations(dialect: str) -> list[str]:
    """The migration scripts for one dialect, in version order."""
    types = _TYPES[dialect]
    return [
        script[dialect] if isinstance(script, dict) else script.format(**types)
        for script in MIGRATIONS_TEMPLATE
    ]


def statements(script: str) -> list[str]:
    """Split a migration script into statements (the scripts hold no literal semicolons)."""
    return [part.strip() for part in script.split(";") if part.strip()]


async def apply_migrations(driver: Driver) -> int:
    """Bring the schema to the latest version, once, under the driver's lock; the version."""
    scripts = migrations(driver.dialect)
    async with driver.transaction() as conn:
        if driver.migration_lock:
            await conn.execute(driver.migration_lock)
        await conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER)")
        row = await conn.fetchone("SELECT max(version) AS v FROM schema_version")
        current = int((row or {}).get("v") or 0)
        if current > len(scripts):
            raise RuntimeError(
                f"the database schema is at version {current}, newer than this Relay "
                f"knows ({len(scripts)}): upgrade Relay before starting it on this database"
            )
        for version, script in enumerate(scripts[current:], start=current + 1):
            for statement in statements(script):
                await conn.execute(statement)
            await conn.execute("INSERT INTO schema_version (version) VALUES (?)", version)
    return len(scripts)
