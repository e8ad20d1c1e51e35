"""`relay sink`: a local response endpoint that verifies and prints what it receives (the
back end `make run` and the delivery tests point deliveries at).

It checks each delivery's Standard Webhooks signature against the secrets of every
integration in the store (reloaded when one does not verify, so new integrations and
rotations are picked up), prints one readable line per response, and can be told to fail:
`--fail N` answers 500 to the first N deliveries, `--status CODE` answers CODE to all
(with `--retry-after S` on failures), for demos and tests.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from typing import Any, TextIO

from aiohttp import web
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from relay.commands.common import Commands, on_store
from relay.service.runner import serve
from relay.settings import Settings
from relay.store import Integrations, SqlStore
from relay.wire import utcnow


@dataclass
class SinkOptions:
    """How the sink answers."""

    fail: int = 0
    status: int = 200
    retry_after: str | None = None


class Sink:
    """Verifies, prints and answers deliveries."""

    def __init__(self, store: Integrations, options: SinkOptions, out: TextIO = sys.stdout) -> None:
        self._store = store
        self._options = options
        self._out = out
        self._secrets: list[str] = []
        self.received = 0

    async def handle(self, request: web.Request) -> web.Response:
        """Print one delivery and answer as told."""
        body = await request.read()
        headers = {k.lower(): v for k, v in request.headers.items()}
        verified = await self._verify(body, headers)
        self.received += 1
        self._print(body, headers, verified)
        status = self._status()
        extra = (
            {"Retry-After": self._options.retry_after}
            if (status >= 400 and self._options.retry_after)
            else None
        )
        return web.json_response(
            {"received": True, "verified": verified}, status=status, headers=extra
        )

    def _status(self) -> int:
        if self.received <= self._options.fail:
            return 500
        return self._options.status

    async def _verify(self, body: bytes, headers: dict[str, str]) -> bool:
        if self._matches(body, headers):
            return True
        # An integration whose secret no key opens is one the sink cannot check.
        integrations = [i for i in await self._store.list_integrations() if not i.secret_unreadable]
        self._secrets = sorted({s for i in integrations for s in i.signing_secrets(utcnow())})
        return self._matches(body, headers)

    def _matches(self, body: bytes, headers: dict[str, str]) -> bool:
        for secret in self._secrets:
            try:
                Webhook(secret).verify(body, headers)
                return True
            except WebhookVerificationError:
                continue
        return False

    def _print(self, body: bytes, headers: dict[str, str], verified: bool) -> None:
        try:
            data: dict[str, Any] = json.loads(body)
        except ValueError:
            data = {}
        mark = "verified" if verified else "NOT VERIFIED"
        if not verified and data.get("type") == "test":
            # `relay integrations create` checks the endpoint before it saves the secret.
            mark = "test event of a new integration"
        line = (
            f"[{data.get('conversationId', '?')} #{data.get('sequence', '?')}] "
            f"{data.get('type', '?')}: {json.dumps(data.get('payload'))}  "
            f"({headers.get('webhook-id', '-')}, {mark})"
        )
        print(line, file=self._out, flush=True)


def create_sink_app(store: Integrations, options: SinkOptions) -> web.Application:
    """The sink: POST to any path."""
    sink = Sink(store, options)
    app = web.Application()
    app.router.add_post("/{tail:.*}", sink.handle)
    return app


@on_store
async def run(store: SqlStore, settings: Settings, args: argparse.Namespace) -> int:
    options = SinkOptions(fail=args.fail, status=args.status, retry_after=args.retry_after)
    await serve(create_sink_app(store, options), args.host, args.port, settings.shutdown_timeout)
    return 0


def add_to(commands: Commands[argparse.ArgumentParser]) -> None:
    """`relay sink`."""
    sink = commands.add_parser("sink", help="a local response endpoint that prints what it gets")
    sink.add_argument("--host", default="127.0.0.1", help="address to listen on")
    sink.add_argument("--port", type=int, default=8090, help="port to listen on")
    sink.add_argument("--fail", type=int, default=0, help="answer 500 to the first N")
    sink.add_argument("--status", type=int, default=200, help="the status to answer")
    sink.add_argument("--retry-after", help="Retry-After to send with failures")
    sink.set_defaults(run=run)
