"""The one input contract: what Relay accepts as JSON, anywhere, and so can always carry.

Every route that takes JSON (the webhooks, the bot push API, the Bot Framework connector,
the admin API) parses its body with these rules, and every bot reply is checked with them
too, so that whatever was answered 2xx can be serialized, published, parsed by the workers
and stored: each later stage accepts more than this (pydantic's JSON parser refuses more
than 200 levels, its serializer about 255; an envelope adds 3 levels around a payload).

- nesting: at most `MAX_DEPTH` levels, the body's own object being the first;
- strings and keys: no NUL character, no unpaired surrogate (no store keeps them faithfully);
- numbers: finite; integers between -2**63 and 2**64 - 1 (64-bit, signed or not: what a
  receiver in any language can read back exactly as an integer);
- values: objects with string keys, arrays, strings, numbers, true, false, null;
- size: a request body at most RELAY_MAX_BODY_BYTES; a bot's reply's payload at most
  `MAX_PAYLOAD_BYTES` of JSON.
"""

from __future__ import annotations

import math
from typing import Any

MAX_DEPTH = 64
# The most a payload that does not come in a request body (a bot's reply) may weigh as JSON:
# the largest body an ingress may take (RELAY_MAX_BODY_BYTES is at most this), well under
# what RabbitMQ 4 takes in one message (16 MiB).
MAX_PAYLOAD_BYTES = 4 * 1024 * 1024
MIN_INTEGER = -(2**63)
MAX_INTEGER = 2**64 - 1

Problem = dict[str, str]


def storable_text(value: str) -> str:
    """Refuse what a store cannot keep faithfully: NUL characters and unpaired surrogates."""
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValueError("must not contain unpaired surrogates (invalid UTF-16)") from error
    return value


def whole(value: Any) -> Any:
    """A float that is a whole number as the int it is (for a strict int field's
    `BeforeValidator`): JSON Schema calls 600.0 an integer, so a client following
    /openapi.json may send one; any other float (600.5) or type stays for the strict check
    to refuse."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def problem(field: str, message: str) -> Problem:
    """One entry of an error's `details`."""
    return {"field": field, "message": message}


def json_problems(value: Any, path: str = "", depth: int = MAX_DEPTH) -> list[Problem]:
    """Every place under `value` that breaks the contract, by dotted path (`a.b.2`).

    `depth` is how many levels `value` may span (itself included); a payload inside a body
    has one level fewer than the body.
    """
    problems: list[Problem] = []
    # An explicit stack: nesting must never reach the interpreter's recursion limit.
    stack: list[tuple[Any, str, int]] = [(value, path, 1)]
    while stack:
        item, where, level = stack.pop()
        if isinstance(item, dict | list) and level > depth:
            problems.append(problem(where, f"nested deeper than {depth} levels"))
        elif isinstance(item, dict):
            for key in item:
                problems.extend(_key_problems(key, where))
            # Children pushed last first, so that they come off in document order.
            children = [(child, _join(where, key), level + 1) for key, child in item.items()]
            stack.extend(reversed(children))
        elif isinstance(item, list):
            children = [(child, _join(where, i), level + 1) for i, child in enumerate(item)]
            stack.extend(reversed(children))
        else:
            problems.extend(_scalar_problems(item, where))
    return problems


def check_json(value: Any, depth: int = MAX_DEPTH) -> Any:
    """`value` if it keeps the contract, else ValueError naming the first place that does not
    (for pydantic validators)."""
    problems = json_problems(value, depth=depth)
    if problems:
        first = problems[0]
        where = f" at {first['field']}" if first["field"] else ""
        raise ValueError(f"{first['message']}{where}")
    return value


def _join(path: str, part: object) -> str:
    # A key with a lone surrogate is shown escaped: the error answer that names the place
    # must itself be JSON a client can read.
    shown = str(part).encode("utf-8", "backslashreplace").decode("utf-8")
    return f"{path}.{shown}" if path else shown


def _key_problems(key: object, path: str) -> list[Problem]:
    if not isinstance(key, str):
        return [problem(path, "keys must be strings")]
    return _text_problems(key, path, "key ")


def _scalar_problems(value: object, path: str) -> list[Problem]:
    if isinstance(value, str):
        return _text_problems(value, path)
    if isinstance(value, bool) or value is None:
        return []
    if isinstance(value, int):
        if MIN_INTEGER <= value <= MAX_INTEGER:
            return []
        return [problem(path, "integers must be between -2**63 and 2**64-1")]
    if isinstance(value, float):
        return [] if math.isfinite(value) else [problem(path, "must be a finite number")]
    return [problem(path, "must be a JSON value")]


def _text_problems(text: str, path: str, prefix: str = "") -> list[Problem]:
    try:
        storable_text(text)
    except ValueError as error:
        return [problem(path, f"{prefix}{error}")]
    return []
