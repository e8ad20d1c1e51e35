"""Integrations and their tokens: `/integrations`, `/integrations/{id}`,
`/integrations/{id}/rotate-secret`, `/integrations/{id}/tokens`, `/tokens/{tokenId}`.

A signing secret is answered where it is made (creation, rotation), never in a list or a
read."""

from __future__ import annotations

from aiohttp import web

from relay import admin
from relay.broker import Broker
from relay.broker.operations import OperationsEvents
from relay.errors import Conflict, NotFound, Unprocessable
from relay.ingress.admin.common import (
    SETTINGS_KEY,
    body_of,
    cursor_of,
    find_integration,
    json_answer,
    page_size,
)
from relay.ingress.handlers import plausible_id
from relay.store import (
    IntegrationRecord,
    SecretUnreadable,
    Store,
)
from relay.views import integration_view, rotation_view, token_view
from relay.wire import utcnow
from relay.wire.admin import (
    IntegrationCreate,
    IntegrationCreated,
    IntegrationPatch,
    IntegrationView,
    Page,
    SecretRotation,
    TokenCreate,
    TokenCreated,
    TokenView,
)


class IntegrationRoutes:
    """The handlers, each reaching the store through the parent application's key."""

    def __init__(self, store_key: web.AppKey[Store], broker_key: web.AppKey[Broker]) -> None:
        self._store_key = store_key
        self._broker_key = broker_key

    def add_to(self, app: web.Application) -> None:
        app.router.add_get("/integrations", self.listing)
        app.router.add_post("/integrations", self.create)
        app.router.add_get("/integrations/{id}", self.show)
        app.router.add_patch("/integrations/{id}", self.change)
        app.router.add_delete("/integrations/{id}", self.delete)
        app.router.add_post("/integrations/{id}/rotate-secret", self.rotate)
        app.router.add_get("/integrations/{id}/tokens", self.tokens)
        app.router.add_post("/integrations/{id}/tokens", self.new_token)
        app.router.add_delete("/tokens/{tokenId}", self.revoke)

    def _store(self, request: web.Request) -> Store:
        return request.config_dict[self._store_key]

    async def _integration(self, request: web.Request) -> IntegrationRecord:
        return await find_integration(self._store(request), request.match_info["id"])

    async def listing(self, request: web.Request) -> web.Response:
        """`GET /integrations?cursor=&limit=`: oldest first."""
        limit = page_size(request)
        cursor = cursor_of(request)
        records = await self._store(request).list_integrations(cursor, limit + 1)
        page = Page[IntegrationView](
            items=[_view(request, r) for r in records[:limit]],
            nextCursor=records[limit - 1].id if len(records) > limit else None,
        )
        return json_answer(page)

    async def create(self, request: web.Request) -> web.Response:
        """`POST /integrations`: after the endpoint check (422 if it fails)."""
        body = await body_of(request, IntegrationCreate)
        settings = request.app[SETTINGS_KEY]
        try:
            record = await admin.create_integration(
                self._store(request),
                settings,
                body.name,
                body.responseUrl,
                verify=body.verify,
                bot=None if body.bot is None else admin.bot_choice(body.bot),
                delivery=admin.delivery_options(admin.delivery_given(body)),
            )
        except admin.AdminError as error:
            raise Unprocessable(str(error)) from error
        created = IntegrationCreated(
            **_view(request, record).model_dump(), signingSecret=record.signing_secret
        )
        return json_answer(created, status=201)

    async def show(self, request: web.Request) -> web.Response:
        """`GET /integrations/{id}`."""
        return json_answer(_view(request, await self._integration(request)))

    async def change(self, request: web.Request) -> web.Response:
        """`PATCH /integrations/{id}`: a new response URL (checked again), enabled or not, its
        bot, its delivery options. Everything is checked before anything is written."""
        record = await self._integration(request)
        body = await body_of(request, IntegrationPatch)
        settings = request.app[SETTINGS_KEY]
        store = self._store(request)
        try:
            settled = admin.settle_change(
                settings, record, admin.delivery_given(body), admin.bot_given(body)
            )
            if body.responseUrl is not None:
                secret = _current_secret(record) if body.verify else ""
                await admin.check_endpoint(settings, body.responseUrl, secret, body.verify)
        except admin.AdminError as error:
            raise Unprocessable(str(error)) from error
        if body.responseUrl is not None:
            await store.set_response_url(record.id, body.responseUrl)
        await admin.apply_change(store, record, settled)
        if body.enabled:
            await store.set_disabled(record.id, None)
        elif body.enabled is False:
            events = OperationsEvents(request.config_dict[self._broker_key])
            await admin.disable_integration(store, events, record.id)
        return json_answer(_view(request, await self._integration(request)))

    async def rotate(self, request: web.Request) -> web.Response:
        """`POST /integrations/{id}/rotate-secret {"grace"?}`: a new signing secret, in this
        answer only; the old one signs too until the grace period is over."""
        record = await self._integration(request)
        body = await body_of(request, SecretRotation, optional=True)
        try:
            rotated = await admin.rotate_secret(self._store(request), record.id, body.grace)
        except admin.AdminError as error:  # deleted meanwhile
            raise NotFound("unknown integration") from error
        return json_answer(rotation_view(rotated))

    async def delete(self, request: web.Request) -> web.Response:
        """`DELETE /integrations/{id}`: with everything it holds."""
        record = await self._integration(request)
        await self._store(request).delete_integration(record.id)
        return web.Response(status=204)

    async def tokens(self, request: web.Request) -> web.Response:
        """`GET /integrations/{id}/tokens`: revoked ones too."""
        record = await self._integration(request)
        listed = [token_view(t) for t in await self._store(request).list_tokens(record.id)]
        return json_answer(Page[TokenView](items=listed, nextCursor=None))

    async def new_token(self, request: web.Request) -> web.Response:
        """`POST /integrations/{id}/tokens`: the token is in this answer only."""
        record = await self._integration(request)
        body = await body_of(request, TokenCreate, optional=True)
        token, made = await admin.create_token(self._store(request), record.id, body.kind)
        created = TokenCreated(**token_view(made).model_dump(), token=token)
        return json_answer(created, status=201)

    async def revoke(self, request: web.Request) -> web.Response:
        """`DELETE /tokens/{tokenId}`."""
        token_id = request.match_info["tokenId"]
        if not (plausible_id(token_id) and await self._store(request).revoke_token(token_id)):
            raise NotFound("unknown or revoked token")
        return web.Response(status=204)


def _view(request: web.Request, record: IntegrationRecord) -> IntegrationView:
    """The integration as answered, its webhook URL under this ingress's RELAY_PUBLIC_URL."""
    return integration_view(record, request.app[SETTINGS_KEY].public_base_url)


def _current_secret(record: IntegrationRecord) -> str:
    """The secret the endpoint check signs with; a 409 naming the integration if it cannot
    be decrypted (RELAY_SECRET_KEYS lacks its key: put it back, or rotate the secret)."""
    try:
        return record.signing_secrets(utcnow())[0]
    except SecretUnreadable as error:
        raise Conflict(f"{error}; put the key back, or rotate the secret") from error
