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

    auto = "auto"  # straight into the coordinator's object store if it has one, else gRPC chunks
    object = "object"  # the object store only: fail with a clear error if there is none
    grpc = "grpc"  # gRPC chunks only


Transport = Annotated[
    TransportChoice,
    typer.Option(
        "--transport",
        case_sensitive=False,
        help="auto: the coordinator's object store if it has one, else gRPC chunks; "
        "object: object store or fail; grpc: chunks only",
    ),
]
