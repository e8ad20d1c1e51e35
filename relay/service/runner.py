"""Run a service until SIGTERM or SIGINT, then stop it gracefully within a bound."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Iterator

import structlog
from aiohttp import web

from relay.service.listeners import listening

log = structlog.get_logger(__name__)


@contextlib.contextmanager
def stop_signals() -> Iterator[asyncio.Future[str]]:
    """A future that SIGTERM or SIGINT completes with the signal's name, while in scope.

    Installed before anything starts: a signal during a slow start-up must not kill the
    process outright (the default action) with messages in hand.
    """
    loop = asyncio.get_running_loop()
    stopped: asyncio.Future[str] = loop.create_future()

    def on_signal(sig: signal.Signals) -> None:
        if not stopped.done():
            stopped.set_result(sig.name)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        yield stopped
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


async def wait_for_stop() -> str:
    """Block until SIGTERM or SIGINT; the signal's name."""
    with stop_signals() as stopped:
        return await stopped


async def serve(app: web.Application, host: str, port: int, shutdown_timeout: float) -> None:
    """Serve `app` until a stop signal; in-flight requests get `shutdown_timeout` to finish."""
    with stop_signals() as stopped:
        # ServiceRunner: what aiohttp answers by itself (unparsable requests) is JSON too,
        # and a client has the read timeouts of the settings to send its request.
        async with listening(app, host, port, shutdown_timeout) as bound:
            log.info("listening", url=f"http://{host}:{bound}")
            name = await stopped
            log.info("stopping", signal=name)
            # Leaving stops accepting, waits for in-flight handlers, then closes store and
            # broker (and the listeners the roles opened).
    log.info("stopped")
