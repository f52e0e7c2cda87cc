"""Call the coordinator and turn gRPC errors into one readable line and exit code 1."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import grpc
import typer

from moerge.contributor_client.connection import Target
from moerge.contributor_client.output import err_console
from moerge.v1 import admin_pb2_grpc, contributor_pb2_grpc, inference_pb2_grpc

T = TypeVar("T")
STUBS = {
    "admin": admin_pb2_grpc.AdminServiceStub,
    "contributor": contributor_pb2_grpc.ContributorServiceStub,
    "inference": inference_pb2_grpc.InferenceServiceStub,
}


def call(target: Target, service: str, method: str, request: Any, timeout: float = 300.0) -> Any:
    """One unary RPC with the target's credential; exits with a message on any gRPC error."""
    with target.channel() as channel:
        stub = STUBS[service](channel)
        return guarded(
            lambda: getattr(stub, method)(request, metadata=target.metadata(), timeout=timeout)
        )


def guarded(thunk: Callable[[], T]) -> T:
    try:
        return thunk()
    except grpc.RpcError as exc:
        code = exc.code().name if hasattr(exc, "code") else "UNKNOWN"
        details = exc.details() if hasattr(exc, "details") else str(exc)
        err_console.print(f"[red]error[/red] {code}: {details}")
        raise typer.Exit(1) from None
