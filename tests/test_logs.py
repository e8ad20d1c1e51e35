"""Logs for people and for machines: the same fields in JSON lines or in console lines, the
form chosen by the stream (a terminal or not) unless `RELAY_LOG_FORMAT` says which."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import select
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO

import pytest
import structlog

from relay.commands.logs import configure_logging, resolved_format
from relay.settings import Settings

_ANSI = re.compile(r"\x1b\[[0-9;]*m")


@contextmanager
def terminal() -> Iterator[tuple[TextIO, int]]:
    """A real pseudo-terminal: what is written to the stream is read back from `master`."""
    master, slave = os.openpty()
    stream = os.fdopen(slave, "w", buffering=1)
    try:
        yield stream, master
    finally:
        stream.close()
        os.close(master)


def _read(master: int, lines: int = 2) -> str:
    """What the terminal shows once `lines` lines arrived (a read may return fewer)."""
    out = b""
    while out.count(b"\n") < lines:
        ready, _, _ = select.select([master], [], [], 5.0)
        assert ready, f"the terminal showed only {out!r}"
        out += os.read(master, 65536)
    return out.decode()


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:], root.level = handlers, level
    structlog.reset_defaults()


def _emit() -> None:
    with structlog.contextvars.bound_contextvars(conversation_id="conv_1", message_id="msg_1"):
        structlog.get_logger("relay.test").info("delivered", attempt=2, status=200)
    logging.getLogger("aio_pika.test").warning("library line %s", "here")


def test_auto_is_console_on_a_terminal_and_json_elsewhere() -> None:
    with terminal() as (stream, _):
        assert resolved_format("auto", stream) == "console"
        assert resolved_format("json", stream) == "json"
    assert resolved_format("auto", io.StringIO()) == "json"
    assert resolved_format("console", io.StringIO()) == "console"


def test_json_lines_carry_the_bound_ids_and_library_lines() -> None:
    stream = io.StringIO()
    configure_logging("info", stream, "auto")
    _emit()
    ours, theirs = (json.loads(line) for line in stream.getvalue().splitlines())
    assert ours["event"] == "delivered"
    assert {k: ours[k] for k in ("conversation_id", "message_id", "attempt", "status")} == {
        "conversation_id": "conv_1",
        "message_id": "msg_1",
        "attempt": 2,
        "status": 200,
    }
    assert (ours["level"], ours["logger"]) == ("info", "relay.test")
    assert "timestamp" in ours
    assert (theirs["event"], theirs["level"], theirs["logger"]) == (
        "library line here",
        "warning",
        "aio_pika.test",
    )


def test_console_lines_on_a_terminal_are_coloured_and_carry_the_same_fields() -> None:
    with terminal() as (stream, master):
        configure_logging("info", stream, "auto")
        _emit()
        out = _read(master)
    assert _ANSI.search(out), "a terminal gets colours"
    plain = _ANSI.sub("", out)
    ours, theirs = (line for line in plain.splitlines() if line.strip())
    assert "delivered" in ours
    assert "[info" in ours
    assert "relay.test" in ours
    for field in ("conversation_id=conv_1", "message_id=msg_1", "attempt=2", "status=200"):
        assert field in ours
    assert re.match(r"\d{4}-\d\d-\d\dT", ours), "the same timestamp leads the line"
    assert "library line here" in theirs
    assert "[warning" in theirs
    with pytest.raises(json.JSONDecodeError):
        json.loads(ours)


def test_no_color_and_a_forced_console_off_a_terminal_print_plain_lines(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stream = io.StringIO()
    configure_logging("info", stream, "console")
    _emit()
    assert "conversation_id=conv_1" in stream.getvalue()
    assert not _ANSI.search(stream.getvalue()), "colours only where they are seen"
    monkeypatch.setenv("NO_COLOR", "1")
    with terminal() as (tty, master):
        configure_logging("info", tty, "auto")
        _emit()
        out = _read(master)
    assert "conversation_id=conv_1" in out
    assert not _ANSI.search(out)


def test_json_forced_on_a_terminal() -> None:
    with terminal() as (stream, master):
        configure_logging("info", stream, "json")
        _emit()
        first = _read(master).splitlines()[0]
    assert json.loads(first)["message_id"] == "msg_1"


@pytest.mark.parametrize("fmt", ["console", "json"])
def test_a_traceback_shows_no_locals_in_either_form(fmt: str) -> None:
    """A secret in a frame's locals must never reach a log line (the rich traceback
    formatter would print locals)."""
    stream = io.StringIO()
    configure_logging("info", stream, fmt)  # type: ignore[arg-type]
    secret = "whsec_never_in_a_log_line"
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        structlog.get_logger("relay.test").exception("failed", length=len(secret))
    out = stream.getvalue()
    assert "RuntimeError: boom" in out
    assert secret not in out


def test_the_setting_reads_relay_log_format(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().log_format == "auto"
    monkeypatch.setenv("RELAY_LOG_FORMAT", "console")
    assert Settings().log_format == "console"
    monkeypatch.setenv("RELAY_LOG_FORMAT", "xml")
    with pytest.raises(ValueError, match="log_format"):
        Settings()
