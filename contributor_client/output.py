"""Render command results as rich tables or, with ``--json``, as JSON on stdout."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message
from rich.console import Console
from rich.table import Table

console = Console()
err_console = Console(stderr=True)


def to_dict(message: Message) -> dict[str, Any]:
    return MessageToDict(message, preserving_proto_field_name=True)


def emit_json(value: Any) -> None:
    if isinstance(value, Message):
        value = to_dict(value)
    elif isinstance(value, list) and value and isinstance(value[0], Message):
        value = [to_dict(v) for v in value]
    print(json.dumps(value, indent=2, sort_keys=True, default=str))


def table(title: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    grid = Table(title=title, show_lines=False)
    for column in columns:
        grid.add_column(column)
    for row in rows:
        grid.add_row(*("" if v is None else str(v) for v in row))
    console.print(grid)


def fields(title: str, message: Message | dict[str, Any]) -> None:
    """A two-column table of one object's fields."""
    data = to_dict(message) if isinstance(message, Message) else message
    table(title, ("field", "value"), ((k, _short(v)) for k, v in data.items()))


def _short(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= 200 else text[:197] + "..."
