"""`POST /webhooks/{integrationId}?wait=S`: the answer waits for the message's bot turn.

After the message is accepted, the request waits on its conversation's news
(`relay.ingress.watchers`) and reads the turn from the store once per notice, until the
turn settled or `S` seconds passed; one last read at the deadline catches a lost notice.
Webhooks are delivered as always: the answer holds the same bodies, with their
`webhook-id` as `id`, so a back end can skip the webhooks it already has.
"""

from __future__ import annotations

import asyncio
import math

from relay.errors import InvalidQuery
from relay.ingress.watchers import Watchers
from relay.metrics import Metrics
from relay.pipeline.replies import delivery_id, webhook_body
from relay.store import History, TurnRecord
from relay.wire import MessageBundle, WaitedAnswer, WaitedResponse

MAX_WAIT = 30.0


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


class ReplyWaiter:
    """Waits for the bot turns of accepted messages (one per ingress)."""

    def __init__(self, store: History, watchers: Watchers, metrics: Metrics) -> None:
        self._store = store
        self._watchers = watchers
        self._metrics = metrics

    async def wait(self, bundle: MessageBundle, seconds: float) -> WaitedAnswer:
        """The answer for `bundle` with the responses of its turn so far."""
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
        return _answer(bundle, turn)


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
