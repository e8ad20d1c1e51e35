"""`POST /webhooks/{integrationId}?wait=S`: the answer waits for the message's bot turn.

After the message is accepted, the request waits on its conversation's news
(`relay.ingress.watchers`) and reads the turn from the store once per notice, until the
turn settled or `S` seconds passed; one last read at the deadline catches a lost notice.
Webhooks are delivered as always: the answer holds the same bodies, with their
`webhook-id` as `id`, so a back end can skip the webhooks it already has.

Waits are fair shares (`relay.ingress.limits`): at most `wait_limit` per ingress and
`wait_limit_per_integration` per integration. A request past either is still accepted
(once: the cap is looked at after the message is stored and queued, and it changes
nothing of that) and answered at once with the responses so far, `complete: false`, and
`Relay-Wait-Limited` naming the limit. That is what a back end wants: the message is in
and its responses come by webhook as always, where a 503 would bounce a message that
could be taken, and a burst of retries would make the crowd of waits worse. It is the
answer of a wait that timed out, which every back end using `wait` handles already (and
may repeat with the same `messageId`).
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass

from relay.errors import InvalidQuery
from relay.ingress.limits import Claim, Slots, take_all
from relay.ingress.watchers import Watchers
from relay.metrics import Metrics
from relay.settings import Settings
from relay.store import History, TurnRecord
from relay.views import delivery_id, webhook_body
from relay.wire import MessageBundle, WaitedAnswer, WaitedResponse

MAX_WAIT = 30.0
# On an answer given without waiting: the limit (its setting's name) that was full.
WAIT_LIMITED_HEADER = "Relay-Wait-Limited"


def parse_wait(text: str | None) -> float | None:
    """`wait`: seconds, more than 0 and at most 30 (None if absent); else a 400."""
    if text is None:
        return None
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and 0 < seconds <= MAX_WAIT):
        raise InvalidQuery(
            f"wait must be a number of seconds, more than 0 and at most {MAX_WAIT:g}"
        )
    return seconds


@dataclass(frozen=True)
class Waited:
    """The answer of a `?wait` request, and the limit that kept it from waiting (if any)."""

    answer: WaitedAnswer
    limited_by: str | None = None


class ReplyWaiter:
    """Waits for the bot turns of accepted messages (one per ingress)."""

    def __init__(
        self, store: History, watchers: Watchers, metrics: Metrics, settings: Settings
    ) -> None:
        self._store = store
        self._watchers = watchers
        self._metrics = metrics
        self._ingress = Slots("wait_limit", settings.wait_limit)
        self._integration = Slots("wait_limit_per_integration", settings.wait_limit_per_integration)
        metrics.waits_open.set_function(self._ingress.total)

    async def wait(self, integration_id: str, bundle: MessageBundle, seconds: float) -> Waited:
        """The answer for `bundle` with the responses of its turn so far: after its turn
        settled or `seconds` passed, or at once when a wait limit is full."""
        claims = [Claim(self._integration, integration_id), Claim(self._ingress, "")]
        with take_all(claims) as full:
            if full is None:
                return Waited(_answer(bundle, await self._turn(bundle, seconds)))
        self._metrics.limit_refusals.labels(full.name).inc()
        return Waited(_answer(bundle, await self._store.turn(bundle.message.id)), full.name)

    async def _turn(self, bundle: MessageBundle, seconds: float) -> TurnRecord:
        """The turn once it settled, or as it is after `seconds`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        # Watching before the first read: news after it wakes this request.
        with self._watchers.conversation(bundle.conversation.id) as watch:
            while True:
                turn = await self._store.turn(bundle.message.id)
                left = deadline - loop.time()
                if turn.handled or turn.dead or watch.stopping or left <= 0:
                    break
                await watch.news(left)
        self._metrics.waits.labels(str(turn.handled).lower()).inc()
        return turn


def _answer(bundle: MessageBundle, turn: TurnRecord) -> WaitedAnswer:
    return WaitedAnswer(
        user=bundle.user,
        conversation=bundle.conversation,
        message=bundle.message,
        responses=[
            WaitedResponse(**webhook_body(record).model_dump(), id=delivery_id(record.id))
            for record in turn.responses
        ],
        complete=turn.handled,
    )
