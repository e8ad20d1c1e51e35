"""The input contract (`relay.wire.contract`) as /openapi.json says it.

Every JSON body is parsed under the contract before its route reads it (`relay.ingress.body`),
so every schema a request body uses must say what the contract says, or a client (or a
fuzzer) that follows the document gets a 400 for a body the document allows.
`apply_contract` rewrites the schemas of every request body so: strings without NUL,
integers of 64 bits, and whatever a model leaves open (extra fields, `Any`) a
`StorableValue`. A route added later gets the same without a word.

`StorableValue` is written so that the tools that read the document can all use it: no
`type` and no union (openapi-python-client drops a union that refers to itself, and every
schema that uses it, and reads a schema without either as "any value"), while each keyword
constrains the values of its own type, which is what validators and fuzzers read.

Nesting is not in the schemas: the contract counts levels from the body, and the same
payload schema is used at several depths, so an exact bound would need a copy of each schema
per depth. The descriptions say it (`MAX_DEPTH`), and nothing a fuzzer makes comes near it.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

from relay.wire import NO_NUL_PATTERN
from relay.wire.contract import MAX_DEPTH, MAX_INTEGER, MIN_INTEGER

STORABLE_VALUE = "StorableValue"
STORABLE_VALUE_REF = f"#/components/schemas/{STORABLE_VALUE}"
COMPONENT_PREFIX = "#/components/schemas/"
CONTRACT = (
    f"Every JSON body is at most {MAX_DEPTH} levels deep (the body's own object being the "
    "first); no string or key holds a NUL character or an unpaired surrogate; numbers are "
    f"finite, and integers (written without a fraction or an exponent) are between "
    f"{MIN_INTEGER} and {MAX_INTEGER}."
)
# Keywords that say nothing about which values a schema admits.
_ANNOTATIONS = frozenset(
    {"title", "description", "default", "examples", "example", "deprecated", "$comment"}
)
_NO_NUL = {"pattern": NO_NUL_PATTERN}
# `^[...]{m,n}$` and the like: one class of characters, not negated, named one by one.
_CLOSED_CLASS = re.compile(r"\^\[[^]\\^][^]\\]*\](\{\d+(,\d*)?\}|[+*?])?\$")


def storable_value() -> dict[str, Any]:
    """Any JSON value the contract admits (bar its depth)."""
    ref = {"$ref": STORABLE_VALUE_REF}
    return {
        "description": f"Any JSON value Relay can carry. {CONTRACT}",
        "pattern": NO_NUL_PATTERN,
        "if": {"type": "integer"},
        "then": {"minimum": MIN_INTEGER, "maximum": MAX_INTEGER},
        "items": ref,
        "propertyNames": dict(_NO_NUL),
        "additionalProperties": ref,
    }


def apply_contract(document: dict[str, Any]) -> None:
    """Constrain, in place, every schema a request body of `document` uses."""
    schemas: dict[str, Any] = document["components"]["schemas"]
    schemas[STORABLE_VALUE] = storable_value()
    bodies = list(_request_body_schemas(document))
    for name in sorted(_referenced(bodies, schemas) - {STORABLE_VALUE}):
        _constrain(schemas[name])
    for schema in bodies:
        _constrain(schema)


def _request_body_schemas(document: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for path in document["paths"].values():
        for operation in path.values():
            for media in operation.get("requestBody", {}).get("content", {}).values():
                yield media["schema"]


def _referenced(roots: list[Any], schemas: dict[str, Any]) -> set[str]:
    """The names of the components `roots` refer to, directly or through others."""
    found: set[str] = set()
    stack = list(roots)
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
        elif isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith(COMPONENT_PREFIX):
                name = ref.removeprefix(COMPONENT_PREFIX)
                if name not in found:
                    found.add(name)
                    stack.append(schemas[name])
            stack.extend(node.values())
    return found


def _constrain(node: dict[str, Any]) -> None:
    if "$ref" in node or "const" in node or "enum" in node:
        return  # a component is constrained once, by itself; a constant is what it is
    if not node.keys() - _ANNOTATIONS:
        node["$ref"] = STORABLE_VALUE_REF  # `Any`: whatever the contract admits
        return
    types = _types(node)
    if "string" in types:
        _no_nul(node)
    if "integer" in types:
        node["minimum"] = max(node.get("minimum", MIN_INTEGER), MIN_INTEGER)
        node["maximum"] = min(node.get("maximum", MAX_INTEGER), MAX_INTEGER)
    if "object" in types:
        _open_fields(node)
    if "array" in types:
        node.setdefault("items", {"$ref": STORABLE_VALUE_REF})
    for child in _subschemas(node):
        _constrain(child)


def _types(node: dict[str, Any]) -> set[str]:
    """The types `node` admits, as far as the contract goes: a schema that names none and is
    not `Any` (`anyOf`, or `not` alone) holds its rules in its branches."""
    declared = node.get("type")
    if declared is None:
        return {"object"} if "properties" in node else set()
    return {declared} if isinstance(declared, str) else set(declared)


def _no_nul(node: dict[str, Any]) -> None:
    pattern = node.get("pattern")
    if pattern is None:
        node["pattern"] = NO_NUL_PATTERN
    elif "\\u0000" not in pattern and not _CLOSED_CLASS.fullmatch(pattern):
        # A pattern of the model's own may admit a NUL: both must hold.
        node["allOf"] = [*node.get("allOf", []), dict(_NO_NUL)]


def _open_fields(node: dict[str, Any]) -> None:
    """Fields a model does not name (kept, or ignored): any storable value, under a key
    without NUL."""
    extra = node.get("additionalProperties", True)
    if extra is True:
        node["additionalProperties"] = {"$ref": STORABLE_VALUE_REF}
    if extra is not False:
        node.setdefault("propertyNames", dict(_NO_NUL))


def _subschemas(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The schemas a value under `node` must also match (not `not`: a rule added under it
    would let through what it refuses)."""
    for key in ("properties", "patternProperties"):
        yield from node.get(key, {}).values()
    for key in ("anyOf", "oneOf", "allOf", "prefixItems"):
        yield from node.get(key, [])
    for key in ("items", "additionalProperties"):
        child = node.get(key)
        if isinstance(child, dict):
            yield child
