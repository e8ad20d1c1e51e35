"""The ingress's two static pages, each one HTML file with its script and style inline (no
build step, nothing from elsewhere; neither holds a secret):

- `GET /chat`: a local page to talk to the bot through the conversation API (served when
  `RELAY_CHAT_PAGE=true`, which `make run` sets), with a conversation token
  (`relay.ingress.conversation_tokens`), never an integration token. It is opened at
  `/chat#integration=ID&conversation=C&user=U&token=T` (`make run` mints the token and
  prints that address); the fragment is sent to no server, and the page moves the token into
  the tab's session storage and drops it from the address and its history at once.
- `GET /console`: the operator page over the admin API, always served. The operator types
  an admin token, which the page keeps in the tab's session storage and sends as a bearer
  token to `/admin/v1` only.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from importlib import resources

from aiohttp import web

_HEADERS = {
    "Cache-Control": "no-store",
    # Their own script and style only; they talk to this relay alone, and no other page may
    # frame them (the console's buttons replay and purge).
    "Content-Security-Policy": "default-src 'self'; script-src 'unsafe-inline';"
    " style-src 'unsafe-inline'; connect-src 'self'; frame-ancestors 'none'",
    "Referrer-Policy": "no-referrer",
}


def static_page(name: str) -> Callable[[web.Request], Awaitable[web.Response]]:
    """The handler of `static/{name}` (read at each request: it is small, and edits show
    without a restart)."""
    page = resources.files("relay.ingress").joinpath(f"static/{name}")

    async def serve(_: web.Request) -> web.Response:
        return web.Response(
            text=page.read_text(encoding="utf-8"), content_type="text/html", headers=_HEADERS
        )

    return serve
