"""A service's listeners: its own port, and those the settings give some routes of their own.

`RELAY_METRICS_PORT` serves `/metrics` on a port of its own (bound on `RELAY_HTTP_HOST`),
for every service; the ingress serves its admin API there too when `RELAY_ADMIN_PORT` is
set (`relay.ingress.app`). Each is an application of its own on a `ServiceRunner`: the
same JSON errors and read timeouts as the service's own port.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable

from aiohttp import web

from relay.service.app import METRICS_KEY, metrics_app
from relay.service.server import SERVICE_SETTINGS_KEY, ServiceRunner
from relay.settings import Settings

Context = Callable[[web.Application], contextlib.AbstractAsyncContextManager[None]]


@contextlib.asynccontextmanager
async def listening(
    app: web.Application, host: str, port: int, shutdown_timeout: float
) -> AsyncIterator[int]:
    """Serve `app` on `host:port` while in scope; yields the port bound (port 0: a free
    one). At the end it stops accepting, lets what is in flight finish within
    `shutdown_timeout`, then runs the application's cleanup."""
    runner = ServiceRunner(
        app,
        metrics=app.get(METRICS_KEY),
        handle_signals=False,
        shutdown_timeout=shutdown_timeout,
        access_log=None,
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        yield _bound_port(site, port)
    finally:
        await runner.cleanup()


def _bound_port(site: web.TCPSite, asked: int) -> int:
    server = site._server  # aiohttp keeps the asyncio server private
    sockets = getattr(server, "sockets", None)
    return int(sockets[0].getsockname()[1]) if sockets else asked


@contextlib.asynccontextmanager
async def service_settings(app: web.Application, settings: Settings) -> AsyncIterator[None]:
    """Give the application its settings, and serve its `/metrics` on a port of its own
    while in scope if they say so; nothing if a role of the application did first."""
    if not app[SERVICE_SETTINGS_KEY].adopt(settings) or settings.metrics_port is None:
        yield
        return
    own = metrics_app(app[METRICS_KEY], app[SERVICE_SETTINGS_KEY])
    async with listening(own, settings.http_host, settings.metrics_port, settings.shutdown_timeout):
        yield


def settings_context(settings: Settings) -> Context:
    """`service_settings` as a cleanup context."""
    return lambda app: service_settings(app, settings)
