"""mkdocs hooks: the pages that are generated from the code, so that they cannot drift from it.

- Before each build, the ingress's OpenAPI document (`relay.ingress.openapi`) is written into
  `docs/api/` whole (`openapi.json`) and cut into the three APIs a reader looks for (the
  Messaging API, the conversation API, the admin API), each rendered by neoteroi's
  `[OAD(...)]`. A file is written only when its content changed, so `mkdocs serve` does not
  rebuild for ever on its own writes.
- The configuration page's `<!-- relay:settings -->` marker becomes a table of every field of
  `relay.settings.Settings`: its variable, type, default and meaning. The meaning is the
  comment above the field in relay/settings.py, or a note below where a comment speaks for a
  group of fields or there is none. A field with neither, or a note for a field that no
  longer exists, is a warning, which fails a `--strict` build.
"""

from __future__ import annotations

import ast
import io
import json
import logging
import re
import tokenize
import types
import typing
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from pydantic import SecretStr
from pydantic.fields import FieldInfo

log = logging.getLogger("mkdocs.hooks.relay")

ROOT = Path(__file__).resolve().parent.parent
SETTINGS_SOURCE = ROOT / "relay" / "settings.py"
SETTINGS_MARKER = "<!-- relay:settings -->"
# The title and description of an OpenAPI document as neoteroi renders them, up to its rule.
OAD_TITLE = re.compile(r"^# [^\n]*<span class=\"api-version\">.*?^<hr />\n", re.M | re.S)

# The three APIs of docs/api/, each the paths that start with one of its prefixes.
API_PARTS: dict[str, tuple[str, ...]] = {
    "messaging": ("/webhooks/{integrationId}", "/bot/", "/botframework/"),
    "conversations": ("/webhooks/{integrationId}/",),
    "admin": ("/admin/",),
    "service": ("/healthz", "/readyz", "/metrics", "/openapi.json"),
}

# The meaning of the fields whose comment in relay/settings.py speaks for several fields at
# once, or that have none (written for an operator; the comments are written for the code).
NOTES: dict[str, str] = {
    "amqp_url": "RabbitMQ; a cluster's nodes comma-separated, each a whole URL or `host:port`"
    " (see [A RabbitMQ cluster](operating/cluster.md))",
    "database_url": "`sqlite:///file` (one machine) or `postgresql://…` (several);"
    " `?schema=name` puts PostgreSQL tables in a schema",
    "http_host": "where the ingress (or `relay run`) listens",
    "http_port": "the port the ingress listens on: the API, `/healthz`, `/readyz`, `/metrics`",
    "public_url": "how others reach the ingress (the base of `webhookUrl` and of a bot's reply"
    " URL); empty: `http://{host}:{port}`",
    "bot": "the bot adapter: `echo`, `http`, `botframework`, `module:function` or a"
    " `relay.bots` entry point (see [Bots](bots.md))",
    "bot_url": "the bot's endpoint (`http`, `botframework`)",
    "allowed_endpoint_networks": "subnets the delivery worker may reach despite the SSRF guard"
    " (`make run` allows loopback for the local sink)",
    "max_body_bytes": "request body limit (a `413` above); at most 4 MiB: an envelope holds a"
    " body's text about twice, and RabbitMQ 4 refuses messages over 16 MiB",
    "management_url": "RabbitMQ's management API (`http://user:pass@host:15672/vhost`; on a"
    " cluster several nodes' URLs, comma-separated), for unacked counts, leaders and members"
    " in `relay queues` and the quorum gauges",
    "queue_prefix": "prefix of every exchange and queue",
    "partitions": "partition queues per stage; changed by a rolling restart (see"
    " [Changing the partition count](operating/scaling.md#changing-the-partition-count))",
    "publish_timeout": "seconds to wait for the broker's confirm (then a `503`)",
    "outbox_interval": "seconds between outbox sweeps",
    "rate_limit_per_second": "messages accepted per integration per second, across every"
    " ingress (`0`: no limit); its bot pushes, reads and conversation tokens have a bucket"
    " each at the same rate",
    "bot_integration_concurrency": "turns of one integration's bot in flight in a bot worker"
    " at once (see [Many bots and tenants](tenants.md#a-bot-per-integration))",
    "rate_limit_burst": "the burst above that rate",
    "auth_cache_seconds": "how long an ingress caches integrations and token hashes (a"
    " revocation takes effect within this; admin tokens are looked up on every request)",
    "shutdown_timeout": "seconds in-flight work gets after SIGTERM",
    "bot_timeout": "seconds a bot turn may take",
    "bot_concurrency": "conversations one bot worker handles at once",
    "delivery_worker_port": "the delivery worker's port for `/healthz`, `/readyz`, `/metrics`"
    " when run on its own",
    "delivery_connect_timeout": "seconds to connect to a response endpoint",
    "delivery_timeout": "seconds a delivery may take in all",
    "delivery_concurrency": "conversations one delivery worker delivers to at once",
    "delivery_max_age": "seconds after which a response is given up on, whatever the schedule",
    "breaker_threshold": "consecutive failures that open an endpoint's circuit",
    "breaker_cooldown": "seconds an open circuit waits before one probe goes through",
    "endpoint_concurrency": "deliveries in flight to one endpoint (scheme, host and port)",
    "https_only": "refuse `http://` response endpoints",
    "botframework_app_id": "a Bot Framework bot's app id (empty: the bot runs in no-auth mode)",
    "botframework_app_password": "and its password",
    "log_level": "the lowest level logged",
    "log_format": "log lines for people (coloured, aligned) or for machines (JSON lines), the"
    " same fields either way; `auto` picks the console form on a terminal (see"
    " [Logs](operating/logs.md))",
    "otlp_endpoint": "the OTLP/HTTP collector's base URL (its `/v1/traces` is posted to);"
    " empty: nothing is traced, at no cost (see [Traces](operating/traces.md))",
    "otlp_service_name": "the service name each process reports, suffixed with its role",
    "trace_sample_ratio": "the share of new traces sampled (a back end's sampled"
    " `traceparent` is always kept)",
    "read_token_seconds": "lifetime of a conversation token whose mint names none",
    "stream_keepalive": "the longest silence on an event stream (a keep-alive comment then)",
    "stream_write_timeout": "seconds a write may wait for a stream's reader before the stream"
    " is dropped",
    "stream_limit": "event streams one ingress serves at once (then a `503`)",
    "stream_limit_per_integration": "event streams per integration, per ingress",
    "stream_limit_per_token": "event streams per credential (integration or conversation token),"
    " per ingress",
    "wait_limit": "`?wait` requests waiting at once, per ingress",
    "wait_limit_per_integration": "`?wait` requests waiting at once per integration, per ingress",
    "history_page_bytes": "bytes of items in one history page or stream read (at least one item)",
    "auth_failure_burst": "the burst above that rate",
    "header_read_timeout": "seconds a client may take to send a request's headers (then the"
    " connection closes)",
    "body_read_timeout": "seconds a client may pause while sending its body (then a `408`)",
    "secret_keys": "Fernet keys, comma-separated: signing and bot secrets are stored encrypted"
    " with the first, and any of them decrypts (`relay secrets new-key` makes one; see"
    " [Secrets](operating/security.md#secrets)); empty: stored as they are",
    "metrics_token": "`/metrics` only with this bearer token",
    "metrics_port": "`/metrics` only on this port (and then not on the service's own port)",
    "admin_enabled": "serve the admin API and `/console` at all",
    "admin_port": "serve the admin API and `/console` only on this port",
    "retention_days": "settled messages, responses and attempts older than this many days are"
    " deleted (`0`: kept; see [Retention](operating/retention.md))",
    "prune_interval": "seconds between the janitor's prunes (one process prunes at a time)",
    "dlq_max_age": "seconds a dead letter is kept at most (`0`: no bound)",
    "dlq_max_length": "dead letters kept per stage at most (`0`: no bound)",
}


# --- the OpenAPI documents ---------------------------------------------------------------------


def on_pre_build(config: Any) -> None:
    """Write the OpenAPI document and its three parts into docs/api/."""
    from relay.ingress.openapi import openapi_document  # the app's own builder

    document = openapi_document()
    folder = Path(config["docs_dir"]) / "api"
    write_if_changed(folder / "openapi.json", document)
    for name in API_PARTS:
        write_if_changed(folder / f"openapi-{name}.json", api_part(document, name))


def api_part(document: dict[str, Any], name: str) -> dict[str, Any]:
    """The document with only the paths of one API, and only the schemas they refer to."""
    paths = {path: item for path, item in document["paths"].items() if part_of(path) == name}
    schemas = document["components"]["schemas"]
    kept = referred(paths, schemas)
    components = {**document["components"], "schemas": {k: schemas[k] for k in sorted(kept)}}
    return {**document, "paths": paths, "components": components}


def referred(node: Any, schemas: dict[str, Any]) -> set[str]:
    """The names of the schemas `node` refers to, directly or through other schemas."""
    found: set[str] = set()
    pending = [node]
    while pending:
        item = pending.pop()
        if isinstance(item, dict):
            ref = item.get("$ref")
            name = ref.rsplit("/", 1)[-1] if isinstance(ref, str) else None
            if name in schemas and name not in found:
                found.add(name)
                pending.append(schemas[name])
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
    return found


def part_of(path: str) -> str:
    """The API a path belongs to: the one whose prefix matches it longest."""
    matches = [
        (len(prefix), name)
        for name, prefixes in API_PARTS.items()
        for prefix in prefixes
        if path.startswith(prefix)
    ]
    if not matches:
        log.warning("docs: the OpenAPI path %s belongs to none of docs/api/'s pages", path)
        return ""
    return max(matches)[1]


def write_if_changed(path: Path, document: dict[str, Any]) -> None:
    """Write `document` as JSON unless the file already holds it (atomically: two builds at
    once never read half a file)."""
    text = json.dumps(document, indent=2, ensure_ascii=False) + "\n"
    if path.exists() and path.read_text() == text:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{id(text)}.tmp")
    partial.write_text(text)
    partial.replace(path)


# --- the configuration page ----------------------------------------------------------------


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    """Put the settings table in place of its marker; drop the title that neoteroi's `OAD`
    (which runs first: hooks come after the plugins) gives each API document, a second `#`
    heading on a page that has one, and its word for every bearer scheme: Relay's tokens are
    opaque, not JWTs."""
    markdown = OAD_TITLE.sub("", markdown).replace("JWT Bearer token", "Bearer token")
    if SETTINGS_MARKER not in markdown:
        return markdown
    return markdown.replace(SETTINGS_MARKER, settings_table())


def settings_table() -> str:
    """A Markdown table of every setting: variable, type, default, meaning."""
    from relay.settings import Settings

    comments = field_comments(SETTINGS_SOURCE.read_text())
    fields = Settings.model_fields
    for stale in sorted(set(NOTES) - set(fields)):
        log.warning("docs: a note for %s, which is no longer a setting", stale)
    rows = ["| variable | type | default | meaning |", "|---|---|---|---|"]
    for name, field in fields.items():
        own, group = comments.get(name, ("", ""))
        meaning = NOTES.get(name) or own or group
        if not meaning:
            log.warning("docs: RELAY_%s has no comment in relay/settings.py", name.upper())
        cells = (f"`RELAY_{name.upper()}`", type_text(field), default_text(field), meaning)
        rows.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(rows)


def field_comments(source: str) -> dict[str, tuple[str, str]]:
    """Each field of `Settings`: (its own comment, the comment of the group it is in). A
    comment is the run of comment lines right above a field; a group is the fields that
    follow one comment with no blank line or other comment between."""
    comment_lines = comments_by_line(source)
    found: dict[str, tuple[str, str]] = {}
    group, previous_end = "", 0
    for line, end, name in settings_fields(source):
        own = comment_above(comment_lines, line)
        if own:
            group = own
        elif previous_end != line - 1:
            group = ""
        found[name] = (own, group)
        previous_end = end
    return found


def comments_by_line(source: str) -> dict[int, str]:
    """The text of every line that holds only a comment, by line number."""
    lines = source.splitlines()
    tokens = tokenize.generate_tokens(io.StringIO(source).readline)
    return {
        token.start[0]: token.string.lstrip("#").strip()
        for token in tokens
        if token.type == tokenize.COMMENT and lines[token.start[0] - 1].lstrip().startswith("#")
    }


def comment_above(comment_lines: dict[int, str], line: int) -> str:
    """The comment lines right above `line`, joined."""
    above: list[str] = []
    while line - 1 - len(above) in comment_lines:
        above.insert(0, comment_lines[line - 1 - len(above)])
    return " ".join(above)


def settings_fields(source: str) -> Iterable[tuple[int, int, str]]:
    """(first line, last line, name) of each annotated field of the Settings class."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ClassDef) and node.name == "Settings":
            for statement in node.body:
                if isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name):
                    end = statement.end_lineno or statement.lineno
                    yield statement.lineno, end, statement.target.id


def type_text(field: FieldInfo) -> str:
    """The field's type in an operator's words, with its bounds."""
    text = type_name(field.annotation)
    bounds = [bound for item in field.metadata for bound in bound_texts(item)]
    return f"{text} ({', '.join(bounds)})" if bounds else text


def type_name(annotation: Any) -> str:
    """A type as the environment spells it."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return "one of " + ", ".join(f"`{arg}`" for arg in args)
    if origin is list:
        return f"list of {type_name(args[0])}, comma-separated"
    if origin in (typing.Union, types.UnionType):
        kept = [arg for arg in args if arg is not type(None)]
        if all("Network" in getattr(arg, "__name__", "") for arg in kept):
            return "network (CIDR)"
        return " or ".join(type_name(arg) for arg in kept) + (
            ", optional" if len(kept) < len(args) else ""
        )
    names = {bool: "boolean", int: "integer", float: "number", str: "text", SecretStr: "secret"}
    return names.get(annotation, getattr(annotation, "__name__", str(annotation)))


BOUNDS: dict[str, Callable[[Any], str]] = {
    "ge": lambda value: f"≥ {number(value)}",
    "gt": lambda value: f"> {number(value)}",
    "le": lambda value: f"≤ {number(value)}",
    "lt": lambda value: f"< {number(value)}",
    "pattern": lambda value: f"`{value}`",
}


def bound_texts(item: Any) -> list[str]:
    """What one metadata item of a field says about its values."""
    return [
        render(getattr(item, key))
        for key, render in BOUNDS.items()
        if getattr(item, key, None) is not None
    ]


def default_text(field: FieldInfo) -> str:
    """The default as one would write it in the environment (a dash for none)."""
    value = field.get_default(call_default_factory=True)
    if isinstance(value, SecretStr):
        value = value.get_secret_value()
    if isinstance(value, list):
        value = ",".join(number(item) for item in value)
    if isinstance(value, bool):
        value = str(value).lower()
    if value is None or value == "":
        return "\N{EN DASH}"
    return f"`{number(value)}`"


def number(value: Any) -> str:
    """A float without a needless `.0`."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)
