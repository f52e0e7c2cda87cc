"""User commands: ``predict`` and ``route`` (``generate``, ``evaluate`` and ``compose`` have
modules of their own, :mod:`.generate`, :mod:`.evaluate`, :mod:`.compose`).

What someone who only uses the pooled experts runs, with an inference API key or any
credential: a thin layer over :meth:`moerge.Client.predict` and :meth:`moerge.Client.route`
that reads the inputs (arguments, a JSONL or text file, or stdin) and prints a table or, with
``--json``, JSON.
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
