"""Contributor commands: ``join``, ``train``, ``stats``, ``upload``, ``contribute``, ``predict``.

Thin wrappers: training lives in :mod:`~moerge.contributor_client.training`, statistics in
:mod:`~moerge.contributor_client.statistics`, transport in :mod:`~moerge.contributor_client.upload`.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from moerge.contributor_client.connection import ClientConfig, Target
from moerge.contributor_client.options import (
    Coordinator,
    Json,
    TlsCa,
    Token,
    Transport,
    TransportChoice,
)
from moerge.contributor_client.output import emit_json, err_console, table
from moerge.contributor_client.rpc import call, guarded
from moerge.v1 import contributor_pb2, inference_pb2

AGGREGATIONS = {
    "default": inference_pb2.AGGREGATION_UNSPECIFIED,
    "ensemble": inference_pb2.AGGREGATION_OUTPUT_ENSEMBLE,
    "merge": inference_pb2.AGGREGATION_MERGE_LINEAR,
    "ties": inference_pb2.AGGREGATION_MERGE_TIES,
    "dare": inference_pb2.AGGREGATION_MERGE_DARE,
    "mix": inference_pb2.AGGREGATION_MODULE_MIX,
}


def join(
    coordinator: Annotated[str, typer.Option("--coordinator", "-c", help="HOST:PORT")],
    token: Annotated[str, typer.Option("--token", help="enrollment token from an admin")],
    name: Annotated[str | None, typer.Option(help="contributor name (default: host name)")] = None,
    tls_ca: TlsCa = None,
) -> None:
    """Join a coordinator; stores the credential in a 0600 file."""
    import socket

    target = Target(address=coordinator, tls_ca=tls_ca or "")
    request = contributor_pb2.JoinRequest(enrollment_token=token, name=name or socket.gethostname())
    response = call(target, "contributor", "Join", request)
    path = ClientConfig(
        coordinator=coordinator,
        contributor_id=response.contributor_id,
        name=request.name,
        credential=response.credential,
        tls_ca=tls_ca or "",
    ).save()
    typer.echo(f"joined as {request.name} ({response.contributor_id}); credential saved in {path}")


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
) -> None:
    """Upload an expert folder (resumes an interrupted upload)."""
    from moerge.contributor_client.upload import BulkUnavailable, upload_expert
    from moerge.expert_format import STATISTICS_META, StatisticsMeta

    meta_path = expert_dir / STATISTICS_META
    if not meta_path.is_file():
        err_console.print(
            f"[red]error[/red] {expert_dir} has no {STATISTICS_META}: compute it "
            "with `moerge stats DATA --adapter DIR` first"
        )
        raise typer.Exit(2)
    meta = StatisticsMeta.read(meta_path)
    target = Target.resolve(coordinator, token, tls_ca)
    try:
        response = guarded(
            lambda: upload_expert(
                target,
                expert_dir,
                name or expert_dir.resolve().name,
                task_name or meta.task_name,
                description if description is not None else meta.task_description,
                chunk_size=chunk_size,
                progress=not json_out,
                transport=transport.value,
            )
        )
    except BulkUnavailable as exc:
        err_console.print(f"[red]error[/red] {exc}")
        raise typer.Exit(1) from None
    if json_out:
        emit_json(response)
        return
    e = response.expert
    verb = "registered" if response.created else "already registered"
    typer.echo(f"{verb}: expert {e.expert_id} ({e.name} v{e.version}, task {e.task_name})")


def my_experts(
    coordinator: Coordinator = None,
    token: Token = None,
    tls_ca: TlsCa = None,
    json_out: Json = False,
) -> None:
    """List the experts this contributor has registered."""
    response = call(
        Target.resolve(coordinator, token, tls_ca),
        "contributor",
        "ListMyExperts",
        contributor_pb2.ListMyExpertsRequest(),
    )
    if json_out:
        emit_json(response)
        return
    rows = [
        (e.expert_id[:12], e.name, e.version, e.task_name, e.example_count)
        for e in response.experts
    ]
    table("my experts", ("id", "name", "v", "task", "examples"), rows)


def _read_inputs(texts: list[str] | None, file: Path | None) -> list[str]:
    if texts:
        return list(texts)
    source = file.read_text(encoding="utf-8") if file and str(file) != "-" else sys.stdin.read()
    return [line for line in (line.strip() for line in source.splitlines()) if line]


def predict(
    texts: Annotated[list[str] | None, typer.Argument(help="inputs (else --file or stdin)")] = None,
    file: Annotated[
        Path | None, typer.Option("--file", "-f", help="one input per line; - = stdin")
    ] = None,
    top_k: Annotated[int, typer.Option(help="experts per input (0: router default)")] = 0,
    method: Annotated[str, typer.Option(help="routing method (default: active router)")] = "",
    aggregation: Annotated[
        str, typer.Option(help="default|ensemble|merge|ties|dare|mix")
    ] = "default",
    expert: Annotated[list[str] | None, typer.Option(help="restrict to these expert ids")] = None,
    router_version: Annotated[int, typer.Option(help="router version (0: active)")] = 0,
    max_new_tokens: Annotated[int, typer.Option(help="causal LM: tokens to generate")] = 0,
    coordinator: Coordinator = None,
    token: Token = None,
    tls_ca: TlsCa = None,
    json_out: Json = False,
) -> None:
    """Routed predictions for each input."""
    if aggregation not in AGGREGATIONS:
        raise typer.BadParameter(f"aggregation must be one of {', '.join(AGGREGATIONS)}")
    request = inference_pb2.PredictRequest(
        inputs=_read_inputs(texts, file),
        top_k=top_k,
        routing_method=method,
        expert_ids=expert or [],
        aggregation=AGGREGATIONS[aggregation],
        router_version=router_version,
        max_new_tokens=max_new_tokens,
    )
    response = call(Target.resolve(coordinator, token, tls_ca), "inference", "Predict", request)
    if json_out:
        emit_json(response)
        return
    rows = [
        (
            text[:50],
            p.output[:60],
            f"{p.confidence:.3f}",
            ", ".join(f"{e.expert_name or e.expert_id[:8]}:{e.weight:.2f}" for e in p.experts),
        )
        for text, p in zip(request.inputs, response.predictions, strict=True)
    ]
    table(
        f"predictions (router v{response.router_version} {response.routing_method}, "
        f"{response.aggregation}, {response.latency_ms:.1f} ms)",
        ("input", "output", "conf", "experts"),
        rows,
    )
    if response.note:
        err_console.print(f"note: {response.note}")


def route(
    texts: Annotated[list[str] | None, typer.Argument(help="inputs (else --file or stdin)")] = None,
    file: Annotated[Path | None, typer.Option("--file", "-f", help="one input per line")] = None,
    top_k: int = 0,
    method: str = "",
    router_version: int = 0,
    coordinator: Coordinator = None,
    token: Token = None,
    tls_ca: TlsCa = None,
    json_out: Json = False,
) -> None:
    """The routing decision only (which experts, which weights)."""
    request = inference_pb2.RouteRequest(
        inputs=_read_inputs(texts, file),
        top_k=top_k,
        routing_method=method,
        router_version=router_version,
    )
    response = call(Target.resolve(coordinator, token, tls_ca), "inference", "Route", request)
    if json_out:
        emit_json(response)
        return
    rows = [
        (
            text[:60],
            ", ".join(f"{e.expert_name or e.expert_id[:8]}:{e.weight:.2f}" for e in d.experts),
        )
        for text, d in zip(request.inputs, response.decisions, strict=True)
    ]
    table(
        f"routing (router v{response.router_version} {response.routing_method})",
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
