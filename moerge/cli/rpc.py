"""The CLI's side of :class:`moerge.Client`: one client per command, errors as one line + exit 1.

Commands build a client with :func:`client` and run its calls inside :func:`guarded`, which
prints a :class:`~moerge.MoergeError` (status code, message, and a hint such as "is a
coordinator listening at HOST:PORT?") on stderr and exits with status 1.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import typer

from moerge.cli.output import error

if TYPE_CHECKING:
    from moerge.client import Client
    from moerge.contributor_client.connection import Target

T = TypeVar("T")


def client(coordinator: str | None, token: str | None, tls_ca: str | None) -> Client:
    """A client for the command's ``--coordinator``/``--token``/``--tls-ca`` (or defaults)."""
    from moerge.client import Client

    return Client(coordinator, token, tls_ca)


def guarded(thunk: Callable[[], T]) -> T:
    """Run ``thunk``; a :class:`~moerge.MoergeError` becomes a message on stderr and exit 1."""
    import grpc

    from moerge.errors import MoergeError

    try:
        return thunk()
    except MoergeError as exc:
        error(f"{exc.code.name}: {exc.message}", exc.hint)
    except grpc.RpcError as exc:  # callers that drive the stubs themselves
        code = exc.code().name if hasattr(exc, "code") else "UNKNOWN"
        error(f"{code}: {exc.details() if hasattr(exc, 'details') else exc}")
    raise typer.Exit(1)


def with_client(
    coordinator: str | None, token: str | None, tls_ca: str | None, work: Callable[[Client], T]
) -> T:
    """``work(client)`` with the command's client; errors print and exit 1."""
    with client(coordinator, token, tls_ca) as api:
        return guarded(lambda: work(api))


def call(target: Target, service: str, method: str, request: Any, timeout: float = 300.0) -> Any:
    """One unary RPC with the target's credential, returning the raw response message.

    For scripts that work with the protobuf messages (the demo, benchmarks); exits like
    :func:`guarded` on an error.
    """
    import grpc

    from moerge.client import STUBS
    from moerge.errors import MoergeError

    def run() -> Any:
        with target.channel() as channel:
            rpc = getattr(STUBS[service](channel), method)
            try:
                return rpc(request, metadata=target.metadata(), timeout=timeout)
            except grpc.RpcError as exc:
                raise MoergeError.from_rpc(exc, target.address) from None

    return guarded(run)
