"""``moerge compose create|list``: few-shot composition of registered experts (LoraHub).

A thin layer over :meth:`moerge.Client.compose` and :meth:`moerge.Client.compositions`: read
the labelled examples, stream the search's progress into a progress bar on stderr, print the
stored composition. Serve it with ``moerge predict --composition NAME``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from moerge.cli.options import Coordinator, Json, TlsCa, Token
from moerge.cli.output import emit_json, err_console, table
from moerge.cli.rpc import client, guarded

if TYPE_CHECKING:
    from moerge.results import Composition

app = typer.Typer(
    help="Few-shot composition: merge weights of experts fitted to a few examples.",
    no_args_is_help=True,
)


def read_examples(
    path: Path, text_field: str = "text", label_field: str = "label"
) -> list[tuple[str, str]]:
    """(text, label) pairs of a JSON Lines file; a label may be a number (read as its text)."""
    source = "stdin" if str(path) == "-" else str(path)
    lines = (
        sys.stdin.read()  # click deprecated get_text_stream (gone in Click 9)
        if source == "stdin"
        else path.read_text(encoding="utf-8")
    )
    examples = []
    for number, line in enumerate(lines.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        text = record.get(text_field) if isinstance(record, dict) else None
        label = record.get(label_field) if isinstance(record, dict) else None
        if (
            not isinstance(text, str)
            or isinstance(label, bool)
            or not isinstance(label, str | int | float)
        ):
            raise typer.BadParameter(
                f'{source}:{number}: expected a JSON object with a string "{text_field}" and a '
                f'"{label_field}"'
            )
        examples.append((text, str(label)))
    return examples


def _weights(composition: Composition) -> str:
    return ", ".join(
        f"{e.expert_name or e.expert_id[:8]}:{e.weight:+.2f}" for e in composition.experts
    )


@app.command()
def create(
    name: Annotated[str, typer.Argument(help="composition name (saved as its next version)")],
    data: Annotated[
        Path, typer.Argument(help='JSONL of {"text", "label"}, 1..100 lines; - : stdin')
    ],
    expert: Annotated[
        list[str] | None,
        typer.Option(
            help="candidate expert ids (unique prefixes ok); default: every active "
            "expert whose labels cover the examples'"
        ),
    ] = None,
    budget: Annotated[int, typer.Option(help="loss evaluations at most (0: 40)")] = 0,
    time_limit: Annotated[float, typer.Option(help="seconds at most (0: 120)")] = 0.0,
    l1: Annotated[float | None, typer.Option(help="L1 penalty weight (default 0.05)")] = None,
    seed: Annotated[int, typer.Option(help="seeds the optimiser")] = 0,
    keep_examples: Annotated[
        bool, typer.Option(help="store the examples with the composition (default: dropped)")
    ] = False,
    text_field: Annotated[str, typer.Option(help="the field holding the text")] = "text",
    label_field: Annotated[str, typer.Option(help="the field holding the label")] = "label",
    coordinator: Coordinator = None,
    token: Token = None,
    tls_ca: TlsCa = None,
    json_out: Json = False,
) -> None:
    """Search merge weights of registered experts that fit a few labelled examples."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from moerge.results import ComposeProgress

    examples = read_examples(data, text_field, label_field)
    with client(coordinator, token, tls_ca) as api:
        progress = Progress(
            TextColumn("composing {task.fields[name]}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total} evaluations"),
            TextColumn("best loss {task.fields[loss]}"),
            TimeElapsedColumn(),
            console=err_console,
            transient=True,
        )

        def run() -> Composition:
            with progress:
                bar = progress.add_task("search", total=None, name=name, loss="-")
                for event in api.compose(
                    name,
                    examples,
                    experts=expert or [],
                    budget=budget,
                    time_limit_s=time_limit,
                    l1=l1,
                    seed=seed,
                    keep_examples=keep_examples,
                ):
                    if isinstance(event, ComposeProgress):
                        progress.update(
                            bar,
                            completed=event.evaluations,
                            total=event.budget,
                            loss=f"{event.best_loss:.4f}",
                        )
                    else:
                        return event
            raise RuntimeError("the coordinator ended the stream without a composition")

        result = guarded(run)
    if json_out:
        emit_json(result)
        return
    table(
        f"composition {result.name} v{result.version}",
        (
            "experts (signed weights)",
            "loss",
            "uniform-merge loss",
            "evaluations",
            "seconds",
            "examples",
        ),
        [
            (
                _weights(result),
                f"{result.loss:.4f}",
                f"{result.start_loss:.4f}",
                f"{result.evaluations} ({result.stopped_by})",
                f"{result.elapsed_s:.1f}",
                f"{result.example_count}{' kept' if result.examples_kept else ' dropped'}",
            )
        ],
    )
    err_console.print(f"serve it with: moerge predict --composition {result.name} ...")


@app.command("list")
def list_compositions(
    name: Annotated[str, typer.Argument(help="only this name's versions")] = "",
    coordinator: Coordinator = None,
    token: Token = None,
    tls_ca: TlsCa = None,
    json_out: Json = False,
) -> None:
    """Stored compositions, newest first."""
    with client(coordinator, token, tls_ca) as api:
        found = guarded(lambda: api.compositions(name))
    if json_out:
        emit_json(found)
        return
    table(
        "compositions",
        ("name", "version", "experts (signed weights)", "loss", "examples", "created"),
        [
            (c.name, c.version, _weights(c), f"{c.loss:.4f}", c.example_count, c.created_at[:19])
            for c in found
        ],
    )
