"""Every ``moerge ...`` line in the README and the client docs names a real command, only its
real options, every option it requires, and as many arguments as it needs."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import click
import pytest
import typer

from moerge.cli import app

ROOT = Path(__file__).parents[2]
DOCUMENTS = [
    "README.md",
    "docs/python-client.md",
    "docs/http-api.md",
    "docs/evaluate.md",
    "docs/composition.md",
]
_ENV = re.compile(r"[A-Z_]+=\S*")


def documented_command_lines(path: Path) -> list[str]:
    """The lines of the file's fenced code blocks that run ``moerge`` (after env settings)."""
    lines, fenced = [], False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            fenced = not fenced
            continue
        words = line.split()
        while words and _ENV.fullmatch(words[0]):
            words = words[1:]
        if fenced and words[:1] == ["moerge"]:
            lines.append(" ".join(words))
    return lines


def _check(words: list[str]) -> None:
    command: click.Command = typer.main.get_command(app)
    words = words[1:]
    while isinstance(command, click.Group) and words and not words[0].startswith("-"):
        assert words[0] in command.commands, f"no command {words[0]!r}"
        command, words = command.commands[words[0]], words[1:]
    options = {
        name: p
        for p in command.params
        if isinstance(p, click.Option)
        for name in (*p.opts, *p.secondary_opts)
    }
    given, positional = set(), []
    while words:
        word, words = words[0], words[1:]
        if not word.startswith("-") or word == "-":
            positional.append(word)
            continue
        name = word.split("=", 1)[0]
        assert name in options, f"{command.name} has no option {name}"
        given.add(options[name].name)
        if not (options[name].is_flag or options[name].count or "=" in word):
            words = words[1:]  # its value
    required = [p for p in command.params if isinstance(p, click.Option) and p.required]
    assert not [p.opts[0] for p in required if p.name not in given], "a required option is missing"
    arguments = [p for p in command.params if isinstance(p, click.Argument) and p.required]
    assert len(positional) >= len(arguments), f"{command.name} needs {len(arguments)} arguments"


@pytest.mark.parametrize("document", DOCUMENTS)
def test_every_documented_command_line_parses(document: str) -> None:
    lines = documented_command_lines(ROOT / document)
    for line in lines:
        try:
            _check(shlex.split(line, comments=True))
        except AssertionError as exc:
            raise AssertionError(f"{document}: `{line}`: {exc}") from None
    assert lines or document == "docs/python-client.md"
