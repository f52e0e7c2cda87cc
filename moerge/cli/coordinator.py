"""``moerge coordinator serve|health``: run the coordinator, or probe a running one.

``serve`` runs the coordinator (or, with ``--check``, only validates its settings and database)
over :mod:`moerge.coordinator`, which holds all of its logic. ``health`` asks a coordinator's
gRPC health service and exits 0 when it is SERVING: container healthchecks need a probe, and
``grpc_health_probe`` is not in the image; it uses the ``grpc.health.v1.Health/Check`` RPC the
coordinator already serves (no credential). The server and grpc are imported inside the
commands, so that the rest of the ``moerge`` CLI starts fast.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Annotated

import typer

from moerge.coordinator.config import CoordinatorConfig
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


def check_health(address: str, service: str = "", timeout: float = 5.0, tls_ca: str = "") -> str:
    """The serving status name (``SERVING``, ``NOT_SERVING``, ...) or ``UNREACHABLE: <why>``."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    channel = (
        grpc.secure_channel(address, grpc.ssl_channel_credentials(Path(tls_ca).read_bytes()))
        if tls_ca
        else grpc.insecure_channel(address)
    )
    with channel:
        try:
            # types-grpcio-health-checking leaves out the stub's methods (set in its __init__).
            response = health_pb2_grpc.HealthStub(channel).Check(  # type: ignore[attr-defined]
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        except grpc.RpcError as exc:
            return f"UNREACHABLE: {exc.code().name} {exc.details()}"
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


@app.command()  # `moerge coordinator health`: the container healthcheck
def health(
    address: Annotated[str, typer.Option(help="coordinator HOST:PORT")] = "127.0.0.1:50051",
    service: Annotated[str, typer.Option(help="service name ('' = the whole server)")] = "",
    timeout: Annotated[float, typer.Option(help="seconds to wait for the answer")] = 5.0,
    tls_ca: Annotated[str | None, typer.Option("--tls-ca", help="CA certificate (PEM)")] = None,
) -> None:
    """Check the coordinator's gRPC health; exit 0 when SERVING, else 1."""
    status = check_health(address, service, timeout, tls_ca or "")
    typer.echo(status)
    raise typer.Exit(0 if status == "SERVING" else 1)
