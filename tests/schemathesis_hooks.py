"""Schemathesis hooks for tests/test_schemathesis.py (its config names this module).

The coverage phase of schemathesis 4.32 sends header values made of letters and digits only;
an optional header whose pattern needs another character (`Last-Event-ID`, a watermark
`1042.2204`) has no such value, and the phase then seeds its "default positive" case with one
of its *negative* values (`specs/openapi/coverage/_operation.py`, `_seed_parameters`), and
reports the server's 400 as a valid request refused. Such a header is left out of the cases
called positive, as a client that has no valid value for an optional header would; every
other phase (and the coverage phase's negative cases) still sends it.
"""

from __future__ import annotations

from typing import Any

import schemathesis
from openapi_schema_validator import OAS31Validator
from schemathesis.generation import GenerationMode


@schemathesis.hook
def map_case(context: Any, case: Any) -> Any:
    """The case without the optional headers it calls valid and that are not."""
    meta = case.meta
    if meta is None or meta.generation.mode != GenerationMode.POSITIVE or not case.headers:
        return case
    for parameter in case.operation.headers:
        value = case.headers.get(parameter.name)
        if value is None or parameter.is_required:
            continue
        if not OAS31Validator(parameter.definition["schema"]).is_valid(value):
            del case.headers[parameter.name]
    return case
