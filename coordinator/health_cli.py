"""``moerge coordinator health``: ask a coordinator's gRPC health service, exit 0 when SERVING.

Why here: container healthchecks need a probe, and ``grpc_health_probe`` is not in the image;
this uses the ``grpc.health.v1.Health/Check`` RPC the coordinator already serves (no credential).
grpc is imported inside :func:`check_health` so that the rest of the ``moerge`` CLI starts fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


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
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        except grpc.RpcError as exc:
            return f"UNREACHABLE: {exc.code().name} {exc.details()}"
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


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
