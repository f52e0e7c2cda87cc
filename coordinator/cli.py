"""``moerge coordinator serve``: run the coordinator (or, with ``--check``, only validate).

``moerge coordinator health`` (see :mod:`~moerge.coordinator.health_cli`) probes a running one.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Annotated

import typer

from moerge.coordinator.config import CoordinatorConfig
from moerge.coordinator.health_cli import health
from moerge.coordinator.logs import setup_logging

app = typer.Typer(help="Run the coordinator.", no_args_is_help=True)


@app.command()
def serve(
    data_dir: Annotated[Path | None, typer.Option(help="blobs, uploads, SQLite registry")] = None,
    db: Annotated[
        str | None, typer.Option(help="SQLAlchemy URL (default: SQLite in data dir)")
    ] = None,
    listen: Annotated[str | None, typer.Option(help="HOST:PORT (default 127.0.0.1:50051)")] = None,
    http_listen: Annotated[
        str | None, typer.Option(help="HOST:PORT of the HTTP API (OpenAI-compatible); default off")
    ] = None,
    tls_cert: Annotated[str | None, typer.Option(help="PEM certificate chain")] = None,
    tls_key: Annotated[str | None, typer.Option(help="PEM private key")] = None,
    base_model: Annotated[str | None, typer.Option(help="base model folder")] = None,
    router_method: Annotated[str | None, typer.Option(help="default routing method")] = None,
    device: Annotated[
        str | None, typer.Option(help="inference device: auto|cpu|cuda|cuda:N (default auto)")
    ] = None,
    dtype: Annotated[
        str | None, typer.Option(help="auto|float32|bfloat16|float16 (auto: bf16 on CUDA)")
    ] = None,
    config: Annotated[Path | None, typer.Option(help="TOML settings file")] = None,
    check: Annotated[
        bool, typer.Option("--check", help="validate settings and DB, then exit")
    ] = False,
    log_json: Annotated[bool | None, typer.Option("--log-json", help="JSON log lines")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Serve the moerge gRPC API until SIGINT/SIGTERM."""
    try:
        settings = CoordinatorConfig.load(
            config,
            data_dir=data_dir,
            db_url=db,
            listen=listen,
            tls_cert=tls_cert,
            tls_key=tls_key,
            base_model=base_model,
            router_method=router_method,
            log_json=log_json,
            device=device,
            dtype=dtype,
            http_listen=http_listen,
        )
    except (OSError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    setup_logging(logging.DEBUG if verbose else logging.INFO, settings.log_json)
    if check:
        from moerge.coordinator.checks import run_checks

        raise typer.Exit(0 if run_checks(settings) else 1)
    from moerge.coordinator.inference.device import resolve_placement
    from moerge.coordinator.server import serve as run

    try:  # a GPU asked for but absent: one line and exit 2, not a traceback
        resolve_placement(settings.device, settings.dtype)
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None

    asyncio.run(run(settings))


app.command()(health)  # `moerge coordinator health`: the container healthcheck
