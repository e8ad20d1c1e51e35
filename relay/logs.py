"""structlog set up for JSON lines; ids are bound as context variables and follow the message.

Libraries that log through the standard `logging` module (aio-pika, aiohttp, asyncio) are
rendered by the same processors, so every line on stdout is one JSON object.
"""

from __future__ import annotations

import logging
import sys
from typing import TextIO

import structlog
from structlog.typing import Processor

# Libraries whose debug lines carry data, not events: aiosqlite logs every statement with its
# parameters (token hashes, bot secrets, user text). Kept at info even when Relay is at debug.
_QUIET = ("aiosqlite",)

_SHARED: list[Processor] = [
    structlog.contextvars.merge_contextvars,
    structlog.stdlib.add_log_level,
    structlog.stdlib.add_logger_name,
    structlog.processors.TimeStamper(fmt="iso", utc=True),
]


def configure_logging(level: str = "info", stream: TextIO = sys.stdout) -> None:
    """JSON lines on `stream`, with the bound ids (request, integration, conversation,
    message). Services log to stdout; one-shot commands to stderr, keeping stdout for
    their output."""
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=_SHARED,
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                structlog.processors.JSONRenderer(),
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in _QUIET:
        logging.getLogger(name).setLevel(max(root.level, logging.INFO))
    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *_SHARED,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        wrapper_class=structlog.stdlib.BoundLogger,
        logger_factory=structlog.stdlib.LoggerFactory(),
        cache_logger_on_first_use=True,
    )
