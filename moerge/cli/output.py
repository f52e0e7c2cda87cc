"""Render command results as rich tables or, with ``--json``, as JSON on stdout.

Tables are never cut: piped or redirected, a table takes its natural width (rich would
otherwise assume 80 columns and end ids with "…"); on a terminal narrower than the table,
cells fold onto more lines. JSON is the :mod:`moerge.results` dataclasses' ``to_dict()``:
numbers as numbers, enum values as the words the CLI takes.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Sequence
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from moerge.results import Result

err_console = Console(stderr=True, soft_wrap=True)  # a message stays one greppable line
PIPED_WIDTH = 100_000  # "unlimited": a table is only as wide as its content needs


def stdout_console() -> Console:
    """A console for stdout as it is now (CliRunner and redirections swap it)."""
    return Console(width=None if sys.stdout.isatty() else PIPED_WIDTH)


def plain(value: Any) -> Any:
    """JSON-ready values: results as their ``to_dict()``, containers walked."""
    if isinstance(value, Result):
        return value.to_dict()
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def emit_json(value: Any) -> None:
    """Print ``value`` as indented, key-sorted JSON on stdout (what ``--json`` prints): results as
    their dicts, anything JSON lacks as its text."""
    print(json.dumps(plain(value), indent=2, sort_keys=True, default=str))


def table(title: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """Print rows as a rich table on stdout; None cells are left empty and long values fold."""
    grid = Table(title=title, show_lines=False)
    for column in columns:
        grid.add_column(column, overflow="fold")
    for row in rows:
        grid.add_row(*("" if v is None else str(v) for v in row))
    stdout_console().print(grid)


def fields(title: str, result: Result) -> None:
    """A two-column table of one object's fields, whole (a list shows one item per line)."""
    table(title, ("field", "value"), ((k, _cell(v)) for k, v in result.to_dict().items()))


def _cell(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "\n".join(v if isinstance(v, str) else json.dumps(v) for v in value)
    return json.dumps(value, default=str)


def error(message: object, hint: str = "") -> None:
    """A red ``error`` line on stderr, and a ``hint`` line under it if there is one."""
    err_console.print(f"[red]error[/red] {escape(str(message))}", highlight=False)
    if hint:
        err_console.print(f"hint: {escape(hint)}", highlight=False)


#: What quiets the libraries the client commands load (read when they are imported).
QUIET_ENVIRONMENT = {
    "TRANSFORMERS_VERBOSITY": "error",  # the LOAD REPORT table ("classifier.weight | MISSING")
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # transformers' and the hub's tqdm bars
    "TQDM_DISABLE": "1",  # any other tqdm bar (moerge's own bars are rich's)
}


def quiet_libraries() -> None:
    """Silence library noise between moerge's own output: transformers' load reports, Hugging
    Face progress bars and FutureWarnings, which read like errors to a user (``--verbose``
    keeps them). Settings a user made in the environment win."""
    import os
    import warnings

    for name, value in QUIET_ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    warnings.filterwarnings("ignore", category=FutureWarning)
    if "transformers" in sys.modules:  # imported already: its verbosity was read at import
        sys.modules["transformers"].logging.set_verbosity_error()
