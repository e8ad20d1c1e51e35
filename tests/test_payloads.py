"""Outgoing payload validation by Botpress message type: plain functions, no I/O."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from relay.payloads import KNOWN_TYPES, InvalidPayload, validate_outgoing

CARD = {
    "title": "Pizza",
    "subtitle": "Margherita",
    "imageUrl": "https://example.com/pizza.png",
    "actions": [
        {"action": "postback", "label": "Order", "value": "order"},
        {"action": "url", "label": "Menu", "value": "https://example.com/menu"},
        {"action": "say", "label": "Hi", "value": "hi", "color": "red"},
    ],
}
CHOICE = {
    "text": "Size?",
    "options": [{"label": "Small", "value": "s"}, {"label": "Large", "value": "l"}],
}

VALID: dict[str, dict[str, Any]] = {
    "text": {"text": "hello", "botMeta": {"intent": "greet"}},
    "markdown": {"markdown": "**hello**", "extra": 1},
    "image": {"imageUrl": "https://example.com/a.png", "alt": "a"},
    "audio": {"audioUrl": "http://example.com/a.mp3"},
    "video": {"videoUrl": "https://example.com/a.mp4", "title": "clip"},
    "file": {"fileUrl": "https://example.com/a.pdf", "title": "Invoice"},
    "location": {"latitude": -90, "longitude": 180.0, "address": "1 Main St", "title": "Home"},
    "card": CARD,
    "carousel": {"items": [CARD, {"title": "Plain", "actions": []}], "tag": None},
    "choice": CHOICE,
    "dropdown": {**CHOICE, "allowCreation": True},
    "bloc": {
        "items": [
            {"type": "text", "payload": {"text": "one"}},
            {"type": "image", "payload": {"imageUrl": "https://example.com/b.png"}},
            {"type": "custom-widget", "payload": {"anything": [1, 2.5, None, False]}},
        ]
    },
}


def test_every_known_type_has_a_valid_example() -> None:
    assert set(VALID) == KNOWN_TYPES


@pytest.mark.parametrize(("type_", "payload"), list(VALID.items()), ids=list(VALID))
def test_valid_payload_is_returned_unchanged(type_: str, payload: dict[str, Any]) -> None:
    before = copy.deepcopy(payload)
    result = validate_outgoing(type_, payload)
    assert result == before
    assert result is payload


@pytest.mark.parametrize(
    ("type_", "payload", "field"),
    [
        ("text", {}, "payload.text"),
        ("text", {"text": ""}, "payload.text"),
        ("text", {"text": 5}, "payload.text"),
        ("markdown", {"markdown": ["x"]}, "payload.markdown"),
        ("image", {"imageUrl": "ftp://example.com/a.png"}, "payload.imageUrl"),
        ("image", {"imageUrl": "data:image/png;base64,AAAA"}, "payload.imageUrl"),
        ("image", {"imageUrl": "https://"}, "payload.imageUrl"),
        ("image", {"imageUrl": "https://e.com/" + "a" * 4096}, "payload.imageUrl"),
        ("audio", {"audioUrl": None}, "payload.audioUrl"),
        ("video", {}, "payload.videoUrl"),
        ("file", {"fileUrl": "https://example.com/a", "title": 3}, "payload.title"),
        ("file", {"title": "x"}, "payload.fileUrl"),
        ("location", {"latitude": 90.5, "longitude": 0}, "payload.latitude"),
        ("location", {"latitude": 0, "longitude": -180.1}, "payload.longitude"),
        ("location", {"latitude": "1", "longitude": 0}, "payload.latitude"),
        ("location", {"latitude": True, "longitude": 0}, "payload.latitude"),
        ("location", {"latitude": float("nan"), "longitude": 0}, "payload.latitude"),
        ("card", {"actions": []}, "payload.title"),
        ("card", {"title": "t"}, "payload.actions"),
        (
            "card",
            {"title": "t", "actions": [{"action": "say", "label": "", "value": "v"}]},
            "payload.actions.0.label",
        ),
        (
            "card",
            {"title": "t", "actions": [{"action": "call", "label": "l", "value": "v"}]},
            "payload.actions.0.action",
        ),
        ("card", {"title": "t", "imageUrl": "javascript:x", "actions": []}, "payload.imageUrl"),
        ("carousel", {"items": []}, "payload.items"),
        ("carousel", {"items": [{"title": "", "actions": []}]}, "payload.items.0.title"),
        ("choice", {"text": "q"}, "payload.options"),
        (
            "choice",
            {"text": "q", "options": [{"label": "", "value": "v"}]},
            "payload.options.0.label",
        ),
        ("dropdown", {"text": "q", "options": [{"label": "l"}]}, "payload.options.0.value"),
        ("dropdown", {"options": []}, "payload.text"),
        ("bloc", {"items": {}}, "payload.items"),
        ("bloc", {"items": [{"type": "text"}]}, "payload.items.0.payload"),
        (
            "bloc",
            {
                "items": [
                    {"type": "text", "payload": {"text": "ok"}},
                    {"type": "text", "payload": {}},
                ]
            },
            "payload.items.1.payload.text",
        ),
        (
            "bloc",
            {"items": [{"type": "card", "payload": {"title": "t", "actions": [{"label": "x"}]}}]},
            "payload.items.0.payload.actions.0.action",
        ),
        (
            "bloc",
            {"items": [{"type": "bloc", "payload": {"items": []}}]},
            "payload.items.0.type",
        ),
        ("bloc", {"items": [{"type": "bad type", "payload": {}}]}, "payload.items.0.type"),
    ],
)
def test_invalid_payload_names_the_field(type_: str, payload: object, field: str) -> None:
    with pytest.raises(InvalidPayload) as caught:
        validate_outgoing(type_, payload)
    fields = [detail["field"] for detail in caught.value.details]
    assert field in fields
    assert all(detail["message"] for detail in caught.value.details)


def test_unknown_type_passes_through_untouched() -> None:
    payload = {"whatever": [{"nested": True}], "n": 1.5, "none": None}
    assert validate_outgoing("com.example_widget-v2", payload) is payload


@pytest.mark.parametrize("payload", [None, "text", 3, ["a"], ("a",)])
@pytest.mark.parametrize("type_", ["custom", "text"])
def test_non_object_payload_fails(type_: str, payload: object) -> None:
    with pytest.raises(InvalidPayload) as caught:
        validate_outgoing(type_, payload)
    assert caught.value.details == [{"field": "payload", "message": "must be a JSON object"}]


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({1: "x"}, "payload"),
        ({"a": {"b": [object()]}}, "payload.a.b.0"),
        ({"a": float("inf")}, "payload.a"),
    ],
)
def test_unknown_type_payload_must_be_json(payload: dict[Any, Any], field: str) -> None:
    with pytest.raises(InvalidPayload) as caught:
        validate_outgoing("custom", payload)
    assert [detail["field"] for detail in caught.value.details] == [field]


@pytest.mark.parametrize("type_", ["", "a" * 65, "has space", "é", "a/b", "text\n", 7, None])
def test_bad_type_name_fails(type_: Any) -> None:
    with pytest.raises(InvalidPayload) as caught:
        validate_outgoing(type_, {"text": "hi"})
    assert [detail["field"] for detail in caught.value.details] == ["type"]


def test_type_name_limits() -> None:
    assert validate_outgoing("A" * 64, {}) == {}
    assert validate_outgoing("a.B_c-9", {}) == {}


@pytest.mark.parametrize("bad", ["nul\x00here", "lone \ud800 surrogate"])
@pytest.mark.parametrize(
    ("type_", "payload", "field"),
    [
        ("text", {"text": "{}"}, "payload.text"),
        ("text", {"text": "ok", "meta": {"note": "{}"}}, "payload.meta.note"),
        (
            "choice",
            {"text": "q", "options": [{"label": "{}", "value": "v"}]},
            "payload.options.0.label",
        ),
        ("file", {"fileUrl": "https://e.com/{}"}, "payload.fileUrl"),
        ("custom", {"list": ["ok", "{}"]}, "payload.list.1"),
        ("custom", {"{}": 1}, "payload"),
        (
            "bloc",
            {"items": [{"type": "text", "payload": {"text": "{}"}}]},
            "payload.items.0.payload.text",
        ),
    ],
)
def test_unstorable_strings_fail(type_: str, payload: dict[str, Any], field: str, bad: str) -> None:
    def fill(value: Any) -> Any:
        if isinstance(value, str):
            return value.replace("{}", bad)
        if isinstance(value, dict):
            return {fill(key): fill(item) for key, item in value.items()}
        if isinstance(value, list):
            return [fill(item) for item in value]
        return value

    with pytest.raises(InvalidPayload) as caught:
        validate_outgoing(type_, fill(payload))
    assert [detail["field"] for detail in caught.value.details] == [field]


def test_invalid_payload_lists_every_problem() -> None:
    with pytest.raises(InvalidPayload) as caught:
        validate_outgoing("location", {"latitude": 91, "longitude": -181})
    error = caught.value
    assert isinstance(error, ValueError)
    assert [detail["field"] for detail in error.details] == [
        "payload.latitude",
        "payload.longitude",
    ]
    assert "payload.latitude" in str(error)


def test_url_message_is_readable() -> None:
    with pytest.raises(InvalidPayload) as caught:
        validate_outgoing("image", {"imageUrl": "ftp://example.com/a.png"})
    assert caught.value.details == [
        {"field": "payload.imageUrl", "message": "must be an http:// or https:// URL"}
    ]
