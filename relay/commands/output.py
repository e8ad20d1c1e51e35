"""What commands print: JSON documents and plain aligned tables, on standard output."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from pydantic import BaseModel


def print_json(value: Any) -> None:
    """`value` as an indented JSON document."""
    print(json.dumps(value, indent=2))


def table(rows: Sequence[dict[str, Any]], columns: list[str]) -> str:
    """A plain aligned text table (`-` for a missing or null cell)."""
    cells = [
        [str(row.get(col) if row.get(col) is not None else "-") for col in columns] for row in rows
    ]
    widths = [max([len(col)] + [len(r[i]) for r in cells]) for i, col in enumerate(columns)]
    lines = ["  ".join(col.ljust(w) for col, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(lines)


def show(rows: Sequence[dict[str, Any]], columns: list[str], as_json: bool) -> None:
    """Rows as a JSON list (`--json`) or as a table of `columns`."""
    if as_json:
        print_json(list(rows))
    else:
        print(table(rows, columns))


def plain(view: BaseModel) -> dict[str, Any]:
    """A view (`relay.views`) as the CLI prints it: its fields in order, times in full ISO
    8601 (the API's answers round them to milliseconds)."""
    return {name: _plain(getattr(view, name)) for name in type(view).model_fields}


def _plain(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return plain(value)
    return value.isoformat() if isinstance(value, datetime) else value
