"""``moerge evaluate DATA.jsonl``: how well each router routes a user's labelled data.

A thin layer over :mod:`moerge.evaluation` (the scorer the demo and the routing-quality
benchmark use too): read the file, find the active experts and the methods to score, print
the table (or ``--json``), draw the confusion matrix with ``--plot``.

What it needs from the coordinator is what ``Predict`` serves anyway: the active experts (to
map each line's task to its expert) and the routing methods with a trained router. Both come
from ``ListModels``, which every inference credential may call, so a user's inference-only API
key can evaluate; nothing else (no admin listing) is asked for.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from moerge.cli.options import Coordinator, Json, TlsCa, Token

if TYPE_CHECKING:
    from moerge.evaluation import Evaluation
    from moerge.results import Models


def evaluate(
    data: Annotated[
        str,
        typer.Argument(
            help='JSON Lines, one {"text", "label", "task" | "expert"} per line ("-": stdin); '
            '"task" names a registered expert\'s task, "expert" an expert id, prefix or name'
        ),
    ],
    methods: Annotated[
        str | None,
        typer.Option(
            help="comma-separated routing methods (default: every method with a trained "
            "router, plus uniform); the oracle is always scored"
        ),
    ] = None,
    plot: Annotated[
        Path | None, typer.Option(help="write the best router's routing confusion matrix (PNG)")
    ] = None,
    batch_size: Annotated[int, typer.Option(help="examples per Predict call")] = 32,
    max_new_tokens: Annotated[
        int, typer.Option(help="causal LMs: tokens generated per answer (0: coordinator default)")
    ] = 16,
    coordinator: Coordinator = None,
    token: Token = None,
    tls_ca: TlsCa = None,
    json_out: Json = False,
) -> None:
    """Routing accuracy per method, task accuracy beside the oracle's and the majority floor."""
    from moerge.cli.output import emit_json, error
    from moerge.cli.rpc import client, guarded
    from moerge.evaluation import LabelledDataError, assign_tasks, read_labelled
    from moerge.evaluation import evaluate as run_evaluation

    source = "stdin" if data == "-" else data
    try:
        if data == "-":
            rows = read_labelled(sys.stdin, source)
        else:
            with open(data, encoding="utf-8") as handle:
                rows = read_labelled(handle, source)
    except (OSError, LabelledDataError) as exc:
        error(str(exc))
        raise typer.Exit(1) from None

    def run() -> Evaluation:
        with client(coordinator, token, tls_ca) as moerge_client:
            models = moerge_client.models()
            chosen = _methods(models, methods)
            experts = models.experts
            stream = assign_tasks(
                rows, [(e.expert_id, e.name, e.task_name) for e in experts], source
            )
            expert_of_task = {e.task_name: e.expert_id for e in experts}
            causal_lm = any(e.task_type == "causal_lm" for e in experts)
            return run_evaluation(
                moerge_client.target,
                stream,
                chosen,
                expert_of_task,
                causal_lm,
                batch_size,
                max_new_tokens,
            )

    try:
        result = guarded(run)
    except LabelledDataError as exc:
        error(str(exc))
        raise typer.Exit(1) from None
    if plot is not None:
        _plot(result, plot)
    if json_out:
        emit_json(result.to_dict() | ({"plot": str(plot)} if plot else {}))
    else:
        _print(result, plot)


def _methods(models: Models, methods: str | None) -> list[str]:
    """``--methods``, else every method with a trained router (oldest first) plus uniform."""
    if methods is not None:
        return [m.strip() for m in methods.split(",") if m.strip()]
    ready = sorted(models.routers, key=lambda r: r.version)
    return [*dict.fromkeys(r.method for r in ready if r.method != "uniform"), "uniform"]


def _plot(result: Evaluation, path: Path) -> None:
    from moerge.evaluation import save_confusion_png

    best = result.best_router() or result.scores[0]
    path.parent.mkdir(parents=True, exist_ok=True)
    save_confusion_png(best, result.tasks, path)


def _print(result: Evaluation, plot: Path | None) -> None:
    from moerge.cli.output import stdout_console, table

    oracle = result.scores[0]
    reference = oracle.task_accuracy if not oracle.error else 0.0
    rows = []
    for s in result.scores:
        if s.error:
            rows.append((s.method, "-", "-", "-", "-", f"skipped: {s.error}"))
            continue
        share = f"{s.task_accuracy / reference:.1%}" if reference else "-"
        routing = f"{s.routing_accuracy:.1%}" if s.method != "uniform" else "-"
        rows.append((s.method, routing, f"{s.task_accuracy:.1%}", share, f"{s.seconds:.1f}", ""))
    floor = result.floor
    rows.append(
        (
            "majority floor",
            "-",
            f"{floor.accuracy:.1%}",
            f"{floor.accuracy / reference:.1%}" if reference else "-",
            "-",
            "from this file's own labels, per task",
        )
    )
    table(
        f"{result.examples} labelled examples from {len(result.tasks)} tasks "
        f"(task accuracy: {result.metric})",
        ("method", "routing acc", "task acc", "% of oracle", "predict s", "note"),
        rows,
    )
    console = stdout_console()
    for task, (label, count, n) in floor.by_task.items():
        console.print(
            f"majority floor of {task}: {label!r} {count}/{n} = {count / n:.1%}", highlight=False
        )
    if plot is not None:
        best = result.best_router() or oracle
        console.print(f"routing confusion matrix of {best.method}: {plot}", highlight=False)
