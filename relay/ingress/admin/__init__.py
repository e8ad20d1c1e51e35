"""The admin API under `/admin/v1` (a sub-application of the ingress), authorized by admin
tokens (`relay tokens create --kind admin`); integration and bot tokens get 401 there. The
presented token's hash is looked up at each request (one indexed row, no cache): a revoked
token is refused from the next request on, by every ingress.

The HTTP surface of administration, and only that: each route parses its request (into a
model of `relay.wire.admin`), calls the operation (`relay.admin`, the store, or
`relay.pipeline.dlq`) and answers through `relay.views`. The CLI (`relay.commands`) calls
the same operations: an integration is created and its response URL changed with the
endpoint check, tokens are made and hashed the same way.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web

from relay.auth import hash_token
from relay.errors import Unauthorized
from relay.ingress.admin import attempts, dead_letters, integrations, queues
from relay.ingress.admin.common import SETTINGS_KEY, AdminKeys
from relay.ingress.admin.recovery import RecoveryRoutes
from relay.ingress.handlers import request_token
from relay.settings import Settings

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def admin_app(settings: Settings, keys: AdminKeys) -> web.Application:
    """The admin API; the ingress mounts it at /admin/v1."""

    @web.middleware
    async def admin_only(request: web.Request, handler: Handler) -> web.StreamResponse:
        token = request_token(request)
        store = request.config_dict[keys.store]
        if not (token and await store.admin_token_active(hash_token(token))):
            raise Unauthorized("missing or invalid admin token")
        return await handler(request)

    app = web.Application(middlewares=[admin_only])
    app[SETTINGS_KEY] = settings
    integrations.IntegrationRoutes(keys.store, keys.broker).add_to(app)
    queues.add_routes(app, keys)
    attempts.add_routes(app, keys.store)
    dead_letters.add_routes(app, keys)
    RecoveryRoutes(keys).add_to(app)
    return app
