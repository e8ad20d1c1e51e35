"""Request bodies: JSON objects that keep the input contract (`relay.wire.contract`), or a 400
naming each place that does not. Every route that takes JSON reads its body here."""

from __future__ import annotations

import json
import math
from typing import Any

from relay.errors import InvalidBody
from relay.wire.contract import MAX_DEPTH, json_problems, problem

MAX_DETAILS = 20  # places named in one answer: a body with a thousand bad ones needs no list
_CANNOT_CARRY = "the body is not JSON that Relay can carry"
_TOO_DEEP = f"nested deeper than {MAX_DEPTH} levels"


class _NotFinite:
    """Stands in, while parsing, for a number no float can hold: `1e400`, `NaN`, `Infinity`.

    Python's json reads `1e400` as infinity (and, as an extension, the three constants);
    stored, it would be answered as `null` and kept as `Infinity`. A marker lets the error
    name the field that holds it (the contract's walk refuses it as not a JSON value).
    """

    __slots__ = ()


def _number(text: str) -> float | _NotFinite:
    value = float(text)
    return value if math.isfinite(value) else _NotFinite()


def parse_json_object(raw: bytes) -> dict[str, Any]:
    """The body as a JSON object within the input contract, or InvalidBody saying why not."""
    try:
        value = json.loads(
            raw.decode("utf-8"), parse_float=_number, parse_constant=lambda _: _NotFinite()
        )
    except RecursionError as error:
        # Nested past the interpreter's limit, far beyond the contract's.
        raise InvalidBody(_CANNOT_CARRY, details=[problem("", _TOO_DEEP)]) from error
    except (UnicodeDecodeError, ValueError) as error:
        raise InvalidBody("the body is not valid JSON", details=str(error)[:200]) from error
    if not isinstance(value, dict):
        kind = "float" if isinstance(value, _NotFinite) else type(value).__name__
        raise InvalidBody("the body must be a JSON object", details=kind)
    problems = [_finite(p) for p in json_problems(value, depth=MAX_DEPTH)]
    if problems:
        raise InvalidBody(_CANNOT_CARRY, details=problems[:MAX_DETAILS])
    return value


def _finite(found: dict[str, str]) -> dict[str, str]:
    # The contract calls a marker "not a JSON value"; for the caller it is a number too big.
    if found["message"] == "must be a JSON value":
        return problem(found["field"], "must be a finite number")
    return found
