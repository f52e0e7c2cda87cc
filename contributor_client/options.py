"""Command-line options every client command shares (where the coordinator is, who we are)."""

from __future__ import annotations

from enum import Enum
from typing import Annotated

import typer

Coordinator = Annotated[str | None, typer.Option("--coordinator", "-c", help="HOST:PORT")]
Token = Annotated[str | None, typer.Option("--token", help="credential (or MOERGE_TOKEN)")]
TlsCa = Annotated[str | None, typer.Option("--tls-ca", help="CA certificate (PEM) for TLS")]
Json = Annotated[bool, typer.Option("--json", help="print JSON instead of a table")]


class TransportChoice(str, Enum):
    """How ``upload``/``contribute`` send the expert's bytes (docs/upload-protocol.md)."""

    auto = "auto"  # the bulk data channel if the coordinator offers it, else gRPC chunks
    bulk = "bulk"  # the data channel only: fail with a clear error if it cannot be used
    grpc = "grpc"  # gRPC chunks only, never the data channel


Transport = Annotated[
    TransportChoice,
    typer.Option(
        "--transport",
        case_sensitive=False,
        help="auto: data channel if offered, else gRPC chunks; bulk: data channel or fail; "
        "grpc: chunks only",
    ),
]
