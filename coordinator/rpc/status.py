"""One table from domain errors to gRPC status codes (the servicers' only error policy).

Handlers raise plain exceptions; :func:`status_for` picks the code and a message that is safe to
show the caller. Unexpected exceptions become INTERNAL with no detail (the log has the trace).
"""

from __future__ import annotations

import errno
import logging

import grpc
from sqlalchemy.exc import OperationalError

from moerge.coordinator.inference.errors import UnknownExpert
from moerge.storage import errors as registry_errors

log = logging.getLogger(__name__)

STATUS_BY_ERROR: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (registry_errors.NotFound, grpc.StatusCode.NOT_FOUND),
    (registry_errors.AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (registry_errors.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (registry_errors.FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (registry_errors.Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (registry_errors.PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (OperationalError, grpc.StatusCode.UNAVAILABLE),
)


# No space left, over quota, or over the file-size limit (RLIMIT_FSIZE): all "disk full".
DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


class ResourceExhausted(Exception):
    """A quota or rate limit was hit (uploads per contributor, disk space)."""


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    for error_type, code in STATUS_BY_ERROR:
        if isinstance(exc, error_type):
            if code is grpc.StatusCode.UNAVAILABLE:
                return code, "the registry database is unavailable; try again"
            return code, str(exc)
    if isinstance(exc, ResourceExhausted):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)
    if isinstance(exc, OSError) and exc.errno in DISK_FULL:
        return (
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "the coordinator is out of disk space (its storage is full); try again later",
        )
    if isinstance(exc, UnknownExpert):
        return grpc.StatusCode.NOT_FOUND, str(exc)
    if isinstance(exc, (ValueError, LookupError)) and getattr(exc, "grpc_visible", False):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    log.exception("unexpected error while serving an RPC", exc_info=exc)
    return grpc.StatusCode.INTERNAL, "internal error (see the coordinator's log)"
