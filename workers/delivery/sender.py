"""One signed POST of a response to the back end's endpoint, and what came of it.

Sent inside a traced delivery attempt (`relay.tracing`), the POST carries the attempt's
`traceparent`, and the attempt's span gets the endpoint's status."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import aiohttp

from relay.signing import signature_headers
from relay.ssrf import EndpointRefused, Network, check_url, guarded_session
from relay.tracing import inject_current, note_status
from relay.wire import utcnow

RESPONSE_BODY_LIMIT = 4096
USER_AGENT = "Relay-Webhooks/1"


@dataclass(frozen=True)
class Sent:
    """The result of one attempt: a status, or an error (timeout, refused, connection)."""

    status: int | None
    latency_ms: float
    error: str | None = None
    retry_after: str | None = None
    body: str | None = None
    timed_out: bool = False
    refused: bool = False  # by the SSRF guard: no use trying again

    @property
    def ok(self) -> bool:
        """Any 2xx."""
        return self.status is not None and 200 <= self.status < 300


class Sender:
    """POSTs over one pooled, SSRF-guarded client session, opened at start, closed at stop."""

    def __init__(
        self, networks: Sequence[Network], https_only: bool, connect: float, total: float
    ) -> None:
        self._networks = list(networks)
        self._https_only = https_only
        self._http = guarded_session(
            self._networks,
            aiohttp.ClientTimeout(total=total, sock_connect=connect),
            headers={"User-Agent": USER_AGENT, "Content-Type": "application/json"},
        )

    async def send(self, url: str, body: bytes, webhook_id: str, secrets: list[str]) -> Sent:
        """POST `body` signed with `secrets`; redirects are not followed (a 3xx fails)."""
        started = time.perf_counter()
        try:
            check_url(url, self._networks, self._https_only)
            headers = signature_headers(secrets, webhook_id, body, utcnow())
            inject_current(headers)
            async with self._http.post(
                url, data=body, headers=headers, allow_redirects=False
            ) as response:
                note_status(response.status)
                text = await response.content.read(RESPONSE_BODY_LIMIT)
                return Sent(
                    response.status,
                    _ms(started),
                    retry_after=response.headers.get("Retry-After"),
                    # PostgreSQL text cannot hold NUL; the log is for reading.
                    body=text.decode(errors="replace").replace("\x00", "\ufffd"),
                )
        except EndpointRefused as error:
            return Sent(None, _ms(started), error=str(error), refused=True)
        except TimeoutError:
            return Sent(None, _ms(started), error="timed out", timed_out=True)
        except aiohttp.ClientConnectorError as error:
            if isinstance(error.os_error, EndpointRefused):
                return Sent(None, _ms(started), error=str(error.os_error), refused=True)
            return Sent(None, _ms(started), error=f"connection failed: {error.os_error}")
        except aiohttp.InvalidURL as error:
            # e.g. a numeric host aiohttp will not parse: it will not parse tomorrow either.
            return Sent(None, _ms(started), error=f"invalid endpoint URL: {error}", refused=True)
        except (aiohttp.ClientError, OSError) as error:
            return Sent(None, _ms(started), error=f"{type(error).__name__}: {error}")

    async def close(self) -> None:
        """Close the pool."""
        await self._http.close()


def _ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 2)
