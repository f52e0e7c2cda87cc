"""The one exception :class:`moerge.Client` raises: a gRPC status code, a message and a hint.

Why one type: a caller handles "the coordinator said no" in one ``except`` and branches on
:attr:`MoergeError.code` (``NOT_FOUND``, ``PERMISSION_DENIED``, ``RESOURCE_EXHAUSTED``, ...)
instead of catching ``grpc.RpcError``, ``ValueError`` and the upload module's own errors.
Failures found before anything is sent (a bad data file, a base model whose revision differs
from the coordinator's) carry the code the coordinator would have answered with.
"""

from __future__ import annotations

import grpc


class MoergeError(Exception):
    """A refused or failed call: ``code`` (a ``grpc.StatusCode``), ``message`` and ``hint``."""

    def __init__(self, code: grpc.StatusCode, message: str, hint: str = "") -> None:
        self.code = code
        self.message = message
        self.hint = hint  # what to try next, e.g. where no coordinator answered
        super().__init__(str(self))

    def __str__(self) -> str:
        text = f"{self.code.name}: {self.message}"
        return f"{text} ({self.hint})" if self.hint else text

    @classmethod
    def from_rpc(cls, error: grpc.RpcError, address: str) -> MoergeError:
        """Wrap a gRPC error from a call to ``address`` (sync or asyncio)."""
        code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
        message = (error.details() if hasattr(error, "details") else "") or str(error)
        hint = (
            f"is a coordinator listening at {address}?"
            if code == grpc.StatusCode.UNAVAILABLE
            else ""
        )
        return cls(code, message, hint)

    @classmethod
    def invalid(cls, message: str) -> MoergeError:
        """A request refused before it is sent (bad argument, bad data file)."""
        return cls(grpc.StatusCode.INVALID_ARGUMENT, message)

    @classmethod
    def precondition(cls, message: str) -> MoergeError:
        """The local state does not allow the call (wrong base model, no data channel)."""
        return cls(grpc.StatusCode.FAILED_PRECONDITION, message)
