"""Validation of the payloads bots send, by Botpress message type.

A bot's outgoing message carries a `type` (text, image, card, ...) and a JSON object
`payload` whose shape depends on that type. `validate_outgoing` checks the payload of
every known type against its model here, so a channel never receives a card without a
title or an image without a URL, and answers with `InvalidPayload`, whose `details` name
each bad field as `payload.<dotted path>`. Types Relay does not know pass through, as
long as the payload is a JSON object a store can keep. Extra fields are allowed
everywhere: bots attach their own metadata.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
)
from pydantic_core import ErrorDetails

from relay.wire import NO_NUL, NO_NUL_PATTERN, StorableValue
from relay.wire.contract import MAX_DEPTH, MAX_PAYLOAD_BYTES, json_problems, problem, storable_text

MAX_URL_LENGTH = 4096
_TYPE_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
# The same rule, for /openapi.json.
TYPE_NAME_PATTERN = f"^{_TYPE_NAME.pattern}$"
# URLs `_http_url` accepts, for /openapi.json: a case-insensitive http(s) scheme and a host of
# URL characters (no brackets: urlsplit refuses a malformed IPv6 host, and no characters it
# would drop or that could normalize into a separator).
URL_PATTERN = "^[Hh][Tt][Tt][Pp][Ss]?://[A-Za-z0-9.:@%_~!$&'()*+,;=-]+([/?#][^\\u0000]*)?$"


def _http_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme.lower() not in ("http", "https") or not parts.netloc:
        raise ValueError("must be an http:// or https:// URL")
    return value


Str = Annotated[str, AfterValidator(storable_text), NO_NUL]
Text = Annotated[str, StringConstraints(min_length=1), AfterValidator(storable_text), NO_NUL]
Url = Annotated[
    str,
    StringConstraints(max_length=MAX_URL_LENGTH),
    AfterValidator(storable_text),
    AfterValidator(_http_url),
    Field(json_schema_extra={"pattern": URL_PATTERN}),
]


class _Model(BaseModel):
    # strict: a number is not silently turned into a string; extra: bots add metadata.
    model_config = ConfigDict(
        strict=True, extra="allow", json_schema_extra={"propertyNames": {"pattern": NO_NUL_PATTERN}}
    )
    # Extra fields are any storable JSON (checked by `json_problems` before the model runs);
    # typed, so the JSON Schema says so.
    __pydantic_extra__: dict[str, StorableValue] = Field(init=False)


class TextPayload(_Model):
    """`text`: plain text."""

    text: Text


class MarkdownPayload(_Model):
    """`markdown`: text with Markdown formatting."""

    markdown: Text


class ImagePayload(_Model):
    """`image`: a picture, by URL."""

    imageUrl: Url


class AudioPayload(_Model):
    """`audio`: a sound clip, by URL."""

    audioUrl: Url


class VideoPayload(_Model):
    """`video`: a video, by URL."""

    videoUrl: Url


class FilePayload(_Model):
    """`file`: a downloadable file, by URL."""

    fileUrl: Url
    title: Str | None = None


class LocationPayload(_Model):
    """`location`: a point on the map."""

    latitude: Annotated[float, Field(ge=-90, le=90, allow_inf_nan=False)]
    longitude: Annotated[float, Field(ge=-180, le=180, allow_inf_nan=False)]
    address: Str | None = None
    title: Str | None = None


class CardAction(_Model):
    """A button on a card."""

    action: Literal["postback", "url", "say"]
    label: Text
    value: Str


class CardPayload(_Model):
    """`card`: a titled card with buttons."""

    title: Text
    subtitle: Str | None = None
    imageUrl: Url | None = None
    actions: list[CardAction]


class CarouselPayload(_Model):
    """`carousel`: one or more cards side by side."""

    items: Annotated[list[CardPayload], Field(min_length=1)]


class ChoiceOption(_Model):
    """One option of a choice or dropdown."""

    label: Text
    value: Str


class ChoicePayload(_Model):
    """`choice`: a question with buttons to answer it."""

    text: Str
    options: list[ChoiceOption]


class DropdownPayload(ChoicePayload):
    """`dropdown`: a question with a list to pick the answer from."""


class BlocItem(_Model):
    """One message of a bloc; its payload is checked by `validate_outgoing`, by its type."""

    type: Str
    payload: dict[str, Any]


class BlocPayload(_Model):
    """`bloc`: several messages sent as one."""

    items: list[BlocItem]


PAYLOAD_MODELS: dict[str, type[_Model]] = {
    "text": TextPayload,
    "markdown": MarkdownPayload,
    "image": ImagePayload,
    "audio": AudioPayload,
    "video": VideoPayload,
    "file": FilePayload,
    "location": LocationPayload,
    "card": CardPayload,
    "carousel": CarouselPayload,
    "choice": ChoicePayload,
    "dropdown": DropdownPayload,
    "bloc": BlocPayload,
}
KNOWN_TYPES: frozenset[str] = frozenset(PAYLOAD_MODELS)


class InvalidPayload(ValueError):
    """An outgoing message's type or payload is invalid; `details` names each bad field."""

    def __init__(self, details: list[dict[str, str]]) -> None:
        super().__init__("; ".join(f"{d['field']}: {d['message']}" for d in details))
        self.details = details


def _pydantic_problems(error: ValidationError, path: str) -> list[dict[str, str]]:
    return [
        problem(".".join([path, *(str(part) for part in item["loc"])]), _message(item))
        for item in error.errors()
    ]


def _message(item: ErrorDetails) -> str:
    # a ValueError from our own validators reads better without pydantic's "Value error, "
    cause = item.get("ctx", {}).get("error")
    return str(cause) if item["type"] == "value_error" and cause else item["msg"]


def _type_problems(type_: object, field: str) -> list[dict[str, str]]:
    if isinstance(type_, str) and _TYPE_NAME.fullmatch(type_):
        return []
    return [problem(field, "must be 1 to 64 characters of A-Z, a-z, 0-9, '_', '.' or '-'")]


def _payload_problems(type_: str, payload: dict[str, Any], path: str) -> list[dict[str, str]]:
    """What is wrong with an already storable JSON object as the payload of `type_`."""
    model = PAYLOAD_MODELS.get(type_)
    if model is None:
        return []
    try:
        validated = model.model_validate(payload)
    except ValidationError as error:
        return _pydantic_problems(error, path)
    if isinstance(validated, BlocPayload):
        return _bloc_problems(validated, f"{path}.items")
    return []


def _bloc_problems(bloc: BlocPayload, path: str) -> list[dict[str, str]]:
    problems: list[dict[str, str]] = []
    for index, item in enumerate(bloc.items):
        where = f"{path}.{index}"
        if item.type == "bloc":
            problems.append(problem(f"{where}.type", "a bloc cannot contain a bloc"))
            continue
        type_problems = _type_problems(item.type, f"{where}.type")
        problems.extend(type_problems)
        if not type_problems:
            problems.extend(_payload_problems(item.type, item.payload, f"{where}.payload"))
    return problems


def _json_size(payload: dict[str, Any]) -> int:
    return len(json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode())


def validate_outgoing(type_: str, payload: object) -> dict[str, Any]:
    """Check an outgoing message's type and payload; return the payload, unchanged.

    The very object passed in is returned, with its extra fields and without defaults
    added. Unknown types are not checked beyond being a storable JSON object. Raises
    `InvalidPayload` naming every bad field (`type`, or `payload.<dotted path>`).
    """
    problems = _type_problems(type_, "type")
    if not isinstance(payload, dict):
        raise InvalidPayload([*problems, problem("payload", "must be a JSON object")])
    # A payload is what a body holds: one level fewer than a body may have.
    problems.extend(json_problems(payload, "payload", depth=MAX_DEPTH - 1))
    if not problems and _json_size(payload) > MAX_PAYLOAD_BYTES:
        problems.append(problem("payload", f"must be at most {MAX_PAYLOAD_BYTES} bytes of JSON"))
    if not problems:
        problems = _payload_problems(type_, payload, "payload")
    if problems:
        raise InvalidPayload(problems)
    return payload
