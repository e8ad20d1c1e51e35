"""Paced conversations sent the way a back end sends them, and the checks on what came back.

Each conversation is one sender posting its messages one after another at a steady pace.
A message is sent again (same messageId, same body) after a 503, any other 5xx, a
connection error or a timeout, to whichever ingress is up, until it is answered 200: so
every message of the stream is accepted, in order, and the echo bot owes two responses
for each (`typing`, then `echo: <text>`).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp

from tests.helpers import message
from tests.receivers import Hit

CONVERSATIONS = 30
MINIMUM = 50  # messages per conversation at least: 1,500 over 30 conversations
AFTER = 3  # messages each conversation still sends once the faults are over
RETRY_PAUSE = 0.5  # between two tries of one message
REQUEST_TIMEOUT = 20.0  # one POST (a publish is bounded by RELAY_PUBLISH_TIMEOUT)
MESSAGE_DEADLINE = 180.0  # all the tries of one message


@dataclass
class Stream:
    http: aiohttp.ClientSession
    integration_id: str
    token: str
    ingresses: Callable[[], list[str]]  # base URLs of the ingresses up now
    pace: float  # seconds between two messages of a conversation
    prefix: str = "fault"
    conversations: int = CONVERSATIONS
    minimum: int = MINIMUM
    after: int = AFTER
    accepted: list[int] = field(default_factory=list)  # messages accepted, per conversation
    answers: Counter[str] = field(default_factory=Counter)  # every answer and error, counted
    errors: list[str] = field(default_factory=list)  # the first 5xx other than 503
    faults_over: asyncio.Event = field(default_factory=asyncio.Event)
    last_accepted_at: float = 0.0  # time.monotonic() of the stream's last 200
    # Each kind of answer other than 200: (first, last) time.monotonic() it was seen.
    seen: dict[str, tuple[float, float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.accepted = [0] * self.conversations

    @property
    def total(self) -> int:
        return sum(self.accepted)

    def conversation_id(self, c: int) -> str:
        return f"{self.prefix}-{c}"

    @staticmethod
    def text(c: int, n: int) -> str:
        return f"{c}:{n}"

    async def run(self) -> None:
        async with asyncio.TaskGroup() as group:
            for c in range(self.conversations):
                group.create_task(self.conversation(c))

    async def conversation(self, c: int) -> None:
        """At least `minimum` messages, and go on until `after` more were accepted once the
        faults are over: every fault falls mid-stream, however long it takes."""
        n = after = 0
        while n < self.minimum or after < self.after:
            await self.post_until_accepted(c, n)
            n += 1
            self.accepted[c] = n
            self.last_accepted_at = time.monotonic()
            after += self.faults_over.is_set()
            await asyncio.sleep(self.pace)  # a stream, not a burst

    async def post_until_accepted(self, c: int, n: int) -> None:
        body = message(
            f"{c}-{n}",
            conversationId=self.conversation_id(c),
            userId=f"user-{c}",
            text=self.text(c, n),
        )
        deadline = time.monotonic() + MESSAGE_DEADLINE
        for attempt in range(100_000):
            urls = self.ingresses()
            answer = await self._post(urls[(c + n + attempt) % len(urls)], body) if urls else ""
            self.note(answer or "no ingress up")
            if answer == "200":
                return
            if answer.startswith("4"):
                raise AssertionError(f"message {body['messageId']} refused: {answer}")
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(RETRY_PAUSE)
        raise AssertionError(
            f"message {body['messageId']} not accepted within {MESSAGE_DEADLINE:.0f} s: "
            f"{self.answers}"
        )

    def note(self, answer: str) -> None:
        self.answers[answer] += 1
        if answer != "200":
            now = time.monotonic()
            self.seen[answer] = (self.seen.get(answer, (now, now))[0], now)

    async def _post(self, url: str, body: dict[str, object]) -> str:
        """'200', another status (with the body for a 4xx), or the client error's name."""
        try:
            async with self.http.post(
                f"{url}/webhooks/{self.integration_id}",
                json=body,
                headers={"Authorization": f"Bearer {self.token}"},
                timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT),
            ) as answer:
                if answer.status == 503 or answer.status < 400:
                    return str(answer.status)
                text = (await answer.text())[:300]
                if answer.status >= 500 and len(self.errors) < 20:
                    self.errors.append(f"{body['messageId']} -> {answer.status} {text}")
                return f"{answer.status} {text}" if answer.status < 500 else str(answer.status)
        except (aiohttp.ClientError, TimeoutError) as error:
            return type(error).__name__


def first_deliveries(hits: list[Hit]) -> dict[str, list[Hit]]:
    """Per conversation, the first delivered (200) request of each response, in order of
    arrival."""
    seen: set[str] = set()
    found: dict[str, list[Hit]] = {}
    for hit in hits:
        key = hit.body.get("botpressMessageId", "")
        if hit.status == 200 and key not in seen:
            seen.add(key)
            found.setdefault(hit.body["conversationId"], []).append(hit)
    return found


def missing_counts(stream: Stream, hits: list[Hit]) -> dict[str, int]:
    """Responses owed but not delivered yet, per conversation (only those lacking some)."""
    firsts = first_deliveries(hits)
    owed = {
        stream.conversation_id(c): 2 * count - len(firsts.get(stream.conversation_id(c), []))
        for c, count in enumerate(stream.accepted)
    }
    return {conversation: n for conversation, n in owed.items() if n > 0}


def spans(numbers: list[int], limit: int = 12) -> str:
    """1,2,3,7,9,10 -> '1-3, 7, 9-10' (the first `limit` runs)."""
    runs: list[list[int]] = []
    for number in sorted(numbers):
        if runs and number == runs[-1][1] + 1:
            runs[-1][1] = number
        else:
            runs.append([number, number])
    shown = [f"{a}-{b}" if a != b else str(a) for a, b in runs[:limit]]
    return ", ".join(shown) + (f", … ({len(runs) - limit} more runs)" if len(runs) > limit else "")


def webhook_id_problems(hits: list[Hit]) -> list[str]:
    """Duplicates are allowed, but only under the response's one webhook-id."""
    ids: dict[str, set[str]] = {}
    for hit in hits:
        ids.setdefault(hit.body.get("botpressMessageId", ""), set()).add(
            hit.headers.get("webhook-id", "")
        )
    several = {key: sorted(values) for key, values in ids.items() if len(values) > 1}
    if not several:
        return []
    example = next(iter(several.items()))
    return [f"{len(several)} responses came under several webhook-ids, e.g. {example}"]


def conversation_problems(c: int, count: int, conversation: str, firsts: list[Hit]) -> list[str]:
    """Every sequence 1..2N once by first arrival, in order, and the texts in order."""
    bodies = [hit.body for hit in firsts]
    sequences = [body["sequence"] for body in bodies]
    expected = list(range(1, 2 * count + 1))
    if sequences == expected:
        texts = [body["payload"].get("text") for body in bodies if body["type"] == "text"]
        wanted = [f"echo: {Stream.text(c, n)}" for n in range(count)]
        return [] if texts == wanted else [f"{conversation}: texts out of order: {texts}"]
    problems = []
    missing = sorted(set(expected) - set(sequences))
    if missing:
        problems.append(
            f"{conversation}: {count} accepted, {len(missing)} of {2 * count} responses "
            f"missing: sequences {spans(missing)}"
        )
    unexpected = sorted(set(sequences) - set(expected))
    if unexpected:
        problems.append(f"{conversation}: unexpected sequences {spans(unexpected)}")
    arrived = [s for s in sequences if s in expected]
    if arrived != sorted(arrived):
        at = next(i for i in range(1, len(arrived)) if arrived[i] < arrived[i - 1])
        problems.append(
            f"{conversation}: out of order by first arrival: … {arrived[max(0, at - 3) : at + 3]}"
        )
    return problems


def lateness(stream: Stream, hits: list[Hit], since: float) -> dict[str, float]:
    """Per conversation: seconds from `since` (the end of the last fault) to its last
    first delivery."""
    firsts = first_deliveries(hits)
    return {
        conversation: max(hit.at for hit in arrived) - since
        for conversation, arrived in firsts.items()
    }


def problems(stream: Stream, hits: list[Hit], last_fault_end: float, limit: float) -> list[str]:
    """Everything wrong with what arrived; empty when all is well."""
    found = webhook_id_problems(hits)
    firsts = first_deliveries(hits)
    for c, count in enumerate(stream.accepted):
        conversation = stream.conversation_id(c)
        found += conversation_problems(c, count, conversation, firsts.get(conversation, []))
    late = {
        conversation: seconds
        for conversation, seconds in lateness(stream, hits, last_fault_end).items()
        if seconds > limit
    }
    if late:
        found.append(
            f"{len(late)} conversations completed more than {limit:.0f} s after the last "
            f"fault: {dict(sorted(late.items(), key=lambda kv: -kv[1])[:5])}"
        )
    return found
