"""Contributor commands: ``join``, ``upload``, ``my-experts``, ``predict``, ``route``.

A thin layer over :class:`moerge.Client`: each command parses its options, makes one or two
calls and prints the result as a table or, with ``--json``, as JSON. Training commands live in
:mod:`~moerge.contributor_client.train_cli`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from moerge.contributor_client.options import (
    Coordinator,
    Json,
    TlsCa,
    Token,
    Transport,
    TransportChoice,
)
from moerge.contributor_client.output import emit_json, err_console, table
from moerge.contributor_client.rpc import client, guarded

if TYPE_CHECKING:
    from moerge.results import ExpertWeight

AGGREGATION_WORDS = "default|ensemble|merge|ties|dare|mix"
InputsFile = Annotated[
    Path | None,
    typer.Option(
        "--file",
        "-f",
        help='JSONL, one {"text": ...} per line (texts may hold newlines), or plain text, one '
        "input per line; - reads stdin, as does piping with no inputs and no --file",
    ),
]


def join(
    coordinator: Annotated[str, typer.Option("--coordinator", "-c", help="HOST:PORT")],
    token: Annotated[str, typer.Option("--token", help="enrollment token from an admin")],
    name: Annotated[str | None, typer.Option(help="contributor name (default: host name)")] = None,
    tls_ca: TlsCa = None,
) -> None:
    """Join a coordinator; stores the credential in a 0600 file."""
    with client(coordinator, None, tls_ca) as api:
        joined = guarded(lambda: api.join(token, name))
    typer.echo(
        f"joined as {joined.name} ({joined.contributor_id}); "
        f"credential saved in {joined.config_path}"
    )


def upload(
    expert_dir: Annotated[Path, typer.Argument(help="folder with the expert's four files")],
    name: Annotated[str | None, typer.Option(help="expert name (default: folder name)")] = None,
    task_name: Annotated[
        str | None, typer.Option(help="task name (default: statistics.json)")
    ] = None,
    description: Annotated[str | None, typer.Option(help="task description")] = None,
    chunk_size: Annotated[int, typer.Option(help="bytes per chunk")] = 1024 * 1024,
    transport: Transport = TransportChoice.auto,
    coordinator: Coordinator = None,
    token: Token = None,
    tls_ca: TlsCa = None,
    json_out: Json = False,
    no_statistics: Annotated[
        bool,
        typer.Option(
            "--no-statistics",
            help="a bare PEFT adapter folder whose data is gone: upload it as an adapter-only "
            "expert (needs --task-name; routed by Arrow, left out by statistics routers)",
        ),
    ] = False,
    labels: Annotated[
        str | None,
        typer.Option(help="--no-statistics: the head's label names in order, comma-separated"),
    ] = None,
) -> None:
    """Upload an expert folder (resumes an interrupted upload)."""
    # the progress bar is on stderr: shown with --json too, whose JSON alone is on stdout
    options = {"transport": transport.value, "chunk_size": chunk_size, "progress": True}
    if no_statistics and not task_name:
        raise typer.BadParameter("--no-statistics needs --task-name")
    with client(coordinator, token, tls_ca) as api:
        if no_statistics:
            label_names = [x.strip() for x in labels.split(",")] if labels else None
            result = guarded(
                lambda: api.upload_adapter(
                    expert_dir,
                    str(task_name),
                    name,
                    label_names=label_names,
                    description=description or "",
                    **options,
                )
            )
        else:
            result = guarded(
                lambda: api.upload(
                    expert_dir, name, task_name=task_name, description=description, **options
                )
            )
    if json_out:
        emit_json(result)
        return
    e = result.expert
    verb = "registered" if result.created else "already registered"
    typer.echo(f"{verb}: expert {e.expert_id} ({e.name} v{e.version}, task {e.task_name})")


def my_experts(
    coordinator: Coordinator = None,
    token: Token = None,
    tls_ca: TlsCa = None,
    json_out: Json = False,
) -> None:
    """List the experts this contributor has registered: state and its reason, and privacy (what
    each releases under which epsilon; ``--json`` gives the whole report)."""
    with client(coordinator, token, tls_ca) as api:
        experts = guarded(api.my_experts)
    if json_out:
        emit_json({"experts": experts})
        return
    rows = [
        (
            e.expert_id[:12],
            e.name,
            e.version,
            e.task_name,
            e.state,
            e.example_count,
            e.privacy_report.summary() if e.privacy_report else "",
            e.state_reason,
        )
        for e in experts
    ]
    table("my experts", ("id", "name", "v", "task", "state", "examples", "privacy", "reason"), rows)


def read_inputs(texts: list[str] | None, file: Path | None) -> list[str]:
    """The inputs: the arguments, else the file (``-``: stdin), else piped stdin.

    A file whose first line starts with ``{`` is JSONL, one object with a string ``text`` per
    line; any other file holds one input per non-empty line.
    """
    if texts:
        return list(texts)
    if file is None and sys.stdin.isatty():
        raise typer.BadParameter("give inputs as arguments, with --file, or on stdin")
    source = file.read_text(encoding="utf-8") if file and str(file) != "-" else sys.stdin.read()
    lines = [(n, line.strip()) for n, line in enumerate(source.splitlines(), 1) if line.strip()]
    if not lines or not lines[0][1].startswith("{"):
        return [line for _, line in lines]
    inputs = []
    for number, line in lines:
        try:
            text = json.loads(line).get("text")
        except (json.JSONDecodeError, AttributeError):
            text = None
        if not isinstance(text, str):
            raise typer.BadParameter(f'line {number} is not a JSON object with a string "text"')
        inputs.append(text)
    return inputs


def _weights(experts: tuple[ExpertWeight, ...]) -> str:
    return ", ".join(f"{e.expert_name or e.expert_id[:8]}:{e.weight:.2f}" for e in experts)


def predict(
    texts: Annotated[list[str] | None, typer.Argument(help="inputs (else --file or stdin)")] = None,
    file: InputsFile = None,
    top_k: Annotated[int, typer.Option(help="experts per input (0: router default)")] = 0,
    method: Annotated[str, typer.Option(help="routing method (default: active router)")] = "",
    aggregation: Annotated[str, typer.Option(help=AGGREGATION_WORDS)] = "default",
    expert: Annotated[
        list[str] | None, typer.Option(help="restrict to these expert ids (unique prefixes ok)")
    ] = None,
    router_version: Annotated[int, typer.Option(help="router version (0: active)")] = 0,
    max_new_tokens: Annotated[int, typer.Option(help="causal LM: tokens to generate")] = 0,
    composition: Annotated[
        str, typer.Option(help="serve this few-shot composition (moerge compose) instead")
    ] = "",
    composition_version: Annotated[
        int, typer.Option(help="the composition's version (0: newest)")
    ] = 0,
    coordinator: Coordinator = None,
    token: Token = None,
    tls_ca: TlsCa = None,
    json_out: Json = False,
) -> None:
    """Routed predictions for each input (arguments, a JSONL/text file, or stdin)."""
    if aggregation not in AGGREGATION_WORDS.split("|"):
        raise typer.BadParameter(f"aggregation must be one of {AGGREGATION_WORDS}")
    inputs = read_inputs(texts, file)
    with client(coordinator, token, tls_ca) as api:
        result = guarded(
            lambda: api.predict(
                inputs,
                top_k=top_k,
                method=method,
                aggregation=aggregation,
                experts=expert or (),
                router_version=router_version,
                max_new_tokens=max_new_tokens,
                composition=composition,
                composition_version=composition_version,
            )
        )
    if json_out:
        emit_json(result)
        return
    rows = [
        (text[:50], p.output[:60], f"{p.confidence:.3f}", _weights(p.experts))
        for text, p in zip(inputs, result.predictions, strict=True)
    ]
    table(
        f"predictions (router v{result.router_version} {result.routing_method}, "
        f"{result.aggregation}, {result.latency_ms:.1f} ms)",
        ("input", "output", "conf", "experts"),
        rows,
    )
    if result.note:
        err_console.print(f"note: {result.note}")


def route(
    texts: Annotated[list[str] | None, typer.Argument(help="inputs (else --file or stdin)")] = None,
    file: InputsFile = None,
    top_k: Annotated[int, typer.Option(help="experts per input (0: router default)")] = 0,
    method: Annotated[str, typer.Option(help="routing method (default: active router)")] = "",
    expert: Annotated[
        list[str] | None, typer.Option(help="route among these expert ids (unique prefixes ok)")
    ] = None,
    router_version: Annotated[int, typer.Option(help="router version (0: active)")] = 0,
    coordinator: Coordinator = None,
    token: Token = None,
    tls_ca: TlsCa = None,
    json_out: Json = False,
) -> None:
    """The routing decision only (which experts, which weights) for each input."""
    inputs = read_inputs(texts, file)
    with client(coordinator, token, tls_ca) as api:
        result = guarded(
            lambda: api.route(
                inputs,
                top_k=top_k,
                method=method,
                experts=expert or (),
                router_version=router_version,
            )
        )
    if json_out:
        emit_json(result)
        return
    rows = [(text[:60], _weights(d)) for text, d in zip(inputs, result.decisions, strict=True)]
    table(
        f"routing (router v{result.router_version} {result.routing_method})",
        ("input", "experts"),
        rows,
    )


def register(app: typer.Typer) -> None:
    """Attach the contributor commands to the top-level app."""
    app.command()(join)
    app.command()(upload)
    app.command("my-experts")(my_experts)
    app.command()(predict)
    app.command()(route)
    from moerge.contributor_client.train_cli import contribute, stats, train

    app.command()(train)
    app.command()(stats)
    app.command()(contribute)
