"""Why the platform refused a call: one exception per gRPC status code a caller may be shown.

Raised wherever the refusal is found: the registry (``storage/``), the upload checks, the
handlers, the rate limits. Each edge turns them into statuses with one table:
``coordinator/rpc/status.py`` for gRPC and, from the gRPC code, ``coordinator/http/errors.py``
for HTTP. Why a module of its own on the ground floor: the registry raises these and imports
nothing above the ground floor, and a handler refusing a bad ``top_k`` should not have to import
a storage module to say so. Plain exceptions without grpc, so every package may raise them.

Messages name the field or object concerned and are safe to show to the caller. Failures that
are not refusals are not wrapped: a lost database connection stays SQLAlchemy's
``OperationalError`` and a full disk an ``OSError``, so that the edge can tell "refused" from
"broken". The Python client has its own exception, :class:`moerge.errors.MoergeError`, which
carries the status code the coordinator answered with.
"""

from __future__ import annotations


class Refused(Exception):
    """A call refused for a reason the caller may see; the registry is left as it was."""


class NotFound(Refused):
    """The object named in the call does not exist (NOT_FOUND)."""


class AlreadyExists(Refused):
    """An object with this identity exists already (ALREADY_EXISTS)."""


class InvalidArgument(Refused):
    """A user-supplied value is malformed (INVALID_ARGUMENT); ``field`` names it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class FailedPrecondition(Refused):
    """The object is not in a state that allows the call (FAILED_PRECONDITION)."""


class Unauthenticated(Refused):
    """A token is unknown, malformed, expired, exhausted or revoked (UNAUTHENTICATED)."""


class PermissionDenied(Refused):
    """The caller is known but may not do this, e.g. a revoked contributor (PERMISSION_DENIED)."""


class ResourceExhausted(Refused):
    """A quota or a limit was hit (RESOURCE_EXHAUSTED).

    Upload bytes or uploads per contributor, requests per minute per credential, a full
    generation queue, a second composition search while one runs.
    """
