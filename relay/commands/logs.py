"""structlog set up once per process; ids are bound as context variables and follow the message.

Two renderings of the same fields: JSON lines for machines (a log shipper, `docker logs`, a
file) and aligned, coloured lines for a person watching a terminal (`make run`, a service
started by hand). `RELAY_LOG_FORMAT=auto` (the default) picks the console form when the
stream is a terminal and JSON otherwise; `console` or `json` forces one. Libraries that log
through the standard `logging` module (aio-pika, aiohttp, asyncio) are rendered by the same
processors, so every line on the stream has one form.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, Literal, TextIO

import orjson
import structlog
from structlog.typing import Processor

LogFormat = Literal["auto", "console", "json"]

# Libraries whose debug lines carry data, not events: aiosqlite logs every statement with its
# parameters (token hashes, bot secrets, user text). Kept at info even when Relay is at debug.
_QUIET = ("aiosqlite",)

_SHARED: list[Processor] = [
    structlog.contextvars.merge_contextvars,
    structlog.stdlib.add_log_level,
    structlog.stdlib.add_logger_name,
    structlog.processors.TimeStamper(fmt="iso", utc=True),
]


def resolved_format(fmt: LogFormat, stream: TextIO) -> Literal["console", "json"]:
    """The form `fmt` means on `stream`: `auto` is the console form on a terminal only."""
    if fmt != "auto":
        return fmt
    isatty = getattr(stream, "isatty", None)
    return "console" if isatty is not None and isatty() else "json"


def _renderer(form: Literal["console", "json"], stream: TextIO) -> list[Processor]:
    if form == "json":
        return [
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(serializer=_json_line),
        ]
    # Colour only where it can be seen, and never against https://no-color.org. Tracebacks
    # are plain: the rich formatter would print each frame's locals, tokens and secrets
    # among them.
    isatty = getattr(stream, "isatty", None)
    colors = isatty is not None and isatty() and "NO_COLOR" not in os.environ
    return [
        structlog.dev.ConsoleRenderer(
            colors=colors, exception_formatter=structlog.dev.plain_traceback
        )
    ]


def _json_line(event: Any, **options: Any) -> str:
    # orjson: a tenth of the standard library's time for a line's few fields.
    keys = orjson.OPT_NON_STR_KEYS  # as the standard library: a number as a key is a string
    return orjson.dumps(event, default=options.get("default"), option=keys).decode()


def configure_logging(
    level: str = "info", stream: TextIO = sys.stdout, fmt: LogFormat = "auto"
) -> None:
    """Log lines on `stream` in the form `fmt` resolves to, with the bound ids (request,
    integration, conversation, message). Services log to stdout; one-shot commands to
    stderr, keeping stdout for their output.

    Relay's own lines go straight from structlog to the stream, a level below the threshold
    costing one no-op call: through the standard `logging` module (a record, a handler's
    lock, a formatter) a line cost several times as much, and the services write a few per
    message. Libraries' lines still come through `logging`, rendered alike.
    """
    form = resolved_format(fmt, stream)
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=_SHARED,
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                *_renderer(form, stream),
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in _QUIET:
        logging.getLogger(name).setLevel(max(root.level, logging.INFO))
    structlog.configure(
        processors=[*_SHARED, *_renderer(form, stream)],
        wrapper_class=structlog.make_filtering_bound_logger(root.level),
        logger_factory=_NamedWriteLoggerFactory(stream),
        cache_logger_on_first_use=True,
    )


class _NamedWriteLogger(structlog.WriteLogger):
    """structlog's writer of rendered lines, with the name `add_logger_name` reads."""

    def __init__(self, stream: TextIO, name: str) -> None:
        super().__init__(stream)
        self.name = name


class _NamedWriteLoggerFactory:
    """Makes the logger of `structlog.get_logger(name)`: a writer to the stream, named."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def __call__(self, *args: object) -> _NamedWriteLogger:
        return _NamedWriteLogger(self._stream, str(args[0]) if args else "")
